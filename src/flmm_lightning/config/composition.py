"""Hydra/OmegaConf glue: where the configs live, the resolvers that name offline assets and the step that
builds them (``prepare_inputs``), and the config a checkpoint stores (``config.stored``'s plain data: this
machine's paths stay out of it) and how a loader reads it with its own paths."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from antlr4.tree.Tree import TerminalNode
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from omegaconf.grammar.gen.OmegaConfGrammarParser import OmegaConfGrammarParser
from omegaconf.grammar_parser import parse

from flmm_lightning.config.stored import on_this_machine, parse_stored_config, paths_read, stored_form


def _conf_dir() -> Path:
    """An installed wheel's ``flmm_lightning/conf``, else the ``conf/`` at the top of the source tree (an
    editable install, or ``PYTHONPATH=src``)."""
    package = Path(__file__).resolve().parents[1]
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
    from flmm_lightning.assets.synthetic_data import write_synthetic_dataset

    return write_synthetic_dataset(root, num_train=int(num_train), num_val=int(num_val)).root


def _run_dir(ckpt_path: str | None, fresh: str) -> str:
    from flmm_lightning.runs.folders import run_dir

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


# Keys of a model-defining config that name files to read when the model is built.
INPUT_FILE_KEYS = ("model.pretrained", "sam.refiner.sam.checkpoint")


def stored_config(cfg: DictConfig, keys: Iterable[str]) -> dict[str, Any]:
    """The sections ``keys`` of ``cfg`` as a checkpoint stores them (``config.stored``): every value resolved
    now, then each path under one of this machine's ``paths.*`` written from its ``${paths.<key>}``
    placeholder, so that the machine that loads the checkpoint reads its own folders."""
    sections = {key: OmegaConf.to_container(cfg[key], resolve=True) for key in keys}
    return stored_form(sections, resolved_paths(cfg.paths))


def _remote_code_allowed(overrides: Mapping[str, Any] | None) -> bool:
    """Whether the command line (``++model.trust_remote_code=true``) lets the LMM run its folder's code."""
    model = (overrides or {}).get("model")
    if model is None:
        return False
    model = OmegaConf.create(
        OmegaConf.to_container(model, resolve=False) if OmegaConf.is_config(model) else model
    )
    return any(OmegaConf.select(model, key) is True for key in ("trust_remote_code", "lmm.trust_remote_code"))


def config_on_this_machine(
    stored: Mapping[str, Any],
    paths: DictConfig | Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    source: str = "the checkpoint",
) -> DictConfig:
    """A checkpoint's stored config where it is loaded: checked against the schema (``config.stored``), its
    ``${paths.*}`` placeholders replaced as text by ``paths`` (this machine's, from its config and command
    line; ``default_paths()`` when None), and each section of ``overrides`` (the command line's
    ``++data.x=y``, ``++model.pretrained=...``) merged over the stored section of that name.
    ``trust_remote_code`` is the command line's (``overrides``), never the checkpoint's: off unless given."""
    return checked_config_on_this_machine(parse_stored_config(dict(stored), source), paths, overrides, source)


def checked_config_on_this_machine(
    checked: dict[str, Any],
    paths: DictConfig | Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    source: str = "the checkpoint",
) -> DictConfig:
    """``config_on_this_machine`` of a stored config that ``config.stored.parse_stored_config`` returned (a
    loader that checked it when reading the checkpoint does not check it again)."""
    here = resolved_paths(paths) if paths is not None else default_paths()
    config = OmegaConf.create(on_this_machine(checked, here, source))
    for key, section in (overrides or {}).items():
        patch = OmegaConf.to_container(section, resolve=False) if OmegaConf.is_config(section) else section
        config[key] = OmegaConf.merge(config[key], patch) if key in config else patch
    allowed = _remote_code_allowed(overrides)
    config.model.trust_remote_code = allowed
    config.model.lmm.trust_remote_code = allowed
    config.paths = here
    return config


def _stored_value(stored: Mapping[str, Any], key: str) -> Any:
    node: Any = stored
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def prepare_stored_assets(stored: Mapping[str, Any], config: DictConfig) -> list[Path]:
    """Builds the tiny offline assets a stored config names (``${paths.cache_dir}/<asset>`` in one of
    ``INPUT_FILE_KEYS``: the form ``${flmm_asset:...}`` is stored in) in this machine's cache when missing."""
    from flmm_lightning.assets.catalog import ASSETS, asset_path, ensure_asset

    anywhere = Path("/")
    by_path = {
        f"${{paths.cache_dir}}/{asset_path(name, anywhere).relative_to(anywhere)}": name for name in ASSETS
    }
    built = []
    for key in INPUT_FILE_KEYS:
        name = by_path.get(_stored_value(stored, key))
        if name is not None:
            built.append(ensure_asset(name, cache_dir=config.paths.cache_dir))
    return built


def check_input_files(config: DictConfig, stored: Mapping[str, Any], source: str) -> None:
    """Refuses, before any model is built, an input file of ``INPUT_FILE_KEYS`` that this machine lacks: the
    error names the key, the path and what to set on the command line. (A hub id is not a local path.)
    ``stored``: the checkpoint's config as stored, whose placeholders say which ``paths.*`` a file reads."""
    for key in INPUT_FILE_KEYS:
        value = OmegaConf.select(config, key)
        if not isinstance(value, str):
            continue
        written = _stored_value(stored, key)
        # a command line's ++<key>=<file> replaced the stored path: it reads no placeholder
        read = (
            paths_read(written) if isinstance(written, str) and value.endswith(written.split("}")[-1]) else []
        )
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
