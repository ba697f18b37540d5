"""Convert a released F-LMM checkpoint (``wusize/F-LMM``, a ``.pth``) into a checkpoint of this project.

    python -m flmm_lightning.convert OFFICIAL.pth OUT.ckpt --model llava_1_5_7b [--sam vit_l] [--data refcoco]
        [config overrides, e.g. paths.checkpoint_dir=/sam/weights model.pretrained=/local/llava]

The official ``.pth`` is read with ``torch.load(weights_only=True)`` only: a file that needs anything but
tensors and plain containers is refused before any object it names is created. Every key is mapped
explicitly (``official_to_core``): the trainable parts by name, the frozen ones (the LMM, SAM's image
encoder) dropped by their prefix; any other key is an error naming it. The mapped weights are then checked
against the model the config builds (a missing or misshapen key is an error naming it) and written in the
format training writes, so ``eval``, ``predict``, ``chat`` and ``app`` load the result with ``ckpt=``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from hydra.errors import HydraException
from omegaconf import DictConfig

from flmm_lightning.config.composition import CONF_DIR, register_resolvers
from flmm_lightning.core import CheckpointMismatchError
from flmm_lightning.runs.build import build_module, run_config

# The official wrapper's attribute that holds the frozen LMM, per adapter class of ours.
OFFICIAL_LMM_ATTRIBUTE = {
    "flmm_lightning.lmm.llava.LlavaAdapter": "llava",  # FrozenLlavaSAM
    "flmm_lightning.lmm.llava_next.LlavaNextAdapter": "llava",  # FrozenLlavaNextSAM
    "flmm_lightning.lmm.deepseek_vl.DeepseekVLAdapter": "deepseek_vl",  # FrozenDeepseekVLSAM
}
# Official key prefix -> our core's, for the trainable parts (the same in every official family).
TRAINABLE_PREFIXES = (
    ("mask_head.", "mask_head."),  # UNetHead (MMSeg UNet): our UNetMaskHead keeps its parameter names
    ("text_proj.", "lmm.text_proj."),
    ("sam.model.prompt_encoder.", "sam.sam.prompt_encoder."),  # SAMWrapper.model is our SamRefiner.sam
    ("sam.model.mask_decoder.", "sam.sam.mask_decoder."),
)
TRAINABLE_NAMES = {"text_layer_weights": "lmm.text_layer_weights"}
# Frozen in the official model and in ours: present in a full state dict, never trained, not kept.
FROZEN_SAM_PREFIX = "sam.model.image_encoder."


class OfficialCheckpointError(ValueError):
    """An official checkpoint that cannot be read safely or has keys this converter does not know."""


def read_official(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of an official ``.pth``: a flat ``{name: tensor}`` or one under ``"state_dict"``
    (an mmengine checkpoint). Read with ``weights_only=True``: anything else is refused, naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"official checkpoint not found: {path}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - re-raised with the file named
        raise OfficialCheckpointError(
            f"refusing {path}: it cannot be read as tensors and plain containers (torch.load with "
            f"weights_only=True): {error}"
        ) from error
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise OfficialCheckpointError(f"{path} holds a {type(loaded).__name__}, not a state dict")
    not_tensors = [str(key) for key, value in loaded.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise OfficialCheckpointError(f"{path}: entries that are not tensors: {', '.join(not_tensors[:10])}")
    return dict(loaded)


def official_to_core(
    state_dict: Mapping[str, torch.Tensor], lmm_attribute: str, source: str = "checkpoint"
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Maps an official state dict to our core's keys (``FLMM.trainable_state_dict``).

    ``lmm_attribute``: the official wrapper's name of its frozen LMM (``OFFICIAL_LMM_ATTRIBUTE``). Returns
    the mapped tensors and the dropped frozen keys; a key that is neither raises, naming it and ``source``."""
    frozen_prefixes = (f"{lmm_attribute}.", FROZEN_SAM_PREFIX)
    mapped: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    unmapped: list[str] = []
    for key, tensor in state_dict.items():
        if key in TRAINABLE_NAMES:
            mapped[TRAINABLE_NAMES[key]] = tensor
        elif key.startswith(frozen_prefixes):
            dropped.append(key)
        else:
            target = next(
                (ours + key[len(theirs) :] for theirs, ours in TRAINABLE_PREFIXES if key.startswith(theirs)),
                None,
            )
            if target is None:
                unmapped.append(key)
            else:
                mapped[target] = tensor
    if unmapped:
        raise OfficialCheckpointError(
            f"{source}: keys that are not part of an official F-LMM model with a {lmm_attribute!r} LMM: "
            f"{', '.join(unmapped[:10])}"
            + (f" (and {len(unmapped) - 10} more)" if len(unmapped) > 10 else "")
        )
    return mapped, dropped


def compose_model_config(model: str, sam: str, data: str | None, overrides: Sequence[str]) -> DictConfig:
    """The training config of ``model`` with ``sam`` (and ``data``, else none), as ``train`` composes it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    register_resolvers()
    choices = [f"model={model}", f"sam={sam}", f"data={data}" if data else "~data", "logger=none"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*choices, *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def convert(official: str | Path, output: str | Path, cfg: DictConfig) -> dict[str, int]:
    """Writes ``output`` (must not exist) from the official checkpoint ``official`` for the model of ``cfg``
    (a composed training config). Returns how many tensors were kept and dropped."""
    output = Path(output)
    if output.exists():
        raise FileExistsError(f"{output} exists; choose a new output path")
    state_dict = read_official(official)
    target = cfg.model.lmm._target_
    if target not in OFFICIAL_LMM_ATTRIBUTE:
        raise OfficialCheckpointError(
            f"model={cfg.model.name} ({target}) has no official F-LMM release; official families: "
            f"{', '.join(sorted(OFFICIAL_LMM_ATTRIBUTE))}"
        )
    mapped, dropped = official_to_core(state_dict, OFFICIAL_LMM_ATTRIBUTE[target], source=str(official))
    stored = run_config(cfg)
    module = build_module(cfg)
    try:
        module.load_checkpoint_weights(mapped)
    except CheckpointMismatchError as error:
        raise CheckpointMismatchError(
            f"{official} (model={cfg.model.name}, sam={cfg.sam.name}): {error}"
        ) from None
    output.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed, so an interrupted conversion leaves no partial checkpoint.
    handle, partial = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".partial")
    os.close(handle)
    try:
        torch.save({"state_dict": module.state_dict(), "flmm_config": stored}, partial)
        os.replace(partial, output)
    finally:
        Path(partial).unlink(missing_ok=True)
    return {"kept": len(mapped), "dropped": len(dropped)}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="flmm-convert",
        description="Convert a released F-LMM checkpoint (wusize/F-LMM .pth) into an flmm-lightning .ckpt.",
    )
    parser.add_argument("official", help="the official .pth (read with weights_only=True)")
    parser.add_argument("output", help="the .ckpt to write (must not exist)")
    parser.add_argument("--model", required=True, help="our model config (conf/model), e.g. llava_1_5_7b")
    parser.add_argument("--sam", default="vit_l", help="our SAM config (conf/sam); the releases use vit_l")
    parser.add_argument(
        "--data", default=None, help="a data config to store for eval (conf/data), e.g. refcoco"
    )
    parser.add_argument(
        "overrides", nargs="*", help="config overrides, e.g. paths.checkpoint_dir=/sam/weights"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = compose_model_config(args.model, args.sam, args.data, args.overrides)
    except HydraException as error:
        raise SystemExit(f"error: model={args.model} sam={args.sam} data={args.data}: {error}") from None
    try:
        counts = convert(args.official, args.output, cfg)
    except (OfficialCheckpointError, CheckpointMismatchError, FileExistsError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    print(
        f"wrote {args.output}: {counts['kept']} trainable tensors of {args.official}; "
        f"{counts['dropped']} frozen tensors (LMM, SAM image encoder) not kept"
    )


if __name__ == "__main__":
    main()
