"""Ground phrases in an image with a trained checkpoint.

CLI: ``python -m flmm_lightning.predict ckpt=<path> image=<file> phrases='[a man, the ball]'`` writes an
overlay PNG and a JSON (each mask as COCO RLE with its box); ``phrases='a man'`` grounds one phrase;
``query='what keeps the rain off'`` instead segments what the LMM's answer to the query names (reasoning
segmentation; the JSON holds the answer too). ``inputs=<manifest>`` instead of ``image=`` grounds every
input of a manifest in batches (``batch_predict``; docs/batch-prediction.md). In Python:
``Grounder.from_checkpoint(path).ground(image, phrases)`` and ``.segment(image, query)``. Photos are
grounded as viewers show them (EXIF orientation applied), so masks and overlay line up with the displayed
image.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from flmm_lightning.common.masks import mask_record
from flmm_lightning.config.composition import register_resolvers
from flmm_lightning.config.settings import (
    CHECKPOINT_GROUPS,
    chosen_checkpoint_groups,
    generation_settings,
    refuse_checkpoint_groups,
)
from flmm_lightning.data.images import (
    ImageLimits,
    UnreadableImageError,
    load_photo,
)
from flmm_lightning.inference.batch import ManifestError, OutputMismatchError, predict_batch
from flmm_lightning.inference.conversation import ChatInputError
from flmm_lightning.inference.grounder import Grounder, PhraseError, phrase_list
from flmm_lightning.inference.reasoning import EmptyAnswerError
from flmm_lightning.outputs.documents import empty_mask_notices, json_document
from flmm_lightning.outputs.overlays import overlay_masks
from flmm_lightning.runs.build import output_dir_of
from flmm_lightning.runs.folders import claim_run_dir, mark_latest
from flmm_lightning.runs.task import task_wrapper

register_resolvers()


class PredictInputError(ValueError):
    """A predict command that names neither or both of ``phrases`` and ``query``."""


def predict(cfg: DictConfig) -> tuple[Path, Path]:
    """Grounds ``cfg.phrases`` in ``cfg.image``, or segments what the LMM's answer to ``cfg.query`` names;
    returns the paths of the overlay PNG and the masks JSON."""
    if (cfg.get("phrases") is None) == (cfg.get("query") is None):
        given = "both" if cfg.get("phrases") is not None else "neither"
        raise PredictInputError(
            f"give exactly one of phrases=[...] (ground these phrases) and query='...' (reasoning "
            f"segmentation: the LMM answers, its answer is segmented); {given} given"
        )
    refuse_checkpoint_groups(chosen_checkpoint_groups(cfg), "predict")
    image_path = Path(cfg.image)
    image_limits = ImageLimits.from_config(cfg.get("image_limits") or {})
    image = load_photo(image_path, image_limits)  # before the model loads: a bad file fails in a second
    phrases = phrase_list(cfg.phrases) if cfg.get("phrases") is not None else None
    output_dir = output_dir_of(cfg)
    claim_run_dir(output_dir)
    patches = {key: cfg[key] for key in CHECKPOINT_GROUPS if cfg.get(key) is not None}
    grounder = Grounder.from_checkpoint(cfg.ckpt, device=cfg.device, paths=cfg.paths, overrides=patches)
    grounder.image_limits = image_limits
    if phrases is not None:
        grounding = grounder.ground(image, phrases)
        overlay = overlay_masks(grounding.image, grounding.masks, grounding.phrases)
        document = {"image": str(image_path), "objects": grounding.to_json()}
        notices = empty_mask_notices(document["objects"])
    else:
        result = grounder.segment(image, str(cfg.query), **generation_settings(cfg))
        overlay = overlay_masks(result.image, result.mask[None], [result.answer])
        document = {
            "image": str(image_path),
            "query": result.query,
            "question": result.question,
            "answer": result.answer,
            **mask_record(result.mask, result.box),
        }
        notices = empty_mask_notices([document], label="query")
    output_dir.mkdir(parents=True, exist_ok=True)
    mark_latest(output_dir)
    overlay_path = output_dir / f"{image_path.stem}_overlay.png"
    overlay.save(overlay_path)
    json_path = output_dir / f"{image_path.stem}_masks.json"
    text, notices = json_document(document, notices)
    json_path.write_text(text)
    for notice in notices:
        print(f"notice: {notice}")
    print(f"overlay: {overlay_path}\nmasks:   {json_path}")
    return overlay_path, json_path


# A bad manifest, input file, phrase list or query is the user's to fix: one line, no traceback.
USER_ERRORS = (
    ManifestError,
    OutputMismatchError,
    UnreadableImageError,
    PhraseError,
    PredictInputError,
    ChatInputError,
    EmptyAnswerError,
)


@task_wrapper("predict", user_errors=USER_ERRORS, checkpoint_groups=True)
def predict_command(cfg: DictConfig) -> None:
    """The command line's work: every input of the manifest ``inputs``, else the one ``image``."""
    if cfg.get("inputs") is None:
        predict(cfg)
        return
    summary = predict_batch(cfg)
    if summary.failed:
        raise SystemExit(f"predict: {summary.failed} of {summary.inputs} inputs failed (error lines)")


main = predict_command.main

if __name__ == "__main__":
    main()
