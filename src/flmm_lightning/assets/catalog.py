"""The tiny assets by name: their recipes, the cached builds, ``ensure_asset`` for the configs and the CLI."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from flmm_lightning.assets.deepseek import build_tiny_deepseek_vl
from flmm_lightning.assets.gemma import build_tiny_gemma3
from flmm_lightning.assets.internvl import build_tiny_internvl
from flmm_lightning.assets.llava import build_tiny_llava
from flmm_lightning.assets.onevision import build_tiny_llava_onevision
from flmm_lightning.assets.qwen import build_tiny_qwen2_5_vl, build_tiny_qwen3_vl
from flmm_lightning.assets.sam import TINY_SAM, ensure_tiny_sam, tiny_sam_path
from flmm_lightning.assets.store import DEFAULT_INITIALIZER_RANGE, DEFAULT_SEED, cache_root, ensure_built

TINY_QWEN2_5_VL = "tiny_qwen2_5_vl"
TINY_QWEN3_VL = "tiny_qwen3_vl"
TINY_LLAVA = "tiny_llava"
TINY_LLAVA_NEXT = "tiny_llava_next"
TINY_DEEPSEEK_VL = "tiny_deepseek_vl"
TINY_DEEPSEEK_VL_HYBRID = "tiny_deepseek_vl_hybrid"
TINY_INTERNVL = "tiny_internvl"
TINY_LLAVA_ONEVISION = "tiny_llava_onevision"
TINY_GEMMA3 = "tiny_gemma3"


@dataclass(frozen=True)
class TinyLMMRecipe:
    """How one tiny LMM is written: ``build(out_dir, initializer_range, seed)``. Bump ``version`` whenever
    ``build`` changes, so that stale caches are rebuilt."""

    version: int
    build: Callable[[Path, float, int], None]


def ensure_tiny_lmm(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    initializer_range: float = DEFAULT_INITIALIZER_RANGE,
    seed: int = DEFAULT_SEED,
) -> Path:
    """Path of the tiny LMM checkpoint ``name`` (a key of ``TINY_LMMS``), built on first use or when its
    recipe changed."""
    recipe = TINY_LMMS[name]
    spec = {"name": name, "version": recipe.version, "initializer_range": initializer_range, "seed": seed}
    return ensure_built(
        asset_path(name, cache_dir), spec, lambda out: recipe.build(out, initializer_range, seed)
    )


TINY_LMMS: dict[str, TinyLMMRecipe] = {
    TINY_QWEN2_5_VL: TinyLMMRecipe(1, build_tiny_qwen2_5_vl),
    TINY_QWEN3_VL: TinyLMMRecipe(1, build_tiny_qwen3_vl),
    TINY_LLAVA: TinyLMMRecipe(2, build_tiny_llava),
    TINY_LLAVA_NEXT: TinyLMMRecipe(2, partial(build_tiny_llava, anyres=True)),
    TINY_DEEPSEEK_VL: TinyLMMRecipe(1, build_tiny_deepseek_vl),
    TINY_DEEPSEEK_VL_HYBRID: TinyLMMRecipe(1, partial(build_tiny_deepseek_vl, hybrid=True)),
    TINY_INTERNVL: TinyLMMRecipe(1, build_tiny_internvl),
    TINY_LLAVA_ONEVISION: TinyLMMRecipe(1, build_tiny_llava_onevision),
    TINY_GEMMA3: TinyLMMRecipe(1, build_tiny_gemma3),
}
ensure_tiny_qwen2_5_vl = partial(ensure_tiny_lmm, TINY_QWEN2_5_VL)
ensure_tiny_qwen3_vl = partial(ensure_tiny_lmm, TINY_QWEN3_VL)
ensure_tiny_llava = partial(ensure_tiny_lmm, TINY_LLAVA)
ensure_tiny_llava_next = partial(ensure_tiny_lmm, TINY_LLAVA_NEXT)
ensure_tiny_deepseek_vl = partial(ensure_tiny_lmm, TINY_DEEPSEEK_VL)
ensure_tiny_deepseek_vl_hybrid = partial(ensure_tiny_lmm, TINY_DEEPSEEK_VL_HYBRID)
ensure_tiny_internvl = partial(ensure_tiny_lmm, TINY_INTERNVL)
ensure_tiny_llava_onevision = partial(ensure_tiny_lmm, TINY_LLAVA_ONEVISION)
ensure_tiny_gemma3 = partial(ensure_tiny_lmm, TINY_GEMMA3)

# name -> builder, for ``${flmm_asset:<name>,<cache_dir>}`` in the configs and for the CLI.
ASSETS: dict[str, Callable[..., Path]] = {
    **{name: partial(ensure_tiny_lmm, name) for name in TINY_LMMS},
    TINY_SAM: ensure_tiny_sam,
}


def _check_name(name: str) -> None:
    if name not in ASSETS:
        raise KeyError(f"unknown asset {name!r}; known: {sorted(ASSETS)}")


def asset_path(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the named tiny asset is once built (``${flmm_asset:<name>,<cache_dir>}``); builds nothing."""
    _check_name(name)
    return tiny_sam_path(cache_dir) if name == TINY_SAM else cache_root(cache_dir) / name


def ensure_asset(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the named tiny asset, built on first use."""
    _check_name(name)
    return ASSETS[name](cache_dir=cache_dir)
