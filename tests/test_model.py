"""The model core and its Lightning module on the tiny offline assets: what trains, what stays frozen, what a
checkpoint holds (in this layout and in the one before the core existed)."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from flmm_lightning.core import CheckpointMismatchError
from flmm_lightning.runs.build import build_datamodule, build_module, build_prompt_builder
from flmm_lightning.runs.checkpoints import module_from_checkpoint
from flmm_lightning.training.module import MODEL_PREFIX, FLMMModule, warmup_cosine_factor

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Parameters that the F-LMM forward never uses: SAM's point prompts, its "no mask" embedding (a mask prompt is
# always given) and its IoU head (the loss is on masks). They get no gradient, as in the reference.
UNUSED_BY_DESIGN = (
    "point_embeddings",
    "not_a_point_embed",
    "no_mask_embed",
    "iou_prediction_head",
    "iou_token",
)


@pytest.fixture(scope="module")
def parts(tiny_config):
    prompt_builder = build_prompt_builder(tiny_config)
    datamodule = build_datamodule(tiny_config.data, prompt_builder, tiny_config.sam.image_size)
    torch.manual_seed(0)
    module = build_module(tiny_config)
    dataset = datamodule._encoded(datamodule.train_sets["synthetic_refcoco_train"])
    batch = datamodule.collate([dataset[0], dataset[1]])
    return module, batch


def fresh_module(parts) -> FLMMModule:
    module, _ = parts
    return copy.deepcopy(module)


def test_one_step_trains_only_the_trainable_part(parts):
    model = fresh_module(parts).model
    batch = parts[1]
    model.train()
    frozen_before = {k: v.clone() for k, v in model.lmm.model.state_dict().items()}
    encoder_before = {k: v.clone() for k, v in model.sam.sam.image_encoder.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    loss = model.losses(batch, model(batch))["loss"]
    loss.backward()
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            assert parameter.grad is None, name
        elif any(part in name for part in UNUSED_BY_DESIGN):
            continue
        else:
            assert parameter.grad is not None, f"{name} received no gradient"
            assert torch.isfinite(parameter.grad).all(), name
    assert model.lmm.text_layer_weights.grad.abs().sum() > 0
    assert model.mask_head.conv_seg.weight.grad.abs().sum() > 0
    optimizer.step()

    assert not model.lmm.model.training and not model.sam.sam.image_encoder.training
    for key, value in model.lmm.model.state_dict().items():
        assert torch.equal(value, frozen_before[key]), key
    for key, value in model.sam.sam.image_encoder.state_dict().items():
        assert torch.equal(value, encoder_before[key]), key


def test_unet_learns_through_the_sam_mask_prompt(parts):
    """With the coarse losses switched off, the U-Net still gets a gradient: through SAM's mask prompt."""
    model = fresh_module(parts).model
    batch = parts[1]
    model.loss_weights = {"coarse_bce": 0.0, "coarse_dice": 0.0, "fine_bce": 1.0, "fine_dice": 1.0}
    model.losses(batch, model(batch))["loss"].backward()
    gradient = model.mask_head.conv_seg.weight.grad
    assert gradient is not None and gradient.abs().sum() > 0


@pytest.mark.slow
def test_fitting_one_batch_lowers_the_loss(parts):
    model = fresh_module(parts).model
    batch = parts[1]
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(30):
        loss = model.losses(batch, model(batch))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert min(losses[-5:]) < 0.7 * losses[0], losses


def before_the_core(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict as the module wrote it before the model core existed: the same keys without ``model.``."""
    assert all(key.startswith(MODEL_PREFIX) for key in state_dict)
    return {key.removeprefix(MODEL_PREFIX): value for key, value in state_dict.items()}


@pytest.mark.parametrize("layout", ["current", "before_the_core"])
def test_checkpoint_round_trip_gives_identical_predictions(parts, tmp_path, tiny_config, layout):
    from flmm_lightning.runs.build import run_config

    module = fresh_module(parts)
    batch = parts[1]
    with torch.no_grad():
        module.model.mask_head.conv_seg.bias.add_(0.25)  # differ from a fresh initialisation
    path = tmp_path / "model.ckpt"
    state_dict = module.state_dict() if layout == "current" else before_the_core(module.state_dict())
    torch.save({"state_dict": state_dict, "flmm_config": run_config(tiny_config)}, path)

    frozen = ("model.lmm.model.", "model.sam.sam.image_encoder.")
    assert not any(key.startswith(frozen) for key in module.state_dict())
    restored = module_from_checkpoint(path).module
    module.eval()
    restored.eval()
    with torch.no_grad():
        expected, actual = module(batch), restored(batch)
    for a, b in zip(expected, actual, strict=True):
        assert torch.equal(a.fine_logits, b.fine_logits)
        assert torch.equal(a.coarse_logits, b.coarse_logits)


def test_checkpoint_missing_key_is_named(parts):
    model = fresh_module(parts).model
    state = model.trainable_state_dict()
    del state["lmm.text_proj.weight"]
    with pytest.raises(CheckpointMismatchError, match=r"lmm\.text_proj\.weight"):
        model.load_trainable_state_dict(state)


def test_checkpoint_shape_mismatch_is_named(parts):
    model = fresh_module(parts).model
    state = model.trainable_state_dict()
    key = next(k for k in state if k.startswith("mask_head.") and state[k].dim() == 4)
    state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] * 2, *state[key].shape[2:])
    with pytest.raises(CheckpointMismatchError, match="layers x heads") as error:
        model.load_trainable_state_dict(state)
    assert key in str(error.value)


@pytest.mark.parametrize("layout", ["current", "before_the_core"])
def test_lightning_restores_a_checkpoint_of_either_layout(parts, layout):
    """What Lightning does on resume: ``on_load_checkpoint``, then a strict ``load_state_dict`` of the
    (possibly rewritten) checkpoint; the frozen parts, in neither layout, keep their weights."""
    source = fresh_module(parts)
    with torch.no_grad():
        source.model.mask_head.conv_seg.bias.add_(0.25)
    state_dict = source.state_dict() if layout == "current" else before_the_core(source.state_dict())
    checkpoint = {"state_dict": {key: value.clone() for key, value in state_dict.items()}}
    target = fresh_module(parts)
    frozen_before = {k: v.clone() for k, v in target.model.lmm.model.state_dict().items()}

    target.on_load_checkpoint(checkpoint)
    target.load_state_dict(checkpoint["state_dict"])

    assert torch.equal(target.model.mask_head.conv_seg.bias, source.model.mask_head.conv_seg.bias)
    for key, value in target.model.lmm.model.state_dict().items():
        assert torch.equal(value, frozen_before[key]), key


def test_lightning_refuses_a_mismatched_checkpoint_before_loading_anything(parts):
    module = fresh_module(parts)
    state = before_the_core(module.state_dict())
    del state["lmm.text_proj.weight"]
    with pytest.raises(CheckpointMismatchError, match=r"lmm\.text_proj\.weight"):
        module.on_load_checkpoint({"state_dict": state})


def test_the_keyword_selector_trains_at_its_own_learning_rate(parts, tiny_config):
    module = fresh_module(parts)
    optimizer = module.optimizer_factory(params=module.parameter_groups())
    learning_rates = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert sorted(learning_rates) == sorted(id(p) for p in trainable)  # each once, none frozen
    selector = {id(p) for p in module.model.lmm.keyword_selector.parameters()}
    assert selector and tiny_config.module.keyword_selector_lr != tiny_config.module.optimizer.lr
    for p in trainable:
        expected = (
            tiny_config.module.keyword_selector_lr if id(p) in selector else tiny_config.module.optimizer.lr
        )
        assert learning_rates[id(p)] == expected
    module.keyword_selector_lr = None
    assert [len(group["params"]) for group in module.parameter_groups()] == [len(trainable)]


def test_schedule_warms_up_then_decays_to_zero():
    total = 1000
    factors = [warmup_cosine_factor(step, total, 0.03, 1e-5) for step in range(total + 1)]
    assert factors[0] == pytest.approx(1e-5)
    assert factors[30] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(factors[:30], factors[1:31], strict=True))
    assert all(a >= b for a, b in zip(factors[30:-1], factors[31:], strict=True))
    assert factors[-1] == pytest.approx(0.0, abs=1e-12)


def _logits(predictions) -> list[torch.Tensor]:
    return [t for p in predictions for t in (p.coarse_logits, p.fine_logits)]


@torch.no_grad()
def test_heads_evaluate_in_fp32_under_a_bf16_trainer(parts):
    """As in the reference's evaluation: U-Net and SAM in fp32 outside training, whatever the autocast."""
    model = fresh_module(parts).model
    batch = parts[1]
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        evaluated = model(batch)  # the LMM under autocast, as a bf16-mixed trainer runs it
    # the fp32 computation of the heads on the very same LMM outputs, no autocast anywhere
    expected = _logits(model.decode(batch, [p.features for p in evaluated]))
    assert all(t.dtype == torch.float32 for t in _logits(evaluated))
    for got, want in zip(_logits(evaluated), expected, strict=True):
        assert torch.equal(got, want)

    model.eval_heads_fp32 = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert all(t.dtype == torch.bfloat16 for t in _logits(model(batch)))
    model.eval_heads_fp32 = True
    model.train()  # training keeps the trainer's precision
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert all(t.dtype == torch.bfloat16 for t in _logits(model(batch)))
