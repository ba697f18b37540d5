"""Look inside the frozen LMM: every question and answer token's attention over the image, by word.

One teacher-forced forward over the conversation prompt and the answer (generated as in chat, or given)
reads the attention through the training capture path (``HFGroundingAdapter.read``), from the question's
first token to the answer's last, so an answer token's map is exactly what chat merges into a phrase's map.
``AttentionView`` keeps the question's and the answer's token maps and offers the two views the web app
shows: a word's heat-map over the image and the answer's words ranked by their attention to a box.

Memory: ``maps`` holds ``T * L * H * h * w`` float32 (``T`` question and answer tokens), on the host: a few
kB per token for the tiny models, 1.8 MB per token for a 7B model with 28 layers x 28 heads on a 24x24 grid
(about 0.5 GB for a 300-token question and answer); the forward's readout holds the same on the device.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from flmm_lightning.heads.unet import crop_to_content
from flmm_lightning.inference.conversation import GroundedAnswer, check_question, turn_texts
from flmm_lightning.inference.pipeline import (
    GroundingRunner,
    Turn,
    encode_turn,
    fitting_prompt,
    generate,
    image_sample,
    read,
)
from flmm_lightning.lmm.hf import DEFAULT_MAX_NEW_TOKENS
from flmm_lightning.selection import token_char_offsets
from flmm_lightning.selection.phrases import token_span_of

PARTS = ("question", "answer")
# Stands for the question while the chat template's text after it is worked out (no template changes it).
_QUESTION_MARK = "QUESTIONx7f3aSENTINEL"

Span = tuple[int, int]


@dataclass
class AttentionWord:
    """One whitespace-separated word of the question or the answer and the rows of its tokens."""

    text: str  # == (question or answer)[char_span[0]:char_span[1]]
    part: str  # "question" | "answer"
    char_span: Span  # in that part's text (code points)
    token_span: Span  # rows of ``AttentionView.maps``


@dataclass
class AttentionView:
    """Every question and answer token's attention over the image tokens, by layer and head.

    ``maps`` cover the processed image's grid, padding included: ``padded_hw`` (pixels) is what the grid
    covers and ``content_box`` ``(top, left, height, width)`` where the image lies in it (None: the grid
    covers exactly the image). LLaVA-NeXT's layer axis holds ``2 L`` entries: the base grid's layers
    (resized to the any-res grid) then the any-res grid's, as its grounding channels are stacked.
    """

    question: str
    answer: str
    words: list[AttentionWord]  # question words then answer words, in order
    maps: torch.Tensor  # float [T, L, H, h, w]: the question's tokens, then the answer's
    image: Image.Image  # as displayed (EXIF orientation applied)
    padded_hw: tuple[int, int] | None = None
    content_box: tuple[int, int, int, int] | None = None
    dropped_turns: int = 0  # earlier turns left out of the prompt so that it fit the LMM's context

    @property
    def num_layers(self) -> int:
        return self.maps.shape[1]

    @property
    def num_heads(self) -> int:
        return self.maps.shape[2]

    def word_map(self, word: int, layer: int | None = None, head: int | None = None) -> torch.Tensor:
        """float ``[h', w']``: the mean over ``word``'s tokens of their attention at ``layer`` / ``head``
        (the mean over layers / heads when None), on the grid cells that cover the image (padding cut)."""
        _check_index("word", word, len(self.words))
        _check_index("layer", layer, self.num_layers)
        _check_index("head", head, self.num_heads)
        first, last = self.words[word].token_span
        maps = self.maps[first:last].float().mean(dim=0)  # [L, H, h, w]
        maps = maps.mean(dim=0) if layer is None else maps[layer]  # [H, h, w]
        return self._content(maps.mean(dim=0) if head is None else maps[head])

    def _content(self, grid: torch.Tensor) -> torch.Tensor:
        """The cells of ``grid`` ``[..., h, w]`` that cover the image (the processor's padding cut)."""
        if self.content_box is None:
            return grid
        return crop_to_content(grid, self.padded_hw, self.content_box)

    def heatmap(self, word: int, layer: int | None = None, head: int | None = None) -> np.ndarray:
        """float32 ``[image.height, image.width]`` in [0, 1]: ``word_map`` resized bilinearly to the image
        as displayed and divided by its maximum (a map of zeros stays zeros)."""
        grid = self.word_map(word, layer, head)
        size = (self.image.height, self.image.width)
        resized = F.interpolate(grid[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
        peak = resized.max()
        if peak > 0:
            resized = resized / peak
        return resized.clamp(0.0, 1.0).numpy().astype(np.float32)

    def rank_region(self, box_xyxy: Sequence[float], part: str = "answer") -> list[tuple[int, float]]:
        """``(word index, share)`` for each word of ``part``, highest share first: the share of the word's
        layer- and head-mean image attention that falls in ``box_xyxy``, ``(x0, y0, x1, y1)`` in pixels of
        the displayed image (edges: ``(0, 0, width, height)`` is the whole image). Each grid cell covers a
        rectangle of the image and counts with the part of its area inside the box."""
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        weights = self._box_weights(box_xyxy)
        ranked = []
        for index, word in enumerate(self.words):
            if word.part != part:
                continue
            grid = self.word_map(index).double()  # [h', w']
            total = float(grid.sum())
            share = float((grid * weights).sum()) / total if total > 0 else 0.0
            ranked.append((index, min(max(share, 0.0), 1.0)))
        return sorted(ranked, key=lambda item: -item[1])

    def _box_weights(self, box_xyxy: Sequence[float]) -> torch.Tensor:
        """float64 ``[h', w']``: the part of each content cell's image area that lies in the box."""
        if len(box_xyxy) != 4:
            raise ValueError(f"a box is (x0, y0, x1, y1), got {box_xyxy!r}")
        x0, y0, x1, y1 = (float(v) for v in box_xyxy)
        width, height = self.image.width, self.image.height
        if x1 < x0 or y1 < y0:
            raise ValueError(f"box {tuple(box_xyxy)}: x1 < x0 or y1 < y0; give (x0, y0, x1, y1)")
        if not (0 <= x0 and x1 <= width and 0 <= y0 and y1 <= height):
            raise ValueError(
                f"box {tuple(box_xyxy)} reaches outside the {width}x{height} image: keep 0 <= x0 <= x1 <= "
                f"{width} and 0 <= y0 <= y1 <= {height}"
            )
        rows, columns = self._content(self.maps[0, 0, 0]).shape
        return torch.outer(_overlaps(y0, y1, height, rows), _overlaps(x0, x1, width, columns))


def _overlaps(start: float, end: float, length: int, cells: int) -> torch.Tensor:
    """float64 ``[cells]``: the part of each of ``cells`` equal cells over ``[0, length]`` inside
    ``[start, end]``."""
    edges = torch.linspace(0.0, float(length), cells + 1, dtype=torch.float64)
    inside = edges[1:].clamp(max=end) - edges[:-1].clamp(min=start)
    return inside.clamp(min=0.0) / (edges[1:] - edges[:-1])


def _check_index(name: str, index: int | None, count: int) -> None:
    if index is None:
        return
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
        raise ValueError(f"{name} must be an int in [0, {count - 1}], got {index!r}")


def _words(text: str, offsets: Sequence[Span], part: str, first_row: int) -> list[AttentionWord]:
    """The whitespace-separated words of ``text`` whose tokens (``offsets``: each token's characters in
    ``text``) are rows ``first_row ...`` of the maps."""
    words = []
    for match in re.finditer(r"\S+", text):
        first, last = token_span_of(offsets, match.span())
        words.append(AttentionWord(match.group(), part, match.span(), (first_row + first, first_row + last)))
    return words


def _match_backwards(tail: str, end: int, text: str) -> list[int]:
    """For each character of ``text``, its index in ``tail``, matching ``text`` backwards from ``tail[end]``
    (exclusive) on: whitespace is skipped on both sides (-1 for ``text``'s), as templates and decoding may
    change it. ValueError when the other characters differ."""
    positions = [-1] * len(text)
    for index in reversed(range(len(text))):
        if text[index].isspace():
            continue
        end -= 1
        while end >= 0 and tail[end].isspace():
            end -= 1
        if end < 0 or tail[end] != text[index]:
            raise ValueError(f"the question does not decode back from the prompt's tokens: {tail!r}")
        positions[index] = end
    return positions


def _question_offsets(tail: str, suffix: str, question: str) -> tuple[Span, list[int]]:
    """Where ``question`` lies in ``tail`` (the decoded prompt after the image, ending with the template's
    ``suffix``): the span of its characters in ``tail`` and each of its characters' index in ``tail``."""
    after = [p for p in _match_backwards(tail, len(tail), suffix) if p >= 0]
    mapping = _match_backwards(tail, after[0] if after else len(tail), question)
    placed = [p for p in mapping if p >= 0]
    return (placed[0], placed[-1] + 1), mapping


def _in_question(offsets: Sequence[Span], mapping: Sequence[int]) -> list[Span]:
    """The question tokens' character spans in the question: ``offsets`` (in the tail) through ``mapping``
    (each question character's index in the tail); a token holding no question character gets ``(0, 0)``."""
    spans = []
    for start, end in offsets:
        inside = [index for index, position in enumerate(mapping) if start <= position < end]
        spans.append((inside[0], inside[-1] + 1) if inside else (0, 0))
    return spans


@torch.no_grad()
def read_attention(
    grounder: GroundingRunner,
    image: Image.Image,
    question: str,
    answer: str | None = None,
    history: Sequence[GroundedAnswer | Turn] | None = None,
    **generation: Any,
) -> AttentionView:
    """``Grounder.attention`` (which documents the arguments); ``image`` is an RGB PIL image as displayed."""
    check_question(question)
    lmm = grounder.lmm
    builder = grounder.encode.prompt_builder
    tokenizer = grounder.tokenizer
    turns = turn_texts(history)
    sample = image_sample(image)
    if answer is None:
        room = int(generation.setdefault("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        prompt, dropped = fitting_prompt(grounder, sample, turns, question, room)
        answer_ids = generate(grounder, sample, prompt, **generation)
        answer, answer_offsets = token_char_offsets(tokenizer, answer_ids)
    else:
        if not isinstance(answer, str):
            raise ValueError(f"the answer must be text (or None to let the LMM answer), got {answer!r}")
        encoded = tokenizer(answer, add_special_tokens=False, return_offsets_mapping=True)
        answer_ids, answer_offsets = encoded["input_ids"], [tuple(span) for span in encoded["offset_mapping"]]
        prompt, dropped = fitting_prompt(grounder, sample, turns, question, len(answer_ids))

    turn = encode_turn(grounder, sample, prompt, answer_ids)
    batch = turn.lmm
    input_ids = batch.input_ids[0].cpu()  # [S]
    answer_start = int(batch.utterance_start[0])
    after_image = int((input_ids == lmm.image_token_id).nonzero().max()) + 1
    tail, tail_offsets = token_char_offsets(
        tokenizer, input_ids[after_image:answer_start].tolist(), skip_special_tokens=False
    )
    marked = builder.conversation_prompt(turns[dropped:], _QUESTION_MARK)
    suffix = marked[marked.rindex(_QUESTION_MARK) + len(_QUESTION_MARK) :]
    question_chars, mapping = _question_offsets(tail, suffix, question)
    first, last = token_span_of(tail_offsets, question_chars)  # the question's tokens in the tail
    question_start = after_image + first

    # Read from the question's first token on: its tokens, the template's between, the answer's.
    from_question = dataclasses.replace(batch, utterance_start=torch.tensor([question_start]))
    readout = read(grounder, dataclasses.replace(turn, lmm=from_question))
    rows = torch.cat(
        [torch.arange(last - first), torch.arange(len(answer_ids)) + answer_start - question_start]
    )  # [T] rows of the readout: the question's tokens, the answer's
    attention = readout.attention[0, :, :, :, : int(readout.image_token_counts[0])].float()  # [L, H, T_r, N]
    attention = attention[:, :, rows.to(attention.device)].permute(2, 0, 1, 3)  # [T, L, H, N]
    maps = lmm.image_maps(attention, batch.grid_hw[0]).cpu()  # [T, C, h, w]
    maps = maps.reshape(maps.shape[0], -1, lmm.num_heads, *maps.shape[-2:])  # [T, C / H, H, h, w]

    words = _words(question, _in_question(tail_offsets[first:last], mapping), "question", 0)
    words += _words(answer, answer_offsets, "answer", last - first)
    return AttentionView(
        question=question,
        answer=answer,
        words=words,
        maps=maps,
        image=image,
        padded_hw=batch.padded_hw[0],
        content_box=batch.content_box[0],
        dropped_turns=dropped,
    )
