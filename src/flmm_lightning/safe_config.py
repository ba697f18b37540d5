"""The config stored in a checkpoint is data from a stranger: check it before anything is built from it.

``eval``, ``predict``, ``Grounder.from_checkpoint`` and a training resume rebuild the model with Hydra's
``instantiate``, which imports and calls whatever a ``_target_`` names. ``torch.load(weights_only=True)``
keeps pickled code out of a checkpoint, not a ``_target_: shutil.rmtree``. So every node of a stored config
is checked first, recursively, and one that could run anything but this project's own classes is refused
with an error naming its key; nothing is created before the whole config passed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

# Every class or function a stored config may name: those that the model, SAM, module and data configs of
# conf/ use (tests/test_safe_config.py keeps this list and conf/ in step), plus torch's own optimizers
# (``module.optimizer._target_=torch.optim.SGD`` must not make a checkpoint unreadable).
ALLOWED_TARGETS = frozenset(
    {
        "flmm_lightning.model.FLMMModule",
        "flmm_lightning.heads.unet.UNetMaskHead",
        "flmm_lightning.heads.sam_refiner.SamRefiner",
        "flmm_lightning.heads.sam_refiner.build_sam",
        "flmm_lightning.assets.sam.build_tiny_sam",
        "flmm_lightning.lmm.deepseek_vl.DeepseekVLAdapter",
        "flmm_lightning.lmm.deepseek_vl.DeepseekVLPromptBuilder",
        "flmm_lightning.lmm.gemma3.Gemma3Adapter",
        "flmm_lightning.lmm.gemma3.Gemma3PromptBuilder",
        "flmm_lightning.lmm.internvl.InternVLAdapter",
        "flmm_lightning.lmm.internvl.InternVLPromptBuilder",
        "flmm_lightning.lmm.llava.LlavaAdapter",
        "flmm_lightning.lmm.llava.LlavaPromptBuilder",
        "flmm_lightning.lmm.llava_next.LlavaNextAdapter",
        "flmm_lightning.lmm.llava_next.LlavaNextPromptBuilder",
        "flmm_lightning.lmm.llava_onevision.LlavaOnevisionAdapter",
        "flmm_lightning.lmm.llava_onevision.LlavaOnevisionPromptBuilder",
        "flmm_lightning.lmm.qwen2_vl.Qwen2VLAdapter",
        "flmm_lightning.lmm.qwen2_vl.Qwen2VLPromptBuilder",
        "flmm_lightning.lmm.qwen3_vl.Qwen3VLAdapter",
        "flmm_lightning.lmm.qwen3_vl.Qwen3VLPromptBuilder",
        "flmm_lightning.data.datamodule.GroundingDataModule",
        "flmm_lightning.data.png.PNGDataset",
        "flmm_lightning.data.reasonseg.ReasonSegDataset",
        "flmm_lightning.data.refcoco.RefCocoDataset",
        "torch.optim.AdamW",
    }
)

# Hydra's instantiation keys other than ``_target_`` and the values each may take.
_CONVERT_MODES = ("none", "partial", "object", "all")

# Interpolations a stored value may hold: a reference to another key (``${model.pretrained}``, or this
# machine's ``${paths.data_dir}``), or the project's asset resolvers with plain arguments: their folder must
# be one of this machine's ``paths.*`` (with a sub-path), the others names or numbers. ``oc.env`` and every
# other resolver are refused: a checkpoint must not read the environment nor choose where a resolver writes.
_RESOLVER_ARGUMENTS = {"flmm_asset": ("name", "folder"), "flmm_synthetic": ("folder", "number", "number")}
_INNERMOST = re.compile(r"\$\{([^${}]*)\}")
_KEY_REFERENCE = re.compile(r"[A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*")
# Placeholders for interpolations already checked (innermost first); a stored string holding NUL is refused.
_PATHS_REFERENCE = "\x00paths\x00"
_OTHER_REFERENCE = "\x00key\x00"
_ARGUMENT_KINDS = {
    "name": re.compile(r"\w[\w.+-]*"),
    # a key reference too: the resolver converts it with int(), which no path survives
    "number": re.compile(r"\d+|" + re.escape(_OTHER_REFERENCE)),
    "folder": re.compile(re.escape(_PATHS_REFERENCE) + r"(?:/\w[\w.+-]*)*"),
}


class UnsafeConfigError(ValueError):
    """A stored config that could run code other than this project's classes (names the key)."""


def _target_allowed(target: str) -> bool:
    if target in ALLOWED_TARGETS:
        return True
    module, _, name = target.rpartition(".")
    candidate = getattr(torch.optim, name, None) if module == "torch.optim" else None
    return isinstance(candidate, type) and issubclass(candidate, torch.optim.Optimizer)


def _is_key_reference(value: Any) -> bool:
    """``${some.key}``: its value is another stored key, checked on its own."""
    return (
        isinstance(value, str)
        and value.startswith("${")
        and value.endswith("}")
        and bool(_KEY_REFERENCE.fullmatch(value[2:-1].strip()))
    )


def _readable(text: str) -> str:
    return text.replace(_PATHS_REFERENCE, "${paths.<key>}").replace(_OTHER_REFERENCE, "${<key>}")


def _resolver_problem(expression: str) -> str | None:
    resolver, _, arguments = (part.strip() for part in expression.partition(":"))
    kinds = _RESOLVER_ARGUMENTS.get(resolver)
    if kinds is None:
        allowed = ", ".join(sorted(_RESOLVER_ARGUMENTS))
        return f"the interpolation ${{{_readable(expression)}}} (allowed: key references, {allowed})"
    values = [argument.strip() for argument in arguments.split(",")]
    if len(values) > len(kinds):
        return f"{resolver} takes at most {len(kinds)} arguments, got {len(values)}"
    for value, kind in zip(values, kinds, strict=False):
        if not _ARGUMENT_KINDS[kind].fullmatch(value) or ".." in value:
            return f"{resolver}: argument {_readable(value)!r} is not a {kind}" + (
                " under one of this machine's ${paths.<key>}" if kind == "folder" else ""
            )
    return None


def _interpolation_problem(value: str) -> str | None:
    """Why ``value``'s ``${...}`` may not be resolved, or None when it may (innermost first)."""
    while (match := _INNERMOST.search(value)) is not None:
        expression = match.group(1).strip()
        if _KEY_REFERENCE.fullmatch(expression):
            token = _PATHS_REFERENCE if expression.startswith("paths.") else _OTHER_REFERENCE
        else:
            problem = _resolver_problem(expression)
            if problem is not None:
                return problem
            token = _OTHER_REFERENCE
        value = value[: match.start()] + token + value[match.end() :]
    return "an unbalanced interpolation" if "${" in value else None


def _check_node(node: Any, key: str, problems: list[str]) -> None:
    if isinstance(node, dict):
        for child_key, child in node.items():
            if not isinstance(child_key, str) or "${" in child_key:
                problems.append(f"{key}: key {child_key!r} (keys must be plain strings)")
                continue
            child_path = f"{key}.{child_key}" if key else child_key
            if child_key == "_target_":
                if not isinstance(child, str) or not _target_allowed(child):
                    problems.append(
                        f"{child_path}: {child!r} is not one of flmm-lightning's own classes "
                        "(safe_config.ALLOWED_TARGETS)"
                    )
            elif child_key in ("_partial_", "_recursive_"):
                if not isinstance(child, bool):
                    problems.append(f"{child_path}: {child!r} (must be true or false)")
            elif child_key == "_convert_":
                if child not in _CONVERT_MODES:
                    problems.append(f"{child_path}: {child!r} (must be one of {_CONVERT_MODES})")
            elif child_key == "trust_remote_code" and not (child is False or _is_key_reference(child)):
                problems.append(f"{child_path}: {child!r} (a checkpoint never turns on remote code)")
            elif child_key == "embedding_cache" and child is not None:
                problems.append(f"{child_path}: {child!r} (a checkpoint never chooses a directory to write)")
            else:
                _check_node(child, child_path, problems)
    elif isinstance(node, list | tuple):
        for index, child in enumerate(node):
            _check_node(child, f"{key}[{index}]", problems)
    elif isinstance(node, str):
        if "\x00" in node:
            problems.append(f"{key}: a string holding a NUL character")
        elif "${" in node:
            problem = _interpolation_problem(node)
            if problem is not None:
                problems.append(f"{key}: {node!r}: {problem}")
    elif node is not None and not isinstance(node, bool | int | float):
        problems.append(f"{key}: a {type(node).__name__} (stored configs hold plain values only)")


def check_stored_config(config: Any, source: str | Path) -> None:
    """Raises ``UnsafeConfigError`` naming every key of ``config`` (the ``flmm_config`` of the checkpoint
    ``source``) that names a callable outside ``ALLOWED_TARGETS``, uses an interpolation other than a key
    reference or the project's asset resolvers, turns on remote code or chooses a directory to write to."""
    if not isinstance(config, dict):
        raise UnsafeConfigError(f"{source}: flmm_config is a {type(config).__name__}, not a mapping")
    problems: list[str] = []
    _check_node(config, "", problems)
    if problems:
        raise UnsafeConfigError(
            f"{source}: refusing the config stored in this checkpoint, nothing was built from it:\n  "
            + "\n  ".join(f"flmm_config.{problem}" for problem in problems)
        )
