"""Hydra/OmegaConf glue: where the configs live, the resolvers that name offline assets and the step that
builds them (``prepare_inputs``), and the config a checkpoint stores (portable: this machine's paths stay out
of it)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from antlr4.tree.Tree import TerminalNode
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import GrammarParseError, OmegaConfBaseException
from omegaconf.grammar.gen.OmegaConfGrammarParser import OmegaConfGrammarParser
from omegaconf.grammar_parser import parse


def _conf_dir() -> Path:
    """An installed wheel's ``flmm_lightning/conf``, else the ``conf/`` at the top of the source tree (an
    editable install, or ``PYTHONPATH=src``)."""
    package = Path(__file__).resolve().parent
    installed = package / "conf"
    return installed if installed.is_dir() else package.parents[1] / "conf"


CONF_DIR = _conf_dir()


def _asset(name: str, cache_dir: str) -> str:
    from flmm_lightning.assets.catalog import asset_path

    return str(asset_path(name, cache_dir=cache_dir))


def _synthetic(root: str, num_train: int = 240, num_val: int = 60) -> str:
    return str(Path(root).resolve())


def _build_asset(name: str, cache_dir: str) -> Path:
    from flmm_lightning.assets.catalog import ensure_asset

    return ensure_asset(name, cache_dir=cache_dir)


def _write_synthetic(root: str, num_train: int = 240, num_val: int = 60) -> Path:
    from flmm_lightning.data.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(root, num_train=int(num_train), num_val=int(num_val)).root


def _run_dir(ckpt_path: str | None, fresh: str) -> str:
    from flmm_lightning.run_dirs import run_dir

    return run_dir(ckpt_path, fresh)


def register_resolvers() -> None:
    """``${flmm_asset:<name>,<cache_dir>}`` is the path of a tiny offline model; ``${flmm_synthetic:<root>[,
    num_train,num_val]}`` is the root of the synthetic dataset (both pure: ``prepare_inputs`` builds them);
    ``${flmm_cwd:}`` is the working directory (``hydra:runtime.cwd`` is the same with
    ``hydra.job.chdir=false``, but a multirun launcher resolves ``hydra.sweep.dir`` before Hydra's own
    resolver works); ``${flmm_run_dir:<ckpt_path>,<fresh>}`` is the run folder of a resumed checkpoint,
    else ``fresh``."""
    OmegaConf.register_new_resolver("flmm_cwd", os.getcwd, replace=True)
    OmegaConf.register_new_resolver("flmm_asset", _asset, replace=True)
    OmegaConf.register_new_resolver("flmm_synthetic", _synthetic, replace=True)
    OmegaConf.register_new_resolver("flmm_run_dir", _run_dir, replace=True)


# What each resolver that names a generated input builds, called with the resolver's own arguments.
_PREPARE = {"flmm_asset": _build_asset, "flmm_synthetic": _write_synthetic}


def _resolver_calls(value: str) -> list[tuple[str, list[str]]]:
    """The resolver calls of an OmegaConf string: (name, the source text of each argument)."""
    calls: list[tuple[str, list[str]]] = []

    def visit(node: Any) -> None:
        if isinstance(node, OmegaConfGrammarParser.InterpolationResolverContext):
            sequence = node.sequence()
            arguments = [element.getText() for element in sequence.element()] if sequence else []
            calls.append((node.resolverName().getText(), arguments))
        if not isinstance(node, TerminalNode):
            for child in node.getChildren():
                visit(child)

    visit(parse(value, parser_rule="configValue"))
    return calls


def _generated_inputs(node: DictConfig | ListConfig) -> Iterable[tuple[str, list[Any]]]:
    """The ``_PREPARE`` resolver calls under ``node``, their arguments resolved where they are written."""
    raw = OmegaConf.to_container(node, resolve=False)
    items = enumerate(raw) if isinstance(raw, list) else raw.items()
    for key, value in items:
        if isinstance(value, str) and "${" in value:
            for name, arguments in _resolver_calls(value):
                if name in _PREPARE:
                    # A node under ``node`` resolves the argument as the config would (absolute keys).
                    yield name, [OmegaConf.create({"_": text}, parent=node)["_"] for text in arguments]
        elif isinstance(value, dict | list):
            yield from _generated_inputs(node[key])


def prepare_inputs(*sections: DictConfig | ListConfig | None) -> list[Path]:
    """Builds the tiny assets and synthetic datasets that ``sections`` name through ``${flmm_asset:...}`` and
    ``${flmm_synthetic:...}`` and that are missing, and returns their paths. Resolving a config builds
    nothing; this is the step that does, called by the builders before they instantiate a section."""
    built: list[Path] = []
    for section in sections:
        if OmegaConf.is_config(section):
            for name, arguments in _generated_inputs(section):
                built.append(_PREPARE[name](*arguments))
    return built


# Resolvers whose result the machine that loads a checkpoint recomputes from its own paths.
PORTABLE_RESOLVERS = frozenset({"flmm_asset", "flmm_synthetic"})
# Keys of a model-defining config that name files to read when the model is built.
INPUT_FILE_KEYS = ("model.pretrained", "sam.refiner.sam.checkpoint")


def _references(value: str) -> tuple[list[str], list[str]]:
    """The config keys (``paths.data_dir``) and resolver names (``oc.env``) an OmegaConf string reads."""
    keys: list[str] = []
    resolvers: list[str] = []

    def visit(node: Any) -> None:
        if isinstance(node, OmegaConfGrammarParser.InterpolationNodeContext):
            keys.append(node.getText()[2:-1])
        elif isinstance(node, OmegaConfGrammarParser.InterpolationResolverContext):
            resolvers.append(node.resolverName().getText())
        if not isinstance(node, TerminalNode):
            for child in node.getChildren():
                visit(child)

    visit(parse(value, parser_rule="configValue"))
    return keys, resolvers


def _root(key: str) -> str:
    """The top-level section a key reads: ``paths`` for ``paths.data_dir``; "" for a relative key."""
    return "" if key.startswith(".") else key.replace("[", ".").split(".")[0]


def _is_portable(value: str, sections: frozenset[str]) -> bool:
    """Whether ``value`` interpolates only ``paths.*`` and ``sections``, through ``PORTABLE_RESOLVERS``."""
    read, resolvers = _references(value)
    return all(_root(key) in sections for key in read) and set(resolvers) <= PORTABLE_RESOLVERS


def _portable_node(node: DictConfig | ListConfig, sections: frozenset[str]) -> Any:
    raw = OmegaConf.to_container(node, resolve=False)
    keys: Iterable[Any] = range(len(raw)) if isinstance(raw, list) else list(raw)
    result: dict[Any, Any] = {}
    for key in keys:
        value = raw[key]
        if isinstance(value, str) and not _is_portable(value, sections):
            value = node[key]
            value = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        elif isinstance(value, dict | list):
            value = _portable_node(node[key], sections)
        result[key] = value
    return list(result.values()) if isinstance(raw, list) else result


def _check_portable(value: Any, sections: frozenset[str], where: str, source: str) -> None:
    """Refuses a stored config that interpolates anything ``portable_container`` would not have kept (a
    checkpoint not written by this project, or edited): e.g. ``${oc.env:...}`` or a key outside it."""
    if isinstance(value, str):
        try:
            portable = _is_portable(value, sections)
        except GrammarParseError as error:
            raise ValueError(f"{source}: {where} = {value!r} is not a valid config value: {error}") from error
        if not portable:
            raise ValueError(
                f"{source}: {where} = {value!r}: a checkpoint's config may interpolate only paths.* and "
                f"its own sections {sorted(sections - {'paths'})}, through {sorted(PORTABLE_RESOLVERS)}"
            )
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _check_portable(item, sections, f"{where}.{key}" if where else str(key), source)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_portable(item, sections, f"{where}[{index}]", source)


def portable_container(cfg: DictConfig, keys: Iterable[str]) -> dict[str, Any]:
    """The sections ``keys`` of ``cfg`` as plain containers, for a checkpoint.

    An interpolation that reads only ``paths.*``, these sections and the asset/dataset resolvers stays as
    written (``${paths.data_dir}/coco``, ``${flmm_asset:tiny_sam,${paths.cache_dir}}``): the machine that
    loads the checkpoint resolves it against its own paths (``config_on_this_machine``). Every other value is
    stored resolved: the run's settings, ``${oc.env:...}``, ``${hydra:...}``, keys outside these sections.
    """
    keys = list(keys)
    sections = frozenset({*keys, "paths"})
    return {key: _portable_node(cfg[key], sections) for key in keys}


def resolved_paths(paths: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """``paths.*`` resolved where they are defined; an entry that cannot resolve here is left out (e.g.
    ``output_dir`` outside a Hydra run): a stored value that reads it then fails naming it."""
    if not OmegaConf.is_config(paths):
        return dict(paths)
    resolved = {}
    for key in paths:
        try:
            resolved[key] = paths[key]
        except (OmegaConfBaseException, ValueError):  # e.g. ${hydra:...} without a Hydra run
            continue
    return resolved


def default_paths() -> dict[str, Any]:
    """``conf/paths/default.yaml`` outside a Hydra run: the working directory as ``paths.root_dir``."""
    config = OmegaConf.create({"paths": OmegaConf.load(CONF_DIR / "paths" / "default.yaml")})
    config.paths.root_dir = os.getcwd()
    config.paths.output_dir = None
    return resolved_paths(config.paths)


def config_on_this_machine(
    stored: Mapping[str, Any],
    paths: DictConfig | Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    source: str = "the checkpoint",
) -> DictConfig:
    """A checkpoint's stored config where it is loaded: its ``${paths.*}`` read ``paths`` (this machine's,
    from its config and command line; ``default_paths()`` when None), and each section of ``overrides`` (the
    command line's ``++data.x=y``, ``++model.pretrained=...``) is merged over the stored section of that
    name."""
    sections = {key: value for key, value in stored.items() if key != "paths"}
    _check_portable(sections, frozenset({*sections, "paths"}), "", source)
    config = OmegaConf.create(sections)
    for key, section in (overrides or {}).items():
        patch = OmegaConf.to_container(section, resolve=False) if OmegaConf.is_config(section) else section
        config[key] = OmegaConf.merge(config[key], patch) if key in config else patch
    config.paths = resolved_paths(paths) if paths is not None else default_paths()
    return config


def _written(config: DictConfig, key: str) -> Any:
    """The value at dotted ``key`` as written (interpolations unresolved), None where there is none."""
    node: Any = OmegaConf.to_container(config, resolve=False)
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def check_input_files(config: DictConfig, source: str) -> None:
    """Refuses, before any model is built, an input file of ``INPUT_FILE_KEYS`` that this machine lacks: the
    error names the key, the path and what to set on the command line. (A hub id is not a local path.)"""
    for key in INPUT_FILE_KEYS:
        value = OmegaConf.select(config, key)
        if not isinstance(value, str):
            continue
        written = _written(config, key)
        read = [k for k in _references(written)[0] if _root(k) == "paths"] if isinstance(written, str) else []
        local = bool(read) or os.path.isabs(os.path.expanduser(value)) or value.startswith(".")
        if not local or Path(value).expanduser().exists():
            continue
        if read:
            roots = ", ".join(f"{k} = {OmegaConf.select(config, k)}" for k in read)
            remedy = (
                f"it is {written} with {roots} here: set {read[0]}=<the folder that holds it> (or "
                f"++{key}=<file>) on the command line"
            )
        else:
            remedy = f"set ++{key}=<its path on this machine> on the command line"
        raise FileNotFoundError(f"{source}: {key} = {value} does not exist on this machine; {remedy}")


def paths_read(section: Any) -> list[str]:
    """The ``paths.*`` keys a stored config section reads, in order of first use."""
    found: list[str] = []
    if isinstance(section, Mapping):
        values: Iterable[Any] = section.values()
    elif isinstance(section, list):
        values = section
    else:
        values = [section]
    for value in values:
        if isinstance(value, str):
            read = [k for k in _references(value)[0] if _root(k) == "paths"]
        elif isinstance(value, Mapping | list):
            read = paths_read(value)
        else:
            read = []
        found += [k for k in read if k not in found]
    return found
