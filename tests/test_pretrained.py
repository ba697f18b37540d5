"""``Grounder.save_pretrained`` / ``from_pretrained``: a directory of safetensors, JSON and a model card that
grounds like the ``.ckpt`` it came from and that every entry point takes as ``ckpt=``; ``push_to_hub``
uploads that directory (the hub client replaced by a recorder, or refused offline)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import huggingface_hub
import pytest
import torch
from huggingface_hub.errors import OfflineModeIsEnabled
from safetensors.torch import load_file

from flmm_lightning.inference.grounder import Grounder
from flmm_lightning.runs.checkpoints import module_from_checkpoint
from flmm_lightning.runs.pretrained import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, load_pretrained

pytestmark = pytest.mark.usefixtures("pinned_threads")

PHOTO = "coco_sample/images/000000439180.jpg"
METRICS = {"synthetic_refcoco_val": {"cIoU": 0.4321, "mIoU": 0.5}}


@pytest.fixture(scope="module")
def from_ckpt(tiny_checkpoint: Path) -> Grounder:
    return Grounder.from_checkpoint(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def pretrained_dir(from_ckpt: Grounder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return from_ckpt.save_pretrained(tmp_path_factory.mktemp("pretrained") / "heads", metrics=METRICS)


def test_directory_holds_safetensors_json_and_a_card_and_no_pickle(
    pretrained_dir: Path, tiny_checkpoint: Path
) -> None:
    assert sorted(p.name for p in pretrained_dir.iterdir()) == sorted([WEIGHTS_NAME, CONFIG_NAME, CARD_NAME])
    # safetensors: an 8-byte little-endian header length, then a JSON header (a pickle starts with 0x80 0x0N)
    raw = (pretrained_dir / WEIGHTS_NAME).read_bytes()
    header_length = int.from_bytes(raw[:8], "little")
    assert json.loads(raw[8 : 8 + header_length])["__metadata__"] == {"format": "pt"}
    stored = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    weights = load_file(pretrained_dir / WEIGHTS_NAME)
    expected = {key.removeprefix("model."): value for key, value in stored["state_dict"].items()}
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[key], expected[key]) for key in expected)
    assert json.loads((pretrained_dir / CONFIG_NAME).read_text()) == stored["flmm_config"]

    card = (pretrained_dir / CARD_NAME).read_text()
    assert stored["flmm_config"]["model"]["name"] in card and "library_name: flmm-lightning" in card
    assert "| synthetic_refcoco_val | 0.4321 | 0.5000 |" in card


def test_from_pretrained_grounds_like_the_checkpoint(
    pretrained_dir: Path, from_ckpt: Grounder, fixtures_dir: Path
) -> None:
    phrases = ["a red square", "the background"]
    expected = from_ckpt.ground(fixtures_dir / PHOTO, phrases)
    loaded = Grounder.from_pretrained(pretrained_dir, device="cpu").ground(fixtures_dir / PHOTO, phrases)
    assert torch.equal(loaded.masks, expected.masks)
    assert torch.equal(loaded.attention_maps, expected.attention_maps)
    assert torch.equal(loaded.scores, expected.scores)  # from the fine logits: the SAM heads' weights


def test_entry_points_read_the_directory_as_a_checkpoint(pretrained_dir: Path, tiny_checkpoint: Path) -> None:
    from_dir = module_from_checkpoint(pretrained_dir).module
    from_file = module_from_checkpoint(tiny_checkpoint).module
    a, b = from_dir.model.trainable_state_dict(), from_file.model.trainable_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_broken_directory_is_refused_naming_the_file(pretrained_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        load_pretrained(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / WEIGHTS_NAME).write_bytes(b"\x80\x04not safetensors")
    (broken / CONFIG_NAME).write_text((pretrained_dir / CONFIG_NAME).read_text())
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME} as safetensors"):
        load_pretrained(broken)


def test_train_exports_its_heads_as_a_pretrained_directory(compose_config, tmp_path: Path) -> None:
    from conftest import tiny_overrides

    from flmm_lightning.train import train

    overrides = [
        *tiny_overrides(tmp_path / "data", tmp_path / "run"),
        "trainer.max_steps=2",
        "trainer.limit_val_batches=0",
        "test_after_fit=false",
        "export_pretrained=true",
        "logger=none",
        "callbacks=none",
        "whole_image_baseline_split=null",
        "every_word_baseline_split=null",
        "ground_what_you_say_split=null",
        "chat_after_fit.split=null",
        "reasonseg_after_fit.data=null",
        f"paths.output_dir={tmp_path / 'run'}",
    ]
    cfg = compose_config(overrides)
    train(cfg)
    exported = load_pretrained(tmp_path / "run" / "pretrained")
    assert exported["flmm_config"]["model"]["name"] == cfg.model.name
    rebuilt = module_from_checkpoint(tmp_path / "run" / "pretrained").module
    weights = rebuilt.model.trainable_state_dict()
    assert weights.keys() == exported["state_dict"].keys()
    assert all(torch.equal(weights[key], exported["state_dict"][key]) for key in weights)


class RecordingHfApi:
    """Stands in for ``huggingface_hub.HfApi``: records what would be sent, with the uploaded files' bytes
    (their folder is gone once ``push_to_hub`` returns)."""

    calls: list[tuple[str, dict[str, Any]]] = []

    def __init__(self, token: str | None = None) -> None:
        self.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id: str, *, exist_ok: bool, private: bool) -> SimpleNamespace:
        self.calls.append(("create_repo", {"repo_id": repo_id, "exist_ok": exist_ok, "private": private}))
        return SimpleNamespace(repo_id=f"user/{repo_id}")  # the hub adds the namespace a bare name lacks

    def upload_folder(self, *, repo_id: str, folder_path: Path, commit_message: str) -> SimpleNamespace:
        files = {path.name: path.read_bytes() for path in Path(folder_path).iterdir()}
        self.calls.append(("upload_folder", {"repo_id": repo_id, "files": files, "message": commit_message}))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/abc123")


@pytest.fixture
def staging_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The temporary-file folder ``tempfile`` hands out during the test, to see what is left in it."""
    staging = tmp_path / "tmp"
    staging.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging))
    return staging


def test_push_to_hub_uploads_exactly_the_save_pretrained_folder(
    from_ckpt: Grounder, pretrained_dir: Path, staging_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    monkeypatch.setattr(RecordingHfApi, "calls", [])
    url = from_ckpt.push_to_hub("flmm-heads", metrics=METRICS, private=True, token="hf_test")

    (_, init), (_, create), (_, upload) = RecordingHfApi.calls
    assert init == {"token": "hf_test"}
    assert create == {"repo_id": "flmm-heads", "exist_ok": True, "private": True}
    assert upload["repo_id"] == "user/flmm-heads" and upload["message"]
    expected = {path.name: path.read_bytes() for path in pretrained_dir.iterdir()}
    assert sorted(upload["files"]) == sorted([WEIGHTS_NAME, CONFIG_NAME, CARD_NAME])
    assert upload["files"] == expected
    assert url == "https://huggingface.co/user/flmm-heads/commit/abc123"
    assert list(staging_dir.iterdir()) == []


def test_push_to_hub_offline_fails_with_the_hub_error_and_leaves_no_folder(
    from_ckpt: Grounder, staging_dir: Path
) -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # set by conftest for the whole suite
    with pytest.raises(OfflineModeIsEnabled):
        from_ckpt.push_to_hub("user/flmm-heads", token="hf_test")
    assert list(staging_dir.iterdir()) == []
