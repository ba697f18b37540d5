"""Running an entry point's ``main`` as a command line that must stop with ``SystemExit``."""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest


def cli_exit(main: Callable[[], object], argv: list[str], monkeypatch: pytest.MonkeyPatch) -> object:
    """What ``main()`` exits with (``SystemExit.code``: the message, or the status) when run as the command
    line ``argv``; a ``main`` that returns fails the test."""
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exited:
        main()
    return exited.value.code
