"""A grounded chat turn's files: its overlay (each phrase's mask in its colour) and its JSON, as the chat
command, the web app and training's after-fit chat turn write them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from flmm_lightning.inference.conversation import GroundedAnswer
from flmm_lightning.inference.grounder import Grounding
from flmm_lightning.outputs.documents import empty_mask_notices, json_document
from flmm_lightning.outputs.overlays import overlay_masks


def turn_record(turn: GroundedAnswer) -> dict[str, Any]:
    """The JSON of a turn: question, answer and per phrase ``predict``'s record of its mask (COCO RLE at the
    image's size, inclusive box, area, mask score) with the phrase's text, character and token spans and
    selector score."""
    boxes = torch.tensor([phrase.box or (-1.0,) * 4 for phrase in turn.phrases]).reshape(-1, 4)
    maps = [phrase.attention_map for phrase in turn.phrases]
    grounding = Grounding(
        [phrase.text for phrase in turn.phrases],
        turn.masks,
        boxes,
        torch.stack(maps) if maps else torch.zeros(0),
        turn.image,
        torch.tensor([phrase.mask_score for phrase in turn.phrases]),
    )
    phrases = []
    for phrase, record in zip(turn.phrases, grounding.to_json(), strict=True):
        del record["phrase"]
        phrases.append(
            {
                "text": phrase.text,
                "char_span": list(phrase.char_span),
                "token_span": list(phrase.token_span),
                "score": phrase.score,
                **record,
            }
        )
    return {"question": turn.question, "answer": turn.answer, "selector": turn.selector, "phrases": phrases}


def write_turn(turn: GroundedAnswer, output_dir: Path, number: int) -> tuple[Path, Path]:
    """``turn_<number>_overlay.png`` (each phrase's mask in its colour, legend in answer order) and
    ``turn_<number>.json`` in ``output_dir``."""
    overlay_path = output_dir / f"turn_{number:02d}_overlay.png"
    overlay_masks(turn.image, turn.masks, [phrase.text for phrase in turn.phrases]).save(overlay_path)
    json_path = output_dir / f"turn_{number:02d}.json"
    record = turn_record(turn)
    json_path.write_text(json_document(record, empty_mask_notices(record["phrases"], label="text"))[0])
    return overlay_path, json_path
