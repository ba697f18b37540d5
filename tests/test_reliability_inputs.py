"""Untrusted files, wrong checkpoints, config mistakes and oversized inputs: each is refused or handled by
a rule, with a message that names what is wrong."""

from __future__ import annotations

import ipaddress
import os
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_overrides
from hydra.errors import MissingConfigException
from lightning import Trainer
from PIL import Image
from test_reliability_resume import FAST, QUIET, one_thread  # noqa: F401 - a fixture
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    Qwen2_5_VLForConditionalGeneration,
)

from flmm_lightning.assets import build_tiny_qwen2_5_vl_processor, tiny_qwen2_5_vl_config
from flmm_lightning.boundaries import ContextOverflowError, GroundingSample
from flmm_lightning.config.composition import CONF_DIR
from flmm_lightning.config.errors import ConfigError
from flmm_lightning.core import CheckpointMismatchError
from flmm_lightning.data.batch import EncodedDataset
from flmm_lightning.data.datamodule import GroundingDataModule
from flmm_lightning.eval import evaluate
from flmm_lightning.inference.grounder import Grounder
from flmm_lightning.runs.build import build_datamodule, build_module, build_prompt_builder
from flmm_lightning.runs.checkpoints import load_checkpoint, module_from_checkpoint
from flmm_lightning.train import train
from flmm_lightning.training.callbacks import BadSampleReport

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.usefixtures("one_thread")


def run_overrides(tmp_path: Path, name: str = "run") -> list[str]:
    """The demo on the small synthetic set, run through the entry-point functions (no Hydra run dir)."""
    return [*tiny_overrides(tmp_path / "data", tmp_path / name), f"paths.output_dir={tmp_path / name}", *FAST]


# ---- untrusted files -------------------------------------------------------------------------------------
class _CreatesFile:
    """Unpickling this calls ``open(target, "w")``: a stand-in for any code a pickle can run."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple:
        return (open, (str(self.target), "w"))


def test_checkpoint_carrying_a_pickled_callable_is_refused(compose_config, tmp_path: Path) -> None:
    target = tmp_path / "pwned.txt"
    path = tmp_path / "malicious.ckpt"
    state = {"mask_head.conv_seg.bias": torch.zeros(1)}
    torch.save({"state_dict": state, "flmm_config": {}, "callbacks": _CreatesFile(target)}, path)

    with pytest.raises(
        ValueError, match=r"cannot load checkpoint .*malicious\.ckpt safely \(weights_only=True\)"
    ):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="weights_only=True"):
        module_from_checkpoint(path)
    eval_cfg = compose_config([f"ckpt={path}", f"paths.output_dir={tmp_path / 'eval'}"], config_name="eval")
    with pytest.raises(ValueError, match="weights_only=True"):
        evaluate(eval_cfg)
    # A resume checks the checkpoint's model before Lightning loads it, with weights_only=True too.
    train_cfg = compose_config([*run_overrides(tmp_path), *QUIET, f"ckpt_path={path}", "callbacks=none"])
    with pytest.raises(ValueError, match="weights_only=True"):
        train(train_cfg)
    assert not target.exists()


@pytest.mark.slow
def test_trust_remote_code_stays_off_unless_set(compose_config, tmp_path: Path, monkeypatch) -> None:
    calls: list[tuple[str, Any]] = []

    def spy(cls: type) -> None:
        original = cls.from_pretrained

        def from_pretrained(*args: Any, **kwargs: Any) -> Any:
            calls.append((cls.__name__, kwargs.get("trust_remote_code", "not passed")))
            return original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", from_pretrained)

    for cls in (AutoModelForImageTextToText, AutoProcessor, AutoConfig):
        spy(cls)
    for name in sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml")):
        cfg = compose_config([*run_overrides(tmp_path), f"model={name}"])
        assert cfg.model.lmm.trust_remote_code is False, name

    cfg = compose_config(run_overrides(tmp_path))
    build_module(cfg)
    assert build_prompt_builder(cfg).context_length == 4096  # loads the processor and the config
    assert {name for name, _ in calls} == {"AutoModelForImageTextToText", "AutoProcessor", "AutoConfig"}
    assert all(value is False for _, value in calls), calls

    calls.clear()
    build_module(compose_config([*run_overrides(tmp_path), "model.trust_remote_code=true"]))
    assert ("AutoModelForImageTextToText", True) in calls


def _is_local(family: int, address: Any) -> bool:
    if family == socket.AF_UNIX:
        return True
    host = address[0] if isinstance(address, tuple) else address
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@pytest.fixture
def no_network(monkeypatch) -> Iterator[list[str]]:
    """Any connection or name lookup beyond this machine fails the test (and is recorded)."""
    attempts: list[str] = []
    connect, connect_ex, getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def guarded(original):
        def call(sock: socket.socket, address: Any) -> Any:
            if not _is_local(sock.family, address):
                attempts.append(f"connect {address}")
                raise OSError(f"network access in a test: {address}")
            return original(sock, address)

        return call

    def guarded_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host is not None and not _is_local(
            socket.AF_INET, host if isinstance(host, str) else host.decode()
        ):
            attempts.append(f"getaddrinfo {host}")
            raise socket.gaierror(f"network access in a test: {host}")
        return getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded(connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guarded(connect_ex))
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    with pytest.raises(OSError):  # the guard is armed
        socket.create_connection(("192.0.2.1", 80), timeout=1)
    attempts.clear()
    yield attempts
    assert not attempts, attempts


@pytest.mark.slow
def test_offline_demo_train_eval_predict_never_touch_the_network(
    compose_config, tmp_path: Path, no_network
) -> None:
    """The demo (offline W&B logger included) trains a step and tests, then eval and predict run on its
    checkpoint; a socket-level guard fails on any non-local connection or name lookup."""
    train_cfg = compose_config(
        [
            *run_overrides(tmp_path),
            "logger=wandb",
            "trainer.max_steps=1",
            "trainer.limit_val_batches=0",
            "trainer.limit_test_batches=1",
            "callbacks.model_checkpoint.every_n_train_steps=1",
        ]
    )
    assert train(train_cfg)
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    eval_cfg = compose_config(
        [f"ckpt={checkpoint}", f"paths.output_dir={tmp_path / 'eval'}", "trainer.limit_test_batches=1"],
        config_name="eval",
    )
    assert evaluate(eval_cfg)
    grounding = Grounder.from_checkpoint(checkpoint, device="cpu").ground(
        Image.new("RGB", (64, 48)), ["a cat"]
    )
    assert len(grounding.to_json()) == 1


# ---- wrong checkpoints -----------------------------------------------------------------------------------
def test_checkpoint_of_another_lmm_is_refused_and_loads_nothing(compose_config, tmp_path: Path) -> None:
    """A checkpoint trained on a 2-layer variant of the tiny Qwen2.5-VL (2 x 4 = 8 attention channels),
    loaded into the 4-layer model (16 channels), directly and by resuming training."""
    other_lmm = tmp_path / "tiny_qwen2_5_vl_2_layers"
    config = tiny_qwen2_5_vl_config()
    text = config.text_config
    text.num_hidden_layers = text.max_window_layers = 2
    text.layer_types = text.layer_types[:2]
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(other_lmm)
    build_tiny_qwen2_5_vl_processor().save_pretrained(other_lmm)
    steps = ["trainer.max_steps=1", "callbacks.model_checkpoint.every_n_train_steps=1", *QUIET]
    train(compose_config([*run_overrides(tmp_path, "other"), f"model.pretrained={other_lmm}", *steps]))
    checkpoint = tmp_path / "other" / "checkpoints" / "last.ckpt"

    cfg = compose_config(run_overrides(tmp_path))
    module = build_module(cfg)
    before = {key: value.clone() for key, value in module.model.trainable_state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as error:
        module.load_checkpoint_weights(load_checkpoint(checkpoint)["state_dict"])
    message = str(error.value)
    assert "lmm.text_layer_weights: shape (2,) in the checkpoint, (4,) in the model" in message
    first_conv = next(k for k, v in before.items() if k.startswith("mask_head.") and v.dim() == 4)
    assert f"{first_conv}: shape" in message and "layers x heads = 16" in message
    after = module.model.trainable_state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)  # nothing half-loaded

    # A resume compares the stored model identity first: the pretrained weights differ.
    with pytest.raises(
        CheckpointMismatchError, match=r"another model \(model\.pretrained: 'tiny_qwen2_5_vl_2_layers'"
    ):
        train(compose_config([*run_overrides(tmp_path, "resumed"), *steps, f"ckpt_path={checkpoint}"]))


# ---- config mistakes -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "group"),
    [("+experiment=refcoco_typo", "experiment"), ("model=qwen2_5_vl_3b_typo", "model")],
)
def test_unknown_config_name_lists_the_valid_ones(compose_config, override: str, group: str) -> None:
    with pytest.raises(MissingConfigException) as error:
        compose_config([override])
    message = str(error.value)
    assert f"Could not find '{group}/{override.split('=')[1]}'" in message
    for name in (p.stem for p in (CONF_DIR / group).glob("*.yaml")):
        assert f"\t{name}\n" in message + "\n", (name, message)


@pytest.mark.parametrize(
    ("data", "key", "missing_file"),
    [
        ("refcoco", "data.train_sets.refcoco_train", "coco/refcoco/refs(unc).p"),
        ("png", "data.train_sets.png_train", "coco/annotations/png_coco_train2017.json"),
    ],
)
def test_missing_data_path_names_the_path_and_the_config_key(
    compose_config, tmp_path: Path, data: str, key: str, missing_file: str
) -> None:
    data_dir = tmp_path / "no_such_dir"
    cfg = compose_config([f"data={data}", f"paths.data_dir={data_dir}"])
    with pytest.raises(ConfigError) as error:
        build_datamodule(cfg.data, build_prompt_builder(cfg), cfg.sam.image_size)
    assert str(error.value).startswith(f"{key}: ")
    assert str(data_dir / missing_file) in str(error.value)


# ---- oversized inputs ------------------------------------------------------------------------------------
def grounding_sample(image: Image.Image, phrases: list[str], image_id: str = "long") -> GroundingSample:
    sample = GroundingSample.for_inference(image, phrases, image_id=image_id, file_name=f"{image_id}.jpg")
    for k in range(sample.num_objects):
        sample.masks[k, : image.height // 2, k % image.width] = True
    return sample


def utterance_ids(sample: GroundingSample, builder) -> list[int]:
    tokenizer = builder.processor.tokenizer
    return [i for text, _ in sample.utterances for i in tokenizer.encode(text, add_special_tokens=False)]


@pytest.fixture(scope="module")
def prompt_builder(tiny_config):
    return build_prompt_builder(tiny_config)


@pytest.mark.slow
def test_phrases_beyond_the_lmm_context_lose_their_trailing_objects(tiny_config, prompt_builder) -> None:
    """12 phrases of ~390 tokens: far beyond the tiny LMM's 4096 positions (Qwen's rotary positions would
    not fail there: the limit is ours). Training keeps the objects that fit, warns, and counts the rest;
    evaluation and prediction refuse the sample."""
    assert (
        prompt_builder.context_length == tiny_qwen2_5_vl_config().text_config.max_position_embeddings == 4096
    )
    sample = grounding_sample(Image.new("RGB", (96, 64), (90, 120, 40)), ["the green square " * 130] * 12)

    with pytest.warns(
        UserWarning,
        match=r"sample long \(long\.jpg\): \d+ tokens exceed the LMM's context of "
        r"4096; its last (\d+) of 12 objects are dropped",
    ):
        fitted = prompt_builder.fit_to_context(sample)
    kept = fitted.num_objects
    assert 0 < kept < 12 and fitted.num_dropped_objects == 12 - kept
    assert fitted.phrases == sample.phrases[:kept] and torch.equal(fitted.masks, sample.masks[:kept])
    prompt = prompt_builder(fitted)
    assert prompt.input_ids.numel() <= 4096 and int(prompt.mask_ids.max()) == kept - 1
    # The sequence is the full one cut after the kept objects: their tokens and context are unchanged.
    assert utterance_ids(sample, prompt_builder)[: len(utterance_ids(fitted, prompt_builder))] == (
        utterance_ids(fitted, prompt_builder)
    )

    with pytest.raises(ContextOverflowError, match=r"sample long \(long\.jpg\): \d+ tokens exceed .* 4096"):
        prompt_builder(sample)
    with pytest.raises(ContextOverflowError):
        EncodedDataset([sample], prompt_builder, tiny_config.sam.image_size)[0]  # evaluation's encoding
    with pytest.raises(ContextOverflowError, match="not even its first object fits"):
        prompt_builder.fit_to_context(grounding_sample(sample.image, ["square " * 5000]))

    # Training: the module gets the kept objects and logs how many were dropped.
    module = build_module(tiny_config)
    datamodule = GroundingDataModule(
        prompt_builder, tiny_config.sam.image_size, train_sets={"long": [sample]}, num_workers=0
    )
    trainer = Trainer(
        max_steps=1,
        callbacks=[BadSampleReport()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer.fit(module, datamodule=datamodule)
    assert float(trainer.callback_metrics["train/dropped_objects"]) == 12 - kept
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_image_above_the_pixel_cap_is_downscaled_with_a_warning(tiny_config, prompt_builder) -> None:
    image = Image.new("RGB", (1200, 900), (200, 30, 30))
    sample = grounding_sample(image, ["the red image", "its left edge"], image_id="big")
    cap = tiny_config.model.prompt.max_pixels
    with pytest.warns(
        UserWarning,
        match=rf"sample big \(big\.jpg\): 1200x900 pixels exceed "
        rf"model\.prompt\.max_pixels={cap}; the LMM sees it downscaled to \d+x\d+",
    ):
        encoded = EncodedDataset([sample], prompt_builder, tiny_config.sam.image_size)[0]
    height, width = encoded.prompt.padded_hw
    assert height * width <= cap and abs(width / height - 4 / 3) < 0.2

    module = build_module(tiny_config).eval()
    batch = GroundingDataModule(prompt_builder, tiny_config.sam.image_size).collate([encoded])
    with torch.no_grad():
        (prediction,) = module(batch)
    assert prediction.fine_logits.shape == (2, 900, 1200)  # masks stay at the image's own size

    sliver = grounding_sample(Image.new("RGB", (6000, 20)), ["a line"], image_id="sliver")
    with pytest.raises(ValueError, match=r"sample sliver \(sliver\.jpg\): absolute aspect ratio"):
        prompt_builder(sliver)
