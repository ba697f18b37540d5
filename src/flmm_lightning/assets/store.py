"""Where the tiny assets live and how a build reaches it atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

CACHE_ENV = "FLMM_CACHE_DIR"
SPEC_FILE = "flmm_tiny_spec.json"
DEFAULT_INITIALIZER_RANGE = 0.2
DEFAULT_SEED = 0


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$FLMM_CACHE_DIR``, else ``~/.cache/flmm_lightning``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if env := os.environ.get(CACHE_ENV):
        return Path(env).expanduser()
    return Path.home() / ".cache" / "flmm_lightning"


def ensure_built(target: Path, spec: dict, build: Callable[[Path], None]) -> Path:
    """Build into a sibling temp dir, then rename it into place: a killed build never leaves a half directory.

    An existing directory whose recorded spec differs from ``spec`` is replaced; one without one is refused.
    """
    spec_path = target / SPEC_FILE
    if spec_path.is_file() and json.loads(spec_path.read_text()) == spec:
        return target
    if target.exists() and not spec_path.is_file():
        # Only a build of ours (its spec file says so) is ever replaced: this folder is someone else's.
        raise FileExistsError(f"{target} exists and is not a tiny asset built here (no {SPEC_FILE}); move it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would make a shared cache unreadable to others
    try:
        build(tmp)
        (tmp / SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True))
        if target.exists():
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale.", dir=target.parent))
            target.rename(stale / target.name)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            tmp.rename(target)
        except OSError:
            # Another process finished the same build first; its result is as good as ours.
            if not (target / SPEC_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def write_tiny_lmm(
    out_dir: str | os.PathLike, model_class: type, config: Any, processor: Any, seed: int
) -> None:
    """Seeded random weights of ``model_class(config)`` in fp32, saved with its processor."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config).to(torch.float32).eval()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
