"""The config stored in a checkpoint is data from a stranger: one typed schema says what it may hold.

``eval``, ``predict``, ``Grounder.from_checkpoint`` and a training resume rebuild the model from the config a
checkpoint carries. ``torch.load(weights_only=True)`` keeps pickled code out of a checkpoint, not a
``_target_: shutil.rmtree``, an interpolation that reads another key or the environment, a resolver that
writes or deletes files, nor ``_args_`` that pass arguments by position. So a stored config is plain data:

- every key is one the schema declares (``STORED_SCHEMA``): the model, SAM, module and data settings, each
  with its type and bounds; a ``_target_`` names one of this project's classes, and a node may hold only
  that class's own parameters (read from its signature), ``_partial_`` where the schema expects a factory;
- strings hold no interpolation and no resolver: the one exception is a path that starts with one of the
  documented placeholders ``${paths.<key>}`` (``PATHS_KEYS``), substituted as text with the loading
  machine's folder (``on_this_machine``), never through OmegaConf;
- ``trust_remote_code`` is a flag the loader overwrites with the command line's choice.

``parse_stored_config`` refuses anything else with an error naming the checkpoint file and every offending
key, before anything is built. ``stored_form`` writes a run's config in this form.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flmm_lightning.data.bad_samples import ON_BAD_SAMPLE_CHOICES
from flmm_lightning.data.reasonseg import QUERY_MODES
from flmm_lightning.data.refcoco import ACCEPTED_TEXT_MODES
from flmm_lightning.heads.sam_attention import ENCODER_ATTENTIONS
from flmm_lightning.lmm.capture import CAPTURES
from flmm_lightning.lmm.hf import TORCH_DTYPES
from flmm_lightning.lmm.readout import MERGE_MODES

ADAPTERS = frozenset(
    f"flmm_lightning.lmm.{module}.{name}Adapter"
    for module, name in (
        ("deepseek_vl", "DeepseekVL"),
        ("gemma3", "Gemma3"),
        ("internvl", "InternVL"),
        ("llava", "Llava"),
        ("llava_next", "LlavaNext"),
        ("llava_onevision", "LlavaOnevision"),
        ("qwen2_vl", "Qwen2VL"),
        ("qwen3_vl", "Qwen3VL"),
    )
)
PROMPT_BUILDERS = frozenset(target.removesuffix("Adapter") + "PromptBuilder" for target in ADAPTERS)
SAM_BUILDERS = frozenset(
    {"flmm_lightning.heads.sam_refiner.build_sam", "flmm_lightning.assets.sam.build_tiny_sam"}
)
DATASETS = frozenset(
    {
        "flmm_lightning.data.custom.CustomDataset",
        "flmm_lightning.data.png.PNGDataset",
        "flmm_lightning.data.reasonseg.ReasonSegDataset",
        "flmm_lightning.data.refcoco.RefCocoDataset",
    }
)
MODULE = "flmm_lightning.training.module.FLMMModule"
MASK_HEAD = "flmm_lightning.heads.unet.UNetMaskHead"
REFINER = "flmm_lightning.heads.sam_refiner.SamRefiner"
DATAMODULE = "flmm_lightning.data.datamodule.GroundingDataModule"
# Every class or function a stored config may name (tests/test_safe_config.py keeps it and conf/ in step),
# plus any of torch's own optimizers (``module.optimizer._target_=torch.optim.SGD`` must stay readable).
ALLOWED_TARGETS = frozenset(
    {*ADAPTERS, *PROMPT_BUILDERS, *SAM_BUILDERS, *DATASETS, MODULE, MASK_HEAD, REFINER, DATAMODULE}
    | {"torch.optim.AdamW"}
)

# The ``paths.*`` a stored path may start with; the machine that loads the checkpoint supplies their values.
PATHS_KEYS = ("data_dir", "checkpoint_dir", "cache_dir", "root_dir")
_PLACEHOLDER = re.compile(r"\$\{paths\.(\w+)\}")
_NAME = re.compile(r"[A-Za-z_][\w.+-]{0,127}")
MAX_TEXT = 4096
MAX_ENTRIES = 256


class UnsafeConfigError(ValueError):
    """A stored config that the schema does not accept (names the checkpoint file and every key)."""


# ---- value kinds -------------------------------------------------------------------------------------------
Check = Callable[[Any, str, list[str]], None]


def _text_problem(value: Any, allow_placeholder: bool) -> str | None:
    if not isinstance(value, str):
        return f"{value!r} is a {type(value).__name__}, not text"
    if len(value) > MAX_TEXT or "\x00" in value:
        return "text longer than 4096 characters or holding a NUL character"
    rest = value
    if allow_placeholder and (match := _PLACEHOLDER.match(value)) is not None:
        if match.group(1) not in PATHS_KEYS:
            return f"{value!r}: ${{paths.{match.group(1)}}} is not one of the path placeholders {PATHS_KEYS}"
        rest = value[match.end() :]
        if rest and not rest.startswith("/"):
            return f"{value!r}: a path placeholder is followed by '/' or nothing"
    if "${" in rest:
        where = "only a path may start with ${paths.<key>}" if allow_placeholder else "text is plain"
        return f"{value!r}: an interpolation or resolver ({where}; a stored config is data)"
    if allow_placeholder and ".." in Path(rest).parts:
        return f"{value!r}: a path with '..'"
    return None


def text(choices: tuple[str, ...] | None = None, optional: bool = False) -> Check:
    def check(value: Any, key: str, problems: list[str]) -> None:
        if value is None and optional:
            return
        problem = _text_problem(value, allow_placeholder=False)
        if problem is None and choices is not None and value not in choices:
            problem = f"{value!r} (must be one of {', '.join(map(str, choices))})"
        if problem is not None:
            problems.append(f"{key}: {problem}")

    return check


def path(optional: bool = False) -> Check:
    """A file or folder, or a hub id: text that may start with a ``${paths.<key>}`` placeholder."""

    def check(value: Any, key: str, problems: list[str]) -> None:
        if value is None and optional:
            return
        problem = _text_problem(value, allow_placeholder=True)
        if problem is not None:
            problems.append(f"{key}: {problem}")

    return check


def flag(optional: bool = False) -> Check:
    def check(value: Any, key: str, problems: list[str]) -> None:
        if not (isinstance(value, bool) or (value is None and optional)):
            problems.append(f"{key}: {value!r} (must be true or false)")

    return check


def number(low: float, high: float, integer: bool = False, optional: bool = False) -> Check:
    """A finite number in ``[low, high]`` (an integer where ``integer``; a float setting takes an integer)."""

    def check(value: Any, key: str, problems: list[str]) -> None:
        if value is None and optional:
            return
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            problems.append(f"{key}: {value!r} (must be {'an integer' if integer else 'a number'})")
        elif not (math.isfinite(value) and low <= value <= high):
            problems.append(f"{key}: {value!r} (must be a finite number from {low:g} to {high:g})")

    return check


def numbers(length: int, item: Check) -> Check:
    def check(value: Any, key: str, problems: list[str]) -> None:
        if not isinstance(value, list | tuple) or len(value) != length:
            problems.append(f"{key}: {value!r} (must be a list of {length})")
            return
        for index, element in enumerate(value):
            item(element, f"{key}[{index}]", problems)

    return check


def _plain(value: Any, key: str, problems: list[str]) -> None:
    """A setting the schema has no entry for (a torch optimizer's): a flag, a bounded number, text, or a
    short list of those."""
    if isinstance(value, list | tuple):
        if len(value) > 8:
            problems.append(f"{key}: a list of {len(value)} (at most 8 here)")
        for index, element in enumerate(value):
            if isinstance(element, list | tuple | dict):
                problems.append(f"{key}[{index}]: a nested {type(element).__name__}")
            else:
                _plain(element, f"{key}[{index}]", problems)
    elif value is None or isinstance(value, bool):
        return
    elif isinstance(value, int | float):
        number(-1e9, 1e9)(value, key, problems)
    else:
        text()(value, key, problems)


# ---- nodes -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Section:
    """A mapping with fixed keys (``required`` must be there)."""

    fields: Mapping[str, Check]
    required: tuple[str, ...] = ()

    def __call__(self, value: Any, key: str, problems: list[str]) -> None:
        if not isinstance(value, dict):
            problems.append(f"{key}: a {type(value).__name__}, not a mapping")
            return
        for name in self.required:
            if name not in value:
                problems.append(f"{_join(key, name)}: missing")
        for name, child in value.items():
            check = self.fields.get(name) if isinstance(name, str) else None
            if check is None:
                known = ", ".join(self.fields)
                problems.append(f"{_join(key, str(name))}: a key the schema lacks (known here: {known})")
            else:
                check(child, _join(key, name), problems)


# Arguments the code passes itself when it builds a node (never from a config).
_INJECTED = {
    MODULE: ("lmm", "sam"),
    MASK_HEAD: ("in_channels",),
    DATAMODULE: ("prompt_builder", "sam_image_size"),
}


def _import(target: str) -> Any:
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)


def parameters_of(target: str) -> list[str]:
    """The keyword parameters of ``target`` a config may set: its signature less those the code passes
    itself. A class's ``__init__`` that passes ``**kwargs`` on adds its own names to its base class's."""
    obj = _import(target)
    functions = (
        [obj] if not isinstance(obj, type) else [c.__init__ for c in obj.__mro__ if "__init__" in vars(c)]
    )
    injected = ("params",) if target.startswith("torch.optim.") else _INJECTED.get(target, ())
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    named: list[str] = []
    for function in functions:
        parameters = inspect.signature(function).parameters.values()
        named += [p.name for p in parameters if p.kind not in variadic and p.name not in ("self", *named)]
        if not any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters):
            break
    return [name for name in named if name not in injected]


def _is_optimizer(target: Any) -> bool:
    module, _, name = str(target).rpartition(".")
    candidate = getattr(torch.optim, name, None) if module == "torch.optim" else None
    return isinstance(candidate, type) and issubclass(candidate, torch.optim.Optimizer)


@dataclass(frozen=True)
class Node:
    """A ``_target_`` node: one of ``targets`` (or a torch optimizer where ``optimizer``), with that target's
    own parameters as keys, each checked by ``SETTINGS`` (``_plain`` for an optimizer's), and ``extra``
    helper keys. ``partial``: the node is a factory (``_partial_: true``) the code calls with the rest."""

    targets: frozenset[str]
    partial: bool = False
    optimizer: bool = False
    extra: Mapping[str, Check] = field(default_factory=dict)

    def __call__(self, value: Any, key: str, problems: list[str]) -> None:
        if not isinstance(value, dict):
            problems.append(f"{key}: a {type(value).__name__}, not a mapping with a _target_")
            return
        target = value.get("_target_")
        if not isinstance(target, str) or not (
            target in self.targets or (self.optimizer and _is_optimizer(target))
        ):
            allowed = ", ".join(sorted(self.targets)) + (
                ", torch.optim.<Optimizer>" if self.optimizer else ""
            )
            problems.append(
                f"{_join(key, '_target_')}: {target!r} is not one of flmm-lightning's own ({allowed})"
            )
            return
        if value.get("_partial_", False) is not self.partial:
            problems.append(f"{_join(key, '_partial_')}: {value.get('_partial_')!r} (must be {self.partial})")
        fields: dict[str, Check] = {name: SETTINGS.get(name, _plain) for name in parameters_of(target)}
        if not self.optimizer:
            unknown = sorted(set(fields) - set(SETTINGS))
            if unknown:
                problems.append(f"{key}: {target} takes {unknown}, which the schema does not type (SETTINGS)")
        Section({"_target_": text(), "_partial_": flag(), **fields, **self.extra})(value, key, problems)


@dataclass(frozen=True)
class Nodes:
    """Named ``Node``s (the datasets of a split group)."""

    node: Node

    def __call__(self, value: Any, key: str, problems: list[str]) -> None:
        if value is None:
            return
        if not isinstance(value, dict) or len(value) > MAX_ENTRIES:
            problems.append(f"{key}: {value!r:.80} (must be a mapping of at most {MAX_ENTRIES} names)")
            return
        for name, child in value.items():
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                problems.append(f"{key}: {name!r} is not a plain name")
            else:
                self.node(child, _join(key, name), problems)


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


# Every parameter a stored node may set, by name, with its type and bounds. (A name means one thing across
# the project's classes; tests/test_stored_config.py checks that every parameter of ALLOWED_TARGETS has one.)
_SIZE = 1 << 16
SETTINGS: dict[str, Check] = {
    # the LMM adapters and their prompt builders
    "pretrained": path(),
    "text_proj_dim": number(1, _SIZE, integer=True),
    "capture": text(tuple(CAPTURES)),
    "merge": text(MERGE_MODES),
    "torch_dtype": text(("auto", *TORCH_DTYPES)),
    "trust_remote_code": flag(),
    "keyword_selector": flag(),
    "instruction": text(),
    "max_length": number(1, 1 << 20, integer=True, optional=True),
    "use_fast": flag(optional=True),
    "max_pixels": number(1, 1 << 28, integer=True, optional=True),
    "min_pixels": number(1, 1 << 28, integer=True, optional=True),
    "max_tiles": number(1, 1024, integer=True, optional=True),
    # SAM
    "sam": Node(SAM_BUILDERS),
    "name": text(),
    "checkpoint": path(optional=True),
    "use_text": flag(),
    "use_mask": flag(),
    "use_box": flag(),
    "multimask_output": flag(),
    # this machine's choice, never a checkpoint's: a stored config names no folder to write to
    "embedding_cache": text(choices=(), optional=True),
    "encoder_attention": text(ENCODER_ATTENTIONS),
    "encoder_batch_size": number(1, 1024, integer=True),
    # the module and its mask head
    "mask_head": Node(frozenset({MASK_HEAD}), partial=True),
    "optimizer": Node(frozenset({"torch.optim.AdamW"}), partial=True, optimizer=True),
    "base_channels": number(1, 512, integer=True),
    "num_stages": number(1, 8, integer=True),
    "convs_per_stage": number(1, 8, integer=True),
    "upsample_to": number(1, 4096, integer=True),
    "normalize_input": flag(),
    "warmup_ratio": number(0, 1),
    "warmup_start_factor": number(0, 1),
    "coarse_bce_weight": number(0, 1e6),
    "coarse_dice_weight": number(0, 1e6),
    "fine_bce_weight": number(0, 1e6),
    "fine_dice_weight": number(0, 1e6),
    "max_consecutive_nonfinite": number(1, 1e6, integer=True),
    "eval_heads_fp32": flag(),
    "keyword_selector_weight": number(0, 1e6),
    "keyword_selector_lr": number(0, 10, optional=True),
    # data
    "train_sets": Nodes(Node(DATASETS)),
    "val_sets": Nodes(Node(DATASETS)),
    "test_sets": Nodes(Node(DATASETS)),
    "batch_size": number(1, 4096, integer=True),
    "eval_batch_size": number(1, 4096, integer=True, optional=True),
    "num_workers": number(0, 256, integer=True),
    "pin_memory": flag(),
    "seed": number(0, 2**32 - 1, integer=True),
    # the LMM feature cache's folder: this machine's choice, stored as off like ``embedding_cache``
    "feature_cache": text(choices=(), optional=True),
    "data_root": path(),
    "dataset": text(),
    "split_by": text(),
    "split": text(),
    "image_dir": path(),
    "text_mode": text(ACCEPTED_TEXT_MODES),
    "group_by_image": flag(),
    "on_bad_sample": text(ON_BAD_SAMPLE_CHOICES),
    "strip_sentences": flag(),
    "narratives_json": path(),
    "panoptic_json": path(),
    "panoptic_dir": path(),
    "split_dir": path(),
    "query_mode": text(QUERY_MODES),
    "path": path(optional=True),
    "image_root": path(optional=True),
    "check_images": flag(),
    "max_queries": number(1, 1 << 20, integer=True, optional=True),
}

# The synthetic generator's settings a data config carries (``data.synthetic``; bounds: ``data.synthetic``).
_SYNTHETIC = Section(
    {
        "num_train": number(0, 10_000, integer=True),
        "num_val": number(0, 10_000, integer=True),
        "root": path(),
    },
    required=("num_train", "num_val", "root"),
)

# The own-data files a data config names (``data.custom``, docs/own-data.md).
_CUSTOM = Section(
    {
        "train": path(optional=True),
        "val": path(optional=True),
        "test": path(optional=True),
        "image_root": path(optional=True),
        "on_bad_sample": text(ON_BAD_SAMPLE_CHOICES),
        "check_images": flag(),
    }
)

STORED_SCHEMA = Section(
    {
        "model": Section(
            {
                "name": text(),
                "pretrained": path(),
                "trust_remote_code": flag(),
                "lmm": Node(ADAPTERS),
                "prompt": Node(PROMPT_BUILDERS),
            },
            required=("lmm", "prompt"),
        ),
        "sam": Section(
            {
                "name": text(),
                "image_size": number(16, 4096, integer=True),
                "embed_dim": number(1, 4096, integer=True),
                "refiner": Node(frozenset({REFINER})),
            },
            required=("image_size", "refiner"),
        ),
        "module": Node(frozenset({MODULE})),
        "data": Node(frozenset({DATAMODULE}), extra={"synthetic": _SYNTHETIC, "custom": _CUSTOM}),
    },
    required=("model", "sam", "module"),
)


# ---- the checkpoint's side ---------------------------------------------------------------------------------
# Checkpoints written while ``heads/`` built the tiny SAM name ``build_sam`` with ``name: tiny``.
_LEGACY_SAM_TARGET = "flmm_lightning.heads.sam_refiner.build_sam"
_TINY_SAM_TARGET = "flmm_lightning.assets.sam.build_tiny_sam"


def _upgraded(stored: dict[str, Any]) -> dict[str, Any]:
    """The stored config in today's form: an old tiny-SAM node names ``assets.sam.build_tiny_sam``."""
    refiner = stored.get("sam", {}).get("refiner") if isinstance(stored.get("sam"), dict) else None
    node = refiner.get("sam") if isinstance(refiner, dict) else None
    if isinstance(node, dict) and node.get("_target_") == _LEGACY_SAM_TARGET and node.get("name") == "tiny":
        node = {key: value for key, value in node.items() if key != "name"}
        node["_target_"] = _TINY_SAM_TARGET
        stored = {**stored, "sam": {**stored["sam"], "refiner": {**refiner, "sam": node}}}
    return stored


def parse_stored_config(stored: Any, source: str | Path) -> dict[str, Any]:
    """``stored`` (the ``flmm_config`` of the checkpoint ``source``) checked against ``STORED_SCHEMA``, in
    today's form. Raises ``UnsafeConfigError`` naming the file and every key the schema refuses."""
    if not isinstance(stored, dict):
        raise UnsafeConfigError(f"{source}: flmm_config is a {type(stored).__name__}, not a mapping")
    stored = _upgraded(stored)
    problems: list[str] = []
    STORED_SCHEMA(stored, "", problems)
    if problems:
        raise UnsafeConfigError(
            f"{source}: refusing the config stored in this checkpoint, nothing was built from it:\n  "
            + "\n  ".join(f"flmm_config.{problem}" for problem in problems)
        )
    return stored


def _strings(node: Any, key: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for name, child in node.items():
            yield from _strings(child, _join(key, str(name)))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            yield from _strings(child, f"{key}[{index}]")
    elif isinstance(node, str):
        yield key, node


def _replace_strings(node: Any, replace: Callable[[str, str], str], key: str = "") -> Any:
    if isinstance(node, dict):
        return {name: _replace_strings(child, replace, _join(key, str(name))) for name, child in node.items()}
    if isinstance(node, list):
        return [_replace_strings(child, replace, f"{key}[{index}]") for index, child in enumerate(node)]
    return replace(key, node) if isinstance(node, str) else node


def paths_read(section: Any) -> list[str]:
    """The ``paths.*`` keys the placeholders of a stored section read, in order of first use."""
    found: list[str] = []
    for _, value in _strings(section):
        match = _PLACEHOLDER.match(value)
        if match is not None and f"paths.{match.group(1)}" not in found:
            found.append(f"paths.{match.group(1)}")
    return found


def on_this_machine(stored: dict[str, Any], paths: Mapping[str, Any], source: str | Path) -> dict[str, Any]:
    """A parsed stored config with each ``${paths.<key>}`` placeholder replaced, as text, by ``paths[key]``
    (this machine's folder). A placeholder whose folder this machine does not define is an error naming it."""

    def substitute(key: str, value: str) -> str:
        match = _PLACEHOLDER.match(value)
        if match is None:
            return value
        folder = paths.get(match.group(1))
        if not isinstance(folder, str | Path) or not str(folder):
            raise UnsafeConfigError(
                f"{source}: flmm_config.{key} = {value!r} reads paths.{match.group(1)}, not set here: "
                f"set paths.{match.group(1)}=<folder> on the command line"
            )
        return str(folder) + value[match.end() :]

    return _replace_strings(stored, substitute)


def stored_form(sections: dict[str, Any], paths: Mapping[str, Any]) -> dict[str, Any]:
    """A run's resolved config ``sections`` in the form a checkpoint stores: every value that lies under one
    of this machine's ``paths`` (``PATHS_KEYS``; the deepest folder wins) starts with its placeholder."""
    folders = sorted(
        ((key, str(paths[key]).rstrip("/")) for key in PATHS_KEYS if isinstance(paths.get(key), str | Path)),
        key=lambda item: -len(item[1]),
    )
    folders = [(key, folder) for key, folder in folders if Path(folder).is_absolute() and folder != ""]

    def placeholder(key: str, value: str) -> str:
        for name, folder in folders:
            if value == folder or value.startswith(folder + "/"):
                return f"${{paths.{name}}}" + value[len(folder) :]
        return value

    return _replace_strings(sections, placeholder)
