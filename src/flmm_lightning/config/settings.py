"""What a person typed, checked before anything is built: settings that pick one of a few behaviours, and
settings an entry point does not take. A typo must stop the run naming the key, never fall back to some
default behaviour (``stage=tset`` used to evaluate the test splits)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from flmm_lightning.config.errors import ConfigError
from flmm_lightning.data.bad_samples import ON_BAD_SAMPLE_CHOICES
from flmm_lightning.data.refcoco import ACCEPTED_TEXT_MODES
from flmm_lightning.heads.sam_attention import ENCODER_ATTENTIONS
from flmm_lightning.lmm.capture import CAPTURES
from flmm_lightning.lmm.hf import TORCH_DTYPES
from flmm_lightning.lmm.readout import MERGE_MODES

_DATASET_GROUPS = ("train_sets", "val_sets", "test_sets")
# key -> allowed values; ``*`` stands for any dataset's name. Each list is the one the code itself accepts,
# so the two cannot drift apart.
CHOICES: dict[str, tuple[str, ...]] = {
    "stage": ("test", "val"),
    "model.lmm.capture": tuple(CAPTURES),
    "model.lmm.merge": MERGE_MODES,
    "model.lmm.torch_dtype": ("auto", *TORCH_DTYPES),
    "sam.refiner.encoder_attention": ENCODER_ATTENTIONS,
    **{f"data.{group}.*.text_mode": ACCEPTED_TEXT_MODES for group in _DATASET_GROUPS},
    **{f"data.{group}.*.on_bad_sample": ON_BAD_SAMPLE_CHOICES for group in _DATASET_GROUPS},
}

# Settings renamed, by their earlier spelling: one name for the generation length in train (its chat turn and
# ReasonSeg after fitting), chat, predict, eval and the app. A command line with an earlier spelling stops
# naming the new one.
RENAMED: dict[str, str] = {
    "max_new_tokens": "generation.max_new_tokens",
    "reasonseg.max_new_tokens": "generation.max_new_tokens",
    "chat_after_fit.max_new_tokens": "generation.max_new_tokens",
    "reasonseg_after_fit.max_new_tokens": "generation.max_new_tokens",
}

# Where eval and predict take the model from: the checkpoint, never the command line.
CHECKPOINT_GROUPS = ("model", "sam", "module")


def _values(node: Any, parts: list[str], prefix: str) -> Iterator[tuple[str, Any]]:
    """(key, value) of every key matching ``parts`` under ``node``; a missing key is not a setting."""
    if not parts:
        yield prefix, node
        return
    if not isinstance(node, DictConfig):
        return
    head, rest = parts[0], parts[1:]
    names = list(node.keys()) if head == "*" else [head] if head in node else []
    for name in names:
        yield from _values(node[name], rest, f"{prefix}.{name}" if prefix else str(name))


def check_choices(cfg: DictConfig) -> None:
    """Raises ``ConfigError`` naming every enumerated setting of ``cfg`` with an unknown value."""
    cfg = cfg if OmegaConf.is_config(cfg) else OmegaConf.create(cfg)
    problems = [
        f"{key}={value!r}: must be one of {', '.join(allowed)}"
        for pattern, allowed in CHOICES.items()
        for key, value in _values(cfg, pattern.split("."), "")
        if value not in allowed
    ]
    if problems:
        raise ConfigError("unknown value: " + "; ".join(problems))


# What a whole config group chosen on the command line (``model=<name>``) holds, unlike a patch of one stored
# setting (``++model.pretrained=<dir>``), which leaves the rest of the checkpoint's section as it was.
_GROUP_MARKERS = {"model": "lmm", "sam": "refiner", "module": "_target_"}


def chosen_checkpoint_groups(cfg: DictConfig) -> list[str]:
    """The model, SAM and module groups that a composed eval/predict config chose as a whole."""
    return [
        group
        for group, marker in _GROUP_MARKERS.items()
        if isinstance(cfg.get(group), DictConfig) and marker in cfg[group]
    ]


def refuse_checkpoint_groups(overrides: Sequence[str], entry_point: str) -> None:
    """``eval`` and ``predict`` rebuild the model from the checkpoint: a ``model=``, ``+model=``, ``sam=``,
    ``module.*`` ... override would be ignored (or fail with Hydra's "No match in the defaults list"). A
    ``++<group>.<key>=<value>`` patch of one stored setting is allowed."""
    for override in overrides:
        key = override.split("=", 1)[0]
        if key.startswith("++") and "." in key:
            continue
        key = key.lstrip("~+")
        group = key.split("@", 1)[0].split(".", 1)[0].split("/", 1)[0]
        if group in CHECKPOINT_GROUPS:
            raise ConfigError(
                f"{entry_point}: `{override}`: the model, SAM and module settings come from the checkpoint "
                f"(ckpt=...), {entry_point} takes no {group} override (`++{group}.<key>=<value>` patches one "
                "stored setting); to use another model, pass its checkpoint"
            )


def refuse_renamed(overrides: Sequence[str], entry_point: str) -> None:
    """Raises ``ConfigError`` for an override that uses a setting's earlier name (``RENAMED``), naming the
    new one (Hydra would only call it an unknown key)."""
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("~+")
        if key in RENAMED:
            value = override.split("=", 1)[1] if "=" in override else "<value>"
            raise ConfigError(
                f"{entry_point}: `{override}`: {key} is now {RENAMED[key]}; write {RENAMED[key]}={value}"
            )


def generation_settings(cfg: DictConfig) -> dict[str, Any]:
    """``cfg.generation`` (``max_new_tokens``, sampling settings) without its unset (null) values: the keyword
    arguments of ``generate`` that every entry point passes on."""
    settings = OmegaConf.to_container(cfg.get("generation") or {}, resolve=True)
    return {key: value for key, value in settings.items() if value is not None}
