"""Trained heads shared as the Hugging Face ecosystem shares models: a directory holding the trainable
weights (``model.safetensors``), the model config a checkpoint stores (``flmm_config.json``) and a generated
model card (``README.md``). Nothing in it is a pickle: reading it runs no code whatever the files hold.

``runs.checkpoints.load_checkpoint`` reads such a directory wherever it reads a ``.ckpt``, so every entry
point takes one as ``ckpt=``; the config is checked (``config.stored``) and the weights against the model, as
for a ``.ckpt``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "flmm_config.json"
CARD_NAME = "README.md"


def is_pretrained_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory (a ``save_pretrained`` one, or meant to be: its files are checked when
    read)."""
    return Path(path).is_dir()


def save_pretrained(
    directory: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    metrics: Mapping[str, Mapping[str, float]] | None = None,
) -> Path:
    """Writes the trainable ``state_dict`` (the core's keys), the stored model ``config`` (plain containers,
    ``runs.build.run_config``) and a model card listing ``metrics`` (``metrics.json``'s ``{split: {name:
    value}}``) into ``directory``, created if needed. Returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in state_dict.items()}
    save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    (directory / CARD_NAME).write_text(model_card(config, metrics))
    return directory


def load_pretrained(directory: str | Path) -> dict[str, Any]:
    """``{"state_dict": ..., "flmm_config": ...}`` of a ``save_pretrained`` directory (the layout of a
    ``.ckpt``); a missing or unreadable file is an error naming it."""
    directory = Path(directory)
    weights, config = directory / WEIGHTS_NAME, directory / CONFIG_NAME
    for path in (weights, config):
        if not path.is_file():
            raise FileNotFoundError(f"{directory} is not a save_pretrained directory: {path.name} is missing")
    try:
        state_dict = load_file(weights)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"cannot read {weights} as safetensors: {error}") from error
    try:
        stored = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read {config} as JSON: {error}") from error
    if not isinstance(stored, dict):
        raise ValueError(f"{config} holds a {type(stored).__name__}, not a model config")
    return {"state_dict": state_dict, "flmm_config": stored}


def model_card(config: Mapping[str, Any], metrics: Mapping[str, Mapping[str, float]] | None = None) -> str:
    """A Markdown model card: the LMM, SAM and data of ``config``, how to load it, ``metrics`` as a table."""
    model, sam = config.get("model", {}), config.get("sam", {})
    data = config.get("data") or {}
    splits = sorted({*data.get("train_sets", {}), *data.get("test_sets", {})}) if data else []
    lines = [
        "---",
        "library_name: flmm-lightning",
        "tags: [f-lmm, grounding, referring-segmentation, segment-anything]",
        "---",
        "",
        f"# F-LMM heads for {model.get('name', 'an LMM')}",
        "",
        "Trained heads of F-LMM (a U-Net mask head and a SAM prompt encoder + mask decoder) that ground "
        "phrases in images by reading a frozen LMM's attention. The LMM and SAM's image encoder are not "
        "included.",
        "",
        f"- LMM: `{model.get('pretrained', '?')}` (model config `{model.get('name', '?')}`)",
        f"- SAM: `{sam.get('name', '?')}`",
        f"- data: {', '.join(f'`{s}`' for s in splits) if splits else 'not stored'}",
        "",
        "```python",
        "from flmm_lightning.inference.grounder import Grounder",
        "",
        'grounder = Grounder.from_pretrained("<this directory or hub id>")',
        'grounding = grounder.ground("photo.jpg", ["the dog"])',
        "```",
        "",
        "or `python -m flmm_lightning.eval ckpt=<this directory>`.",
    ]
    if metrics:
        names = sorted({name for values in metrics.values() for name in values})
        lines += [
            "",
            "## Metrics",
            "",
            "| split | " + " | ".join(names) + " |",
            "|---" * (len(names) + 1) + "|",
        ]
        for split, values in metrics.items():
            cells = [_figure(values.get(name)) for name in names]
            lines.append(f"| {split} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _figure(value: float | None) -> str:
    return "" if value is None or value != value else f"{value:.4f}"
