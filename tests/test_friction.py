"""Small things a user trips over: Ctrl-C during a chat answer, the one name of the generation length, a
folder given as the image, metric tables written to a file."""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_exit import cli_exit
from omegaconf import DictConfig
from rich.console import Console
from samples import make_sample
from transformers.generation.stopping_criteria import MaxLengthCriteria

from flmm_lightning import eval as eval_entry
from flmm_lightning import predict as predict_entry
from flmm_lightning.chat import chat
from flmm_lightning.data.images import UnreadableImageError
from flmm_lightning.outputs.reporting import print_metrics
from flmm_lightning.predict import predict

pytestmark = pytest.mark.usefixtures("pinned_threads")


class TypedLines(io.StringIO):
    """Typed questions; reading ``interrupt_at`` arms ``armed``, so that the answer to it is interrupted."""

    def __init__(self, text: str, interrupt_at: str) -> None:
        super().__init__(text)
        self.interrupt_at = interrupt_at
        self.armed = False

    def readline(self, *args) -> str:
        line = super().readline(*args)
        self.armed = line.strip() == self.interrupt_at
        return line


def test_ctrl_c_during_an_answer_cancels_it_and_keeps_the_conversation(
    compose_config: Callable[..., DictConfig],
    tiny_checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    photo = tmp_path / "shapes.png"
    make_sample(90, 130, [], 3).image.save(photo)
    typed = TypedLines("What is in the image?\nAnd on the left?\nWhere is it?\nexit\n", "And on the left?")
    check_length = MaxLengthCriteria.__call__

    def ctrl_c_while_armed(self, input_ids, scores, **kwargs):
        # The stopping criterion runs after every generated token: Ctrl-C lands in the middle of the answer.
        if typed.armed and input_ids.shape[1] > 0:
            typed.armed = False
            raise KeyboardInterrupt
        return check_length(self, input_ids, scores, **kwargs)

    monkeypatch.setattr(MaxLengthCriteria, "__call__", ctrl_c_while_armed)
    cfg = compose_config(
        [
            f"ckpt={tiny_checkpoint}",
            f"image={photo}",
            f"paths.output_dir={tmp_path / 'run'}",
            "generation.max_new_tokens=8",
            "threshold=0.0",
            "device=cpu",
        ],
        config_name="chat",
    )
    console = Console(record=True, width=200)
    turns = chat(cfg, typed, console)

    assert [turn.question for turn in turns] == ["What is in the image?", "Where is it?"]
    assert "answer cancelled; the conversation keeps its 1 turns" in console.export_text()
    assert sorted(path.name for path in (tmp_path / "run").glob("turn_*.json")) == [
        "turn_01.json",
        "turn_02.json",
    ]


def test_ctrl_c_at_the_prompt_ends_the_chat(
    compose_config: Callable[..., DictConfig], tiny_checkpoint: Path, tmp_path: Path
) -> None:
    class CtrlC(io.StringIO):
        def readline(self, *args) -> str:
            raise KeyboardInterrupt

    photo = tmp_path / "shapes.png"
    make_sample(90, 130, [], 3).image.save(photo)
    cfg = compose_config(
        [f"ckpt={tiny_checkpoint}", f"image={photo}", f"paths.output_dir={tmp_path / 'run'}", "device=cpu"],
        config_name="chat",
    )
    assert chat(cfg, CtrlC(), Console(file=io.StringIO())) == []


@pytest.mark.parametrize(
    ("entry", "old"),
    [
        (predict_entry, "max_new_tokens=16"),
        (eval_entry, "reasonseg.max_new_tokens=16"),
        (predict_entry, "+max_new_tokens=16"),
    ],
)
def test_earlier_spellings_of_the_generation_length_name_the_new_key(
    entry, old: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = str(cli_exit(entry.main, [entry.__name__, "ckpt=model.ckpt", old], monkeypatch))
    assert "is now generation.max_new_tokens; write generation.max_new_tokens=16" in message


def test_generation_length_has_one_key_in_every_entry_point(
    compose_config: Callable[..., DictConfig],
) -> None:
    checkpoint = ["ckpt=model.ckpt"]
    required = {
        "chat": [*checkpoint, "image=photo.png"],
        "predict": [*checkpoint, "image=photo.png"],
        "eval": checkpoint,
        "app": checkpoint,
        "train": [],
    }
    for name, overrides in required.items():
        cfg = compose_config(overrides, config_name=name)
        assert cfg.generation.max_new_tokens > 0, name
        assert "max_new_tokens" not in cfg, name
        for section in ("reasonseg", "chat_after_fit", "reasonseg_after_fit"):
            assert "max_new_tokens" not in (cfg.get(section) or {}), (name, section)


def test_a_folder_given_as_the_image_says_it_is_a_folder(
    compose_config: Callable[..., DictConfig], tmp_path: Path
) -> None:
    cfg = compose_config(
        ["ckpt=model.ckpt", f"image={tmp_path}", "phrases=[a ball]", f"paths.output_dir={tmp_path / 'run'}"],
        config_name="predict",
    )
    with pytest.raises(
        UnreadableImageError, match=re.escape(f"{tmp_path} is a folder: give one image file in it")
    ):
        predict(cfg)


def test_wide_metric_tables_written_to_a_file_keep_every_column(capsys: pytest.CaptureFixture[str]) -> None:
    columns = [
        *("cIoU", "mIoU", "Pr@0.5", "Pr@0.6", "Pr@0.7", "Pr@0.8", "Pr@0.9"),
        *("AR", "AR_things", "AR_stuff", "AR_singulars", "AR_plurals", "Acc@0.5", "pixel_acc"),
    ]
    values = {column: (index + 1) / 31 for index, column in enumerate(columns)}
    print_metrics({"refcoco+_testA_with_a_long_name": values, "png_val": values})
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if "cIoU" in line)
    assert [cell.strip() for cell in header.strip("┃").split("┃")] == ["split", *columns]
    row = next(line for line in lines if "refcoco+_testA_with_a_long_name" in line)
    cells = [cell.strip() for cell in row.strip("│").split("│")]
    assert cells == ["refcoco+_testA_with_a_long_name", *(f"{100 * values[c]:.2f}" for c in columns)]
    assert len(header) > 160  # wider than the console width a file used to get
