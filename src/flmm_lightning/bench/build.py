"""The bench's configuration: ``conf/train.yaml`` composed with the same groups and overrides as ``train``,
and the module and prompt builder built from it by the entry points' own builders."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from flmm_lightning.boundaries import PromptBuilder
from flmm_lightning.config.composition import CONF_DIR, register_resolvers
from flmm_lightning.runs.build import build_module, build_prompt_builder
from flmm_lightning.training.module import FLMMModule


@dataclass(frozen=True)
class Size:
    """A ``--size`` shortcut: Hydra overrides, bench defaults, and whether the LMM gets random weights."""

    overrides: tuple[str, ...] = ()
    steps: int = 5
    warmup: int = 2
    image_size: tuple[int, int] | None = None  # None: the images as the data config gives them
    random_lmm: str | None = None  # "module:function" returning the architecture's transformers config
    needs_gpu: bool = False


SIZES: dict[str, Size] = {
    # train.yaml's own defaults: model=tiny_qwen2_5_vl sam=tiny data=synthetic (batch 4).
    "tiny": Size(),
    # The real Qwen2.5-VL-3B and SAM ViT-L architectures (those of +experiment=refcoco), random weights built
    # on the GPU; the tiny asset's tokenizer and chat template (same vocabulary); COCO-sized 640x480 images.
    "qwen2_5_vl_3b": Size(
        overrides=(
            "model=qwen2_5_vl_3b",
            "sam=vit_l",
            "sam.refiner.sam.checkpoint=null",
            "data.batch_size=8",
        ),
        steps=10,
        warmup=3,
        image_size=(640, 480),
        random_lmm="flmm_lightning.bench.architectures.qwen2_5_vl_3b_config",
        needs_gpu=True,
    ),
}


def merge_overrides(base: tuple[str, ...], extra: list[str]) -> list[str]:
    """``base`` then ``extra``; an override in ``extra`` replaces the one in ``base`` for the same key."""
    keys = {override.split("=", 1)[0].lstrip("+~") for override in extra}
    return [o for o in base if o.split("=", 1)[0].lstrip("+~") not in keys] + list(extra)


def compose_bench_config(size: Size, overrides: list[str]) -> DictConfig:
    """``conf/train.yaml`` with the size's overrides and then the command line's, as ``train`` composes it."""
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=merge_overrides(size.overrides, overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    if size.random_lmm is not None:
        # The LMM from its architecture (Hydra instantiates the nested node into the adapter's
        # ``pretrained``); the prompt builder reads the tiny asset's processor (the release's vocabulary).
        OmegaConf.update(cfg, "model.lmm.pretrained", {"_target_": size.random_lmm}, merge=False)
        OmegaConf.update(cfg, "model.prompt.pretrained", "${flmm_asset:tiny_qwen2_5_vl,${paths.cache_dir}}")
    return cfg


def build_bench_module(cfg: DictConfig, size: Size, device: torch.device) -> tuple[FLMMModule, PromptBuilder]:
    """The module in training mode on ``device`` and the prompt builder, from ``cfg``.

    Random weights are created on the device directly: a random 3.8B-parameter init on the CPU takes minutes.
    """
    if size.random_lmm is not None:
        with torch.device(device):
            module = build_module(cfg)
    else:
        module = build_module(cfg)
    return module.to(device).train(), build_prompt_builder(cfg)
