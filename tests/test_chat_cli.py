"""``python -m flmm_lightning.chat``: one-shot and interactive turns, what each writes and prints, and the
run-folder rules it shares with ``predict``."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from cli_exit import cli_exit
from omegaconf import DictConfig
from PIL import Image
from pycocotools import mask as mask_utils
from rich.console import Console
from samples import make_sample

from flmm_lightning import chat as chat_entry
from flmm_lightning.chat import chat
from flmm_lightning.inference.grounder import Grounder
from flmm_lightning.outputs.overlays import object_color
from flmm_lightning.runs.folders import RunDirectoryInUseError

QUESTION = "What is in the image?"
SHORT = ["generation.max_new_tokens=8", "threshold=0.0", "device=cpu"]


pytestmark = pytest.mark.usefixtures("pinned_threads")


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("photo") / "shapes.png"
    make_sample(90, 130, [], 3).image.save(path)
    return path


def chat_config(
    compose_config, tiny_checkpoint: Path, photo: Path, output_dir: Path, *extra: str
) -> DictConfig:
    overrides = [
        f"ckpt={tiny_checkpoint}",
        f"image={photo}",
        f"paths.output_dir={output_dir}",
        *SHORT,
        *extra,
    ]
    return compose_config(overrides, config_name="chat")


def recording_console() -> Console:
    return Console(record=True, force_terminal=True, color_system="truecolor", width=200)


def test_one_question_writes_overlay_and_json_of_the_grounded_phrases(
    compose_config: Callable[..., DictConfig], tiny_checkpoint: Path, photo: Path, tmp_path: Path
) -> None:
    output_dir = tmp_path / "run"
    console = recording_console()
    (turn,) = chat(
        chat_config(compose_config, tiny_checkpoint, photo, output_dir, f"question='{QUESTION}'"),
        None,
        console,
    )
    record = json.loads((output_dir / "turn_01.json").read_text())
    assert record["question"] == QUESTION and record["answer"] == turn.answer and turn.phrases
    expected = Grounder.from_checkpoint(tiny_checkpoint, device="cpu").chat(
        photo, QUESTION, max_new_tokens=8, threshold=0.0
    )
    assert expected.answer == turn.answer
    for entry, phrase in zip(record["phrases"], expected.phrases, strict=True):
        start, end = entry["char_span"]
        assert record["answer"][start:end] == entry["text"] == phrase.text
        assert entry["score"] == pytest.approx(phrase.score)
        assert entry["mask_score"] == pytest.approx(phrase.mask_score)
        rle = {"size": entry["segmentation"]["size"], "counts": entry["segmentation"]["counts"].encode()}
        assert np.array_equal(mask_utils.decode(rle).astype(bool), phrase.mask.numpy())
        assert entry["bbox_xyxy"] == (list(phrase.box) if phrase.box else None)
    with Image.open(photo) as image, Image.open(output_dir / "turn_01_overlay.png") as overlay:
        assert overlay.size == image.size
    assert (output_dir.parent / "latest").resolve() == output_dir.resolve()
    printed = console.export_text(styles=True)
    red, green, blue = object_color(0)
    assert f"38;2;{red};{green};{blue}" in printed  # the first phrase in its mask's colour


def test_interactive_turns_keep_the_conversation_until_exit(
    compose_config: Callable[..., DictConfig], tiny_checkpoint: Path, photo: Path, tmp_path: Path
) -> None:
    output_dir = tmp_path / "run"
    typed = io.StringIO(f"{QUESTION}\n\n   \nWhere is it?\nexit\nnever asked\n")
    turns = chat(chat_config(compose_config, tiny_checkpoint, photo, output_dir), typed, recording_console())
    assert [turn.question for turn in turns] == [QUESTION, "Where is it?"]
    assert sorted(path.name for path in output_dir.glob("turn_*")) == [
        "turn_01.json",
        "turn_01_overlay.png",
        "turn_02.json",
        "turn_02_overlay.png",
    ]
    grounder = Grounder.from_checkpoint(tiny_checkpoint, device="cpu")
    second = grounder.chat(photo, "Where is it?", history=turns[:1], max_new_tokens=8, threshold=0.0)
    assert second.answer == turns[1].answer


def test_a_bad_turn_is_reported_and_the_chat_goes_on(
    compose_config: Callable[..., DictConfig], tiny_checkpoint: Path, photo: Path, tmp_path: Path
) -> None:
    console = recording_console()
    typed = io.StringIO(f"{QUESTION}\n")
    cfg = chat_config(
        compose_config, tiny_checkpoint, photo, tmp_path / "run", "selector=given", "phrases=[zebra crossing]"
    )
    assert chat(cfg, typed, console) == []
    assert "does not occur in the answer" in console.export_text()


def test_chat_refuses_a_folder_of_another_run(
    compose_config: Callable[..., DictConfig], tiny_checkpoint: Path, photo: Path, tmp_path: Path
) -> None:
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    (output_dir / "metrics.json").write_text("{}")
    cfg = chat_config(compose_config, tiny_checkpoint, photo, output_dir, f"question='{QUESTION}'")
    with pytest.raises(RunDirectoryInUseError):
        chat(cfg)


def test_an_empty_question_ends_the_cli_with_one_line(
    tiny_checkpoint: Path, photo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = [
        "chat",
        f"ckpt={tiny_checkpoint}",
        f"image={photo}",
        "question=' '",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    message = cli_exit(chat_entry.main, argv, monkeypatch)
    assert (
        isinstance(message, str) and "\n" not in message and message.startswith("chat: the question is empty")
    )
