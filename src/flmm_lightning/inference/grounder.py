"""``Grounder``: a trained F-LMM wrapped for inference (as segment-anything's ``SamPredictor`` wraps ``Sam``),
with no file or command-line I/O. It grounds given phrases (``ground``), answers and grounds its answer
(``chat``), segments what its answer to a query names (``segment``) and shows the LMM's attention
(``attention``); loaded with ``Grounder.from_checkpoint(path)`` or ``Grounder.from_pretrained(dir_or_id)``,
shared with ``save_pretrained(dir)`` or ``push_to_hub(repo_id)``.
Photos are grounded as viewers show them (EXIF orientation applied), so masks line up with the displayed
image.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from omegaconf import OmegaConf
from PIL import Image
from torchvision.ops import masks_to_boxes

from flmm_lightning.boundaries import GroundingSample, PromptBuilder
from flmm_lightning.common.masks import mask_record, mask_scores
from flmm_lightning.core import FLMM
from flmm_lightning.data.images import (
    ImageLimits,
    UnreadableImageError,
    as_displayed,
    check_image,
    load_photo,
    measure_image,
)
from flmm_lightning.data.reasonseg import ANSWER_PREFIX
from flmm_lightning.inference.conversation import GroundedAnswer, answer_and_ground
from flmm_lightning.inference.inspection import AttentionView, read_attention
from flmm_lightning.inference.pipeline import GroundingRunner
from flmm_lightning.inference.reasoning import ReasonedSegmentation, reason_and_segment
from flmm_lightning.runs.checkpoints import load_model
from flmm_lightning.runs.pretrained import save_pretrained
from flmm_lightning.selection import KEYWORD_THRESHOLD


@dataclass
class Grounding:
    phrases: list[str]
    masks: torch.Tensor  # bool [n, H, W]
    boxes: torch.Tensor  # float [n, 4] inclusive [x0, y0, x1, y1]; all -1 for an empty mask (null in JSON)
    attention_maps: torch.Tensor  # [n, C, h, w] the merged LMM attention each mask was decoded from
    image: Image.Image  # the RGB image the masks belong to (EXIF orientation applied)
    # float [n]: the model's confidence in each mask, the mean SAM probability over its pixels; 0 when empty
    scores: torch.Tensor

    def to_json(self) -> list[dict[str, object]]:
        objects = zip(self.phrases, self.masks, self.boxes, self.scores, strict=True)
        return [
            {"phrase": phrase, **mask_record(mask, [float(v) for v in box]), "mask_score": float(score)}
            for phrase, mask, box, score in objects
        ]


class Grounder(GroundingRunner):
    """A trained F-LMM ready to ground phrases in images. ``image_limits``: the pixel and memory budget an
    image is measured against before it is decoded (``data.images.ImageLimits``)."""

    image_limits: ImageLimits = ImageLimits()

    def __init__(
        self,
        model: FLMM,
        prompt_builder: PromptBuilder,
        sam_image_size: int,
        device: str = "auto",
        run_config: Mapping[str, Any] | None = None,
    ):
        """``run_config``: the stored model config (``runs.build.run_config``), for ``save_pretrained``."""
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        super().__init__(model.to(torch.device(device)).eval(), prompt_builder, sam_image_size)
        self.run_config = dict(run_config or {})

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str = "auto",
        paths: Mapping[str, Any] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> Grounder:
        """``paths``: this machine's ``paths.*`` (data, SAM weights, asset cache), the defaults when None;
        ``overrides``: patches of stored settings by section (``{"model": {"pretrained": <dir>}}``)."""
        loaded = load_model(path, paths=paths, overrides=overrides)
        return cls(loaded.core, loaded.prompt_builder, loaded.config.sam.image_size, device, loaded.stored)

    @classmethod
    def from_pretrained(cls, directory_or_hub_id: str | Path, **kwargs: Any) -> Grounder:
        """A ``save_pretrained`` directory, or a Hugging Face hub repository holding one (downloaded to, or
        read offline from, the hub cache); ``kwargs`` as ``from_checkpoint``."""
        path = Path(directory_or_hub_id)
        if not path.is_dir():
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(str(directory_or_hub_id)))
        return cls.from_checkpoint(path, **kwargs)

    def save_pretrained(
        self, directory: str | Path, metrics: Mapping[str, Mapping[str, float]] | None = None
    ) -> Path:
        """The trainable weights as ``model.safetensors``, the model config and a model card listing
        ``metrics`` (``metrics.json``'s content) in ``directory``: no pickle; every entry point loads it as
        ``ckpt=``."""
        if not self.run_config:
            raise ValueError("this Grounder has no stored model config: load it with from_checkpoint first")
        return save_pretrained(directory, self.model.trainable_state_dict(), self.run_config, metrics)

    def push_to_hub(
        self,
        repo_id: str,
        metrics: Mapping[str, Mapping[str, float]] | None = None,
        private: bool = False,
        token: str | None = None,
        commit_message: str = "Upload F-LMM heads (flmm-lightning save_pretrained)",
    ) -> str:
        """Publishes what ``save_pretrained`` writes to the hub repository ``repo_id`` (created if missing),
        so that ``from_pretrained(repo_id)`` reads it anywhere; ``token``: huggingface_hub's (the logged-in
        one when None). The folder is written to a temporary directory, removed whatever happens. Returns
        the commit's URL."""
        from huggingface_hub import HfApi  # the hub client only for the users who publish

        api = HfApi(token=token)
        with tempfile.TemporaryDirectory(prefix="flmm_push_") as staging:
            folder = self.save_pretrained(Path(staging) / "heads", metrics)
            repo = api.create_repo(repo_id, exist_ok=True, private=private)
            commit = api.upload_folder(
                repo_id=repo.repo_id, folder_path=folder, commit_message=commit_message
            )
        return str(commit.commit_url)

    def chat(
        self,
        image: Image.Image | str | Path,
        question: str,
        history: Sequence[GroundedAnswer | tuple[str, str]] | None = None,
        selector: str | None = None,
        threshold: float = KEYWORD_THRESHOLD,
        phrases: Sequence[str] | None = None,
        **generation: Any,
    ) -> GroundedAnswer:
        """The frozen LMM's answer to ``question`` about ``image`` (a file or a PIL image, as viewers show
        it), with the phrases of the answer that name things in it segmented.

        ``history``: the earlier turns of the conversation about this image (``GroundedAnswer``s or
        ``(question, answer)`` pairs), oldest first; when they do not fit the LMM's context beside the
        question and the answer, the oldest are left out with a warning. ``selector``: how phrases are
        chosen: ``"keywords"`` (the checkpoint's keyword selector: maximal runs of answer tokens scoring
        at least ``threshold``, snapped to words; the default when the checkpoint has one), ``"lmm"`` (the
        LMM lists them when asked; the default otherwise) or ``"given"`` (``phrases``, each found in the
        answer). ``generation``: passed to transformers' ``generate`` (greedy and ``max_new_tokens=256``
        unless given). ``conversation.Conversation`` keeps the turns of a multi-turn chat.
        """
        image = self.photo(image)
        return answer_and_ground(self, image, question, history, selector, threshold, phrases, **generation)

    def segment(
        self,
        image: Image.Image | str | Path,
        query: str,
        is_sentence: bool | None = None,
        tokens: str = "all",
        answer_prefix: str = ANSWER_PREFIX,
        max_new_tokens: int = 32,
        **generation: Any,
    ) -> ReasonedSegmentation:
        """Reasoning segmentation (F-LMM's ReasonSeg protocol): the LMM answers ``query`` about ``image``
        briefly after ``answer_prefix`` ("What is {query} in this image?" for a phrase, the query itself for
        a sentence; ``is_sentence=None``: a query ending in ".", "?" or "!" is a sentence), and the
        generated tokens (``tokens="all"``, the protocol) or the keyword selector's best phrase of them
        (``tokens="keywords"``) are merged into one object and decoded as in training."""
        image = self.photo(image)
        return reason_and_segment(
            self, image, query, is_sentence, tokens, answer_prefix, max_new_tokens, **generation
        )

    def attention(
        self,
        image: Image.Image | str | Path,
        question: str,
        answer: str | None = None,
        history: Sequence[GroundedAnswer | tuple[str, str]] | None = None,
        **generation: Any,
    ) -> AttentionView:
        """What the frozen LMM looks at: every token of ``question`` and of the answer, attention over
        ``image`` by layer and head, grouped into words (``AttentionView``: a word's heat-map, the answer's
        words ranked by their attention to a box). ``answer=None``: the LMM answers first, as in ``chat``
        (``generation`` as there, unused for a given answer); else ``answer`` is read teacher-forced.
        ``history`` as in ``chat``. Memory: ``inspection`` says how much the maps take."""
        image = self.photo(image)
        return read_attention(self, image, question, answer, history, **generation)

    def photo(self, image: Image.Image | str | Path) -> Image.Image:
        """``image`` (a file, or a PIL image possibly still lazily opened) measured against
        ``image_limits``, decoded and oriented as viewers show it."""
        if isinstance(image, str | Path):
            return load_photo(image, self.image_limits)
        return _displayed_pil(image, self.image_limits)

    @torch.no_grad()
    def ground(self, image: Image.Image | str | Path, phrases: str | Sequence[str]) -> Grounding:
        """Grounds each phrase (a single string is one phrase) in ``image``, a file or a PIL image, taken as
        viewers show it: its EXIF orientation is applied, and the masks are at that orientation's size."""
        phrases = phrase_list(phrases)
        file_name = str(image) if isinstance(image, str | Path) else getattr(image, "filename", "")
        image = self.photo(image)
        sample = GroundingSample.for_inference(image, phrases, file_name=file_name or "input")
        encoded = self.encode.encode(sample)
        batch = move_data_to_device(self.collate([encoded]), self.device)
        prediction = self.model(batch)[0]
        masks = (prediction.fine_logits > 0).cpu()
        scores = mask_scores(prediction.fine_logits.cpu(), masks)
        boxes = torch.full((len(phrases), 4), -1.0)
        nonempty = masks.flatten(1).any(1)
        if nonempty.any():
            boxes[nonempty] = masks_to_boxes(masks[nonempty])
        return Grounding(phrases, masks, boxes, prediction.features.attention_maps.cpu(), image, scores)


def _displayed_pil(image: Image.Image, limits: ImageLimits) -> Image.Image:
    """A PIL image handed to ``ground`` (possibly still lazily opened) as viewers show it; its header is
    checked against ``limits`` before its pixels are read."""
    name = getattr(image, "filename", "") or "the image given"
    check_image(measure_image(image), limits, name)
    try:
        return as_displayed(image)
    except (OSError, SyntaxError, ValueError) as error:
        raise UnreadableImageError(f"cannot read image {name}: {type(error).__name__}: {error}") from error


class PhraseError(ValueError):
    """Phrases that cannot be grounded (none, a blank one, one that is not text)."""


def phrase_list(phrases: str | Sequence[str]) -> list[str]:
    """The phrases to ground: a plain string is one phrase (not one per character); numbers a config parsed
    (``phrases=[1984]``) are taken as their text; an empty list or a blank phrase is refused."""
    if OmegaConf.is_config(phrases):
        phrases = OmegaConf.to_container(phrases)
    if isinstance(phrases, str):
        phrases = [phrases]
    if not isinstance(phrases, Sequence) or not phrases:
        raise PhraseError(
            f"give at least one phrase to ground (a string or a list of strings), got {phrases!r}"
        )
    result = []
    for index, phrase in enumerate(phrases):
        if isinstance(phrase, bool) or not isinstance(phrase, str | int | float):
            raise PhraseError(f"phrase {index} is not text: {phrase!r}")
        if not str(phrase).strip():
            raise PhraseError(f"phrase {index} is blank")
        result.append(str(phrase))
    return result
