"""The wrapper every entry point's task runs in (as lightning-hydra-template's ``task_wrapper``): what
``train``, ``eval``, ``predict``, ``chat`` and ``app`` all do around their work, written once.

``@task_wrapper("eval", checkpoint_groups=True)`` on ``evaluate(cfg)`` makes ``evaluate`` a ``Task``: called
from Python it runs the work with the environment the entry points set, closes W&B even when the work raises
and logs where the output went; ``evaluate.main`` is the command line (``python -m flmm_lightning.eval``).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Concatenate, Generic, ParamSpec, TypeVar

import hydra
from omegaconf import DictConfig

from flmm_lightning.config.composition import CONF_DIR
from flmm_lightning.config.errors import ConfigError
from flmm_lightning.config.settings import refuse_checkpoint_groups, refuse_renamed
from flmm_lightning.runs.build import finish_wandb, output_dir_of

P = ParamSpec("P")
R = TypeVar("R")
log = logging.getLogger(__name__)


def refuse_overrides(overrides: Sequence[str], entry_point: str, checkpoint_groups: bool) -> None:
    """Raises ``ConfigError`` for a command-line override the entry point does not take: a setting's earlier
    name, and where the model comes from a checkpoint (``checkpoint_groups``) a model, SAM or module group."""
    if checkpoint_groups:
        refuse_checkpoint_groups(overrides, entry_point)
    refuse_renamed(overrides, entry_point)


def output_location(cfg: DictConfig) -> Path | None:
    """The run folder, or None where the config names none (a config composed in Python without
    ``paths.output_dir``, for a task that writes nothing there)."""
    try:
        return output_dir_of(cfg)
    except ConfigError:
        return None


class Task(Generic[P, R]):
    """An entry point's work (``function(cfg, ...)``) with what every entry point does around it.

    ``user_errors``: the errors of a bad input (an unreadable image, an empty phrase list) that the command
    line reports in one line, ``<name>: <message>``, as it reports a ``ConfigError`` (``error: <message>``).
    ``checkpoint_groups``: the model comes from a checkpoint, so the command line refuses a model, SAM or
    module override before Hydra composes anything."""

    def __init__(
        self,
        function: Callable[Concatenate[DictConfig, P], R],
        name: str,
        user_errors: tuple[type[Exception], ...],
        checkpoint_groups: bool,
    ) -> None:
        functools.update_wrapper(self, function)
        self.function = function
        self.name = name
        self.user_errors = user_errors
        self.checkpoint_groups = checkpoint_groups

    def __call__(self, cfg: DictConfig, *args: P.args, **kwargs: P.kwargs) -> R:
        # The tokenizers' Rust thread pool and forked data-loader workers do not mix (it warns, then runs
        # single-threaded): off from the start, unless the caller chose.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            result = self.function(cfg, *args, **kwargs)
        finally:
            finish_wandb()
        output_dir = output_location(cfg)
        if output_dir is not None:
            log.info("%s: output in %s", self.name, output_dir)
        return result

    def command(self, cfg: DictConfig) -> None:
        """The work under Hydra's main: a configuration error or a bad input ends it with one line, no
        traceback (Hydra would print one)."""
        try:
            self(cfg)
        except ConfigError as error:
            raise SystemExit(f"error: {error}") from None
        except self.user_errors as error:
            raise SystemExit(f"{self.name}: {error}") from None

    def main(self) -> None:
        """The command line, ``python -m flmm_lightning.<name> [overrides]`` with ``conf/<name>.yaml``."""
        try:
            refuse_overrides(sys.argv[1:], self.name, self.checkpoint_groups)
        except ConfigError as error:
            raise SystemExit(f"error: {error}") from None

        # Hydra names the job (and its log file) after the function it runs: through ``__wrapped__``, the
        # entry point's own function, as before the wrapper.
        @functools.wraps(self.function)
        def command(cfg: DictConfig) -> None:
            self.command(cfg)

        hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=self.name)(command)()


def task_wrapper(
    name: str, *, user_errors: tuple[type[Exception], ...] = (), checkpoint_groups: bool = False
) -> Callable[[Callable[Concatenate[DictConfig, P], R]], Task[P, R]]:
    """Decorator: ``function`` as the task of the entry point ``name`` (its config ``conf/<name>.yaml``)."""

    def wrap(function: Callable[Concatenate[DictConfig, P], R]) -> Task[P, R]:
        return Task(function, name, user_errors, checkpoint_groups)

    return wrap
