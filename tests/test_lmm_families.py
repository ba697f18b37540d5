"""What every LMM family must do on its tiny variant, through the Hydra config a user names it by: fused
attention capture equals eager, the context limit counts the tokens the LMM sees, one training step of the
whole module changes only trainable weights, the U-Net reads the family's channels, and
``+experiment=demo model=tiny_<family>`` trains and evaluates."""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import tiny_overrides
from hydra.utils import get_class, instantiate
from samples import make_sample, png_like
from transformers import AutoConfig

from flmm_lightning.boundaries import ContextOverflowError
from flmm_lightning.config.composition import CONF_DIR
from flmm_lightning.lmm.hf import HFGroundingAdapter
from flmm_lightning.lmm.prompting import ChatPromptBuilder
from flmm_lightning.runs.build import build_datamodule, build_module, build_prompt_builder
from flmm_lightning.runs.checkpoints import load_checkpoint
from flmm_lightning.train import train

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# config name -> attention maps per layer and head (LLaVA-NeXT and OneVision stack their base and any-res
# grids, InternVL its thumbnail and tile grids).
FAMILIES = {
    "tiny_qwen2_5_vl": 1,
    "tiny_qwen3_vl": 1,
    "tiny_llava": 1,
    "tiny_llava_next": 2,
    "tiny_deepseek_vl": 1,
    "tiny_deepseek_vl_hybrid": 1,
    "tiny_internvl": 2,
    "tiny_llava_onevision": 2,
    "tiny_gemma3": 1,
}


# Two image sizes, so that a batch of both has two grids and a padded sequence.
WIDE = make_sample(100, 150, ["a man in a red shirt", "the dog on the left", "Café"], 0)
TALL = png_like(230, 90)
MODEL_CONFIGS = sorted(path.stem for path in (CONF_DIR / "model").glob("*.yaml"))


def test_every_tiny_model_config_is_exercised_here():
    assert {name for name in MODEL_CONFIGS if name.startswith("tiny_")} == set(FAMILIES)


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_model_config_names_one_family_and_a_real_checkpoint(name, compose_config):
    cfg = compose_config([f"model={name}"])
    assert cfg.model.name == name
    adapter, builder = get_class(cfg.model.lmm._target_), get_class(cfg.model.prompt._target_)
    assert issubclass(adapter, HFGroundingAdapter) and issubclass(builder, ChatPromptBuilder)
    assert adapter.__module__ == builder.__module__  # the family's one file
    assert cfg.model.lmm.text_proj_dim == cfg.sam.embed_dim and not cfg.model.trust_remote_code
    if not name.startswith("tiny_"):
        organisation, _, model = cfg.model.pretrained.partition("/")
        assert organisation and model and "/" not in model  # a hub id


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
    assert type(module.model.lmm).__module__.startswith("flmm_lightning.lmm.")

    text = AutoConfig.from_pretrained(cfg.model.pretrained).text_config
    first_conv = next(m for m in module.model.mask_head.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == FAMILIES[family] * text.num_hidden_layers * text.num_attention_heads

    datamodule = build_datamodule(cfg.data, build_prompt_builder(cfg), cfg.sam.image_size)
    encoded = datamodule._encoded(datamodule.train_sets["synthetic_refcoco_train"])
    batch = datamodule.collate([encoded[0], encoded[1]])  # two image sizes: a padded LMM batch

    frozen_before = {k: v.clone() for k, v in module.model.lmm.model.state_dict().items()}
    trainable = {name: p.detach().clone() for name, p in module.model.named_parameters() if p.requires_grad}
    assert trainable and not any(name.startswith("lmm.model.") for name in trainable)

    module.train()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    loss = module.model.losses(batch, module.model(batch))["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()

    frozen_after = module.model.lmm.model.state_dict()
    assert frozen_after.keys() == frozen_before.keys()
    assert all(torch.equal(frozen_after[k], v) for k, v in frozen_before.items())
    changed = {
        name
        for name, p in module.model.named_parameters()
        if p.requires_grad and not torch.equal(p, trainable[name])
    }
    assert {"lmm.text_proj.weight", "lmm.text_layer_weights"} <= changed
    assert any(name.startswith("mask_head.") for name in changed)
    assert any(name.startswith("sam.") for name in changed)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_attention_equals_eager_on_a_padded_batch(family, compose_config, tmp_path):
    cfg = compose_config([*tiny_overrides(tmp_path / "data", tmp_path / "run"), f"model={family}"])
    builder = build_prompt_builder(cfg)
    batch = builder.collate([builder(WIDE), builder(TALL)])
    assert len(set(batch.attention_mask.sum(dim=1).tolist())) == 2  # one sample is padded
    fused = instantiate(cfg.model.lmm, capture="fused", torch_dtype="float32")
    eager = instantiate(cfg.model.lmm, capture="eager", torch_dtype="float32")
    eager.load_state_dict(fused.state_dict())
    with torch.no_grad():
        for f, e in zip(fused(batch), eager(batch), strict=True):
            assert f.attention_maps.shape == e.attention_maps.shape
            assert f.attention_maps.shape[1] == fused.attention_channels
            torch.testing.assert_close(f.attention_maps, e.attention_maps, rtol=0, atol=1e-5)
            # Hidden states come from different attention kernels (SDPA vs eager): close, not bit-equal.
            for a, b in zip(f.text_embeddings, e.text_embeddings, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_context_limit_counts_exactly_the_tokens_the_lmm_sees(family, compose_config, tmp_path):
    cfg = compose_config([*tiny_overrides(tmp_path / "data", tmp_path / "run"), f"model={family}"])
    sample = WIDE
    total = len(build_prompt_builder(cfg)(sample).input_ids)

    exact = instantiate(cfg.model.prompt, max_length=total)
    assert len(exact(sample).input_ids) == total and exact.fit_to_context(sample) is sample
    short = instantiate(cfg.model.prompt, max_length=total - 1)
    with pytest.raises(ContextOverflowError, match=f"{total} tokens exceed the LMM's context of {total - 1}"):
        short(sample)
    # Only the final "." overflows: it is cut, every object stays, and their maps are the full sequence's.
    fitted = short.fit_to_context(sample)
    assert fitted.phrases == sample.phrases and fitted.utterances == sample.utterances[:-1]
    short(fitted)  # fits

    final_dot = len(short.processor.tokenizer.encode(".", add_special_tokens=False))
    tight = instantiate(cfg.model.prompt, max_length=total - final_dot - 1)
    with pytest.warns(UserWarning, match="its last 1 of 3 objects are dropped"):
        fitted = tight.fit_to_context(sample)
    assert fitted.phrases == sample.phrases[:2] and fitted.num_dropped_objects == 1


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
    assert not any(key.startswith("model.lmm.model.") for key in checkpoint["state_dict"])
