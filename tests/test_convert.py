"""Converting a released F-LMM checkpoint (wusize/F-LMM ``.pth``): an official-format state dict of the tiny
LLaVA converts, evaluates and predicts like the model it came from; anything else is refused by name."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, open_dict

from flmm_lightning.convert import OfficialCheckpointError, compose_model_config, convert, main
from flmm_lightning.core import CheckpointMismatchError
from flmm_lightning.eval import evaluate
from flmm_lightning.inference.grounder import Grounder
from flmm_lightning.runs.build import build_module, build_prompt_builder, run_config

pytestmark = pytest.mark.usefixtures("pinned_threads")

# The attribute names of the official FrozenLlavaSAM (flmm/models/frozen_llava.py, mask_refiner.py): its
# trainable parts, each under the name our core gives it.
OFFICIAL_NAME_OF = (
    ("lmm.text_layer_weights", "text_layer_weights"),
    ("lmm.text_proj.", "text_proj."),
    ("mask_head.", "mask_head."),
    ("sam.sam.prompt_encoder.", "sam.model.prompt_encoder."),
    ("sam.sam.mask_decoder.", "sam.model.mask_decoder."),
)
PHOTO = "coco_sample/images/000000142238.jpg"


def official_name(key: str) -> str:
    for ours, theirs in OFFICIAL_NAME_OF:
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    raise AssertionError(f"{key} is not a trainable part of the official model")


@pytest.fixture(scope="module")
def tiny_llava_config() -> DictConfig:
    return compose_model_config("tiny_llava", "tiny", None, [])


@pytest.fixture(scope="module")
def source_module(tiny_llava_config: DictConfig):
    torch.manual_seed(0)
    module = build_module(tiny_llava_config)
    with torch.no_grad():
        module.model.lmm.text_layer_weights.normal_()  # initialised to ones: make the layer weighting matter
    return module


@pytest.fixture(scope="module")
def official_pth(source_module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's trainable weights under the official names, beside frozen entries a full official
    state dict also holds (the LMM's, SAM's image encoder's), in an mmengine-style ``{"state_dict": ...}``."""
    state = {official_name(k): v.clone() for k, v in source_module.model.trainable_state_dict().items()}
    state["llava.language_model.model.embed_tokens.weight"] = torch.randn(8, 4)
    state["sam.model.image_encoder.patch_embed.proj.weight"] = torch.randn(4, 3, 2, 2)
    path = tmp_path_factory.mktemp("official") / "frozen_llava_tiny.pth"
    torch.save({"state_dict": state}, path)
    return path


@pytest.fixture(scope="module")
def converted(official_pth: Path, tiny_llava_config: DictConfig, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("converted") / "tiny_llava.ckpt"
    counts = convert(official_pth, path, tiny_llava_config)
    assert counts["dropped"] == 2
    return path


def test_converted_checkpoint_holds_the_official_weights(converted: Path, source_module) -> None:
    stored = torch.load(converted, map_location="cpu", weights_only=True)
    expected = source_module.state_dict()
    assert stored["state_dict"].keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(stored["state_dict"][key], value), key
    assert stored["flmm_config"]["model"]["name"] == "tiny_llava"


def test_converted_checkpoint_predicts_the_source_models_masks(
    converted: Path, source_module, tiny_llava_config: DictConfig, fixtures_dir: Path
) -> None:
    phrases = ["a person", "the table"]
    loaded = Grounder.from_checkpoint(converted, device="cpu").ground(fixtures_dir / PHOTO, phrases)
    config = tiny_llava_config
    source = Grounder(source_module.model, build_prompt_builder(config), config.sam.image_size, device="cpu")
    source_grounding = source.ground(fixtures_dir / PHOTO, phrases)
    assert torch.equal(loaded.masks, source_grounding.masks)
    assert torch.equal(loaded.attention_maps, source_grounding.attention_maps)


def refcoco_eval_config(compose_config: Callable[..., DictConfig], ckpt: Path, out: Path, data_root: Path):
    """``eval ckpt=... data=refcoco`` on the RefCOCO fixture's val split."""
    cfg = compose_config(
        [
            f"ckpt={ckpt}",
            "data=refcoco",
            "data.num_workers=0",
            f"paths.output_dir={out}",
            f"hydra.run.dir={out}",
        ],
        config_name="eval",
    )
    with open_dict(cfg):
        split = cfg.data.test_sets.refcoco_val
        split.data_root = str(data_root)
        split.image_dir = "images"
        cfg.data.test_sets = {"refcoco_val": split}
        cfg.data.train_sets = {}
        cfg.data.val_sets = {}
    return cfg


def test_converted_checkpoint_evaluates_like_the_source_model(
    converted: Path,
    source_module,
    tiny_llava_config: DictConfig,
    compose_config: Callable[..., DictConfig],
    fixtures_dir: Path,
    tmp_path: Path,
) -> None:
    source_ckpt = tmp_path / "source.ckpt"
    torch.save(
        {"state_dict": source_module.state_dict(), "flmm_config": run_config(tiny_llava_config)}, source_ckpt
    )
    data_root = fixtures_dir / "coco_sample"
    from_official = evaluate(refcoco_eval_config(compose_config, converted, tmp_path / "a", data_root))
    from_source = evaluate(refcoco_eval_config(compose_config, source_ckpt, tmp_path / "b", data_root))
    assert from_official.keys() == from_source.keys() == {"refcoco_val"}
    # the same weights, inputs and code: the same figures (an empty subset is NaN on both sides)
    official, source = from_official["refcoco_val"], from_source["refcoco_val"]
    assert "cIoU" in official and official == pytest.approx(source, rel=0, abs=0, nan_ok=True)


def write_official(tmp_path: Path, state: dict) -> Path:
    path = tmp_path / "official.pth"
    torch.save(state, path)
    return path


def test_unmapped_key_is_refused_by_name(official_pth, tiny_llava_config, tmp_path: Path) -> None:
    state = torch.load(official_pth, weights_only=True)["state_dict"]
    state["sam.model.extra_head.weight"] = torch.zeros(1)
    with pytest.raises(OfficialCheckpointError, match=r"sam\.model\.extra_head\.weight"):
        convert(write_official(tmp_path, state), tmp_path / "out.ckpt", tiny_llava_config)
    assert not (tmp_path / "out.ckpt").exists()


def test_missing_and_misshapen_keys_are_refused_by_name(
    official_pth, tiny_llava_config, tmp_path: Path
) -> None:
    state = torch.load(official_pth, weights_only=True)["state_dict"]
    del state["text_layer_weights"]
    with pytest.raises(CheckpointMismatchError, match=r"lmm\.text_layer_weights"):
        convert(write_official(tmp_path, state), tmp_path / "out.ckpt", tiny_llava_config)

    state = torch.load(official_pth, weights_only=True)["state_dict"]
    first_conv = "mask_head.encoder.0.0.convs.0.conv.weight"
    state[first_conv] = torch.zeros(64, 1024, 3, 3)  # LLaVA-1.5-7B's U-Net: 32 layers x 32 heads in
    with pytest.raises(CheckpointMismatchError, match=r"mask_head\.encoder\.0\.0\.convs\.0\.conv\.weight"):
        convert(write_official(tmp_path, state), tmp_path / "out.ckpt", tiny_llava_config)
    assert not (tmp_path / "out.ckpt").exists()


class _CreatesFile:
    """Unpickling this calls ``open(path, "w")``: code a checkpoint must never get to run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_pickle_that_runs_code_is_refused_and_nothing_is_created(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    official = write_official(tmp_path, {"state_dict": {"text_layer_weights": _CreatesFile(marker)}})
    output = tmp_path / "out.ckpt"
    with pytest.raises(SystemExit, match="refusing .*official.pth"):
        main([str(official), str(output), "--model", "tiny_llava", "--sam", "tiny"])
    assert not marker.exists()
    assert not output.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["official.pth"]
