"""What every LMM family must do on its tiny variant, through the Hydra config a user names it by:
one training step of the whole module changes only trainable weights, the U-Net reads the family's channels,
and ``+experiment=demo model=tiny_<family>`` trains and evaluates."""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import tiny_overrides
from transformers import AutoConfig

from flmm_lightning.builders import build_datamodule, build_module, build_prompt_builder, load_checkpoint
from flmm_lightning.train import train

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# config name -> attention maps per layer and head (LLaVA-NeXT stacks its base and any-res grids).
FAMILIES = {
    "tiny_qwen2_5_vl": 1,
    "tiny_qwen3_vl": 1,
    "tiny_llava": 1,
    "tiny_llava_next": 2,
    "tiny_deepseek_vl": 1,
    "tiny_deepseek_vl_hybrid": 1,
}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: two spinning OpenMP threads on a small shared machine slow a CPU step down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_training_step_changes_only_trainable_weights(family, compose_config, tmp_path):
    cfg = compose_config([*tiny_overrides(tmp_path / "data", tmp_path / "run"), f"model={family}"])
    module = build_module(cfg)
    assert type(module.lmm).__module__.startswith("flmm_lightning.lmm.")

    text = AutoConfig.from_pretrained(cfg.model.pretrained).text_config
    first_conv = next(m for m in module.mask_head.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == FAMILIES[family] * text.num_hidden_layers * text.num_attention_heads

    datamodule = build_datamodule(cfg.data, build_prompt_builder(cfg), cfg.sam.image_size)
    encoded = datamodule._encoded(datamodule.train_sets["synthetic_refcoco_train"])
    batch = datamodule.collate([encoded[0], encoded[1]])  # two image sizes: a padded LMM batch

    frozen_before = {k: v.clone() for k, v in module.lmm.model.state_dict().items()}
    trainable = {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}
    assert trainable and not any(name.startswith("lmm.model.") for name in trainable)

    module.train()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    loss = module._losses(batch, module(batch))["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()

    frozen_after = module.lmm.model.state_dict()
    assert frozen_after.keys() == frozen_before.keys()
    assert all(torch.equal(frozen_after[k], v) for k, v in frozen_before.items())
    changed = {
        name
        for name, p in module.named_parameters()
        if p.requires_grad and not torch.equal(p, trainable[name])
    }
    assert {"lmm.text_proj.weight", "lmm.text_layer_weights"} <= changed
    assert any(name.startswith("mask_head.") for name in changed)
    assert any(name.startswith("sam.") for name in changed)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_demo_trains_and_evaluates(family, compose_config, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [
        *tiny_overrides(tmp_path / "data", run_dir),
        f"model={family}",
        f"paths.output_dir={run_dir}",
        "data.batch_size=2",
        "data.eval_batch_size=2",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
    ]
    results = train(compose_config(overrides))
    assert {"synthetic_refcoco_val", "synthetic_png_val"} <= results.keys()
    assert all(math.isfinite(v) for v in results["synthetic_refcoco_val"].values())
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 3
    assert checkpoint["flmm_config"]["model"]["name"] == family
    assert not any(key.startswith("lmm.model.") for key in checkpoint["state_dict"])
