"""Images are measured before they are decoded: a file of a few hundred kilobytes that declares gigabytes of
pixels is refused from its header, with a message naming the file, its size and the limit, in every path
that reads an image (predict, chat, ``Grounder``, datasets)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_exit import cli_exit
from hostile_images import GREY, rgb_bomb, sixteen_bit_bomb, write_zero_png
from PIL import Image

from flmm_lightning.chat import main as chat_main
from flmm_lightning.data.bad_samples import BadSampleError
from flmm_lightning.data.images import (
    ImageLimits,
    ImageTooLargeError,
    load_rgb_image,
    open_image_checked,
    to_rgb,
)
from flmm_lightning.inference.grounder import Grounder

# The bar for predict on the 13000x13000 16-bit PNG (its decode alone would be 338 MB of 16-bit
# pixels and gigabytes of float working arrays).
MAX_PREDICT_RSS_BYTES = int(1.5 * 2**30)


@pytest.fixture(scope="module")
def bombs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bombs")
    return {"grey16": sixteen_bit_bomb(folder), "rgb": rgb_bomb(folder)}


@pytest.mark.parametrize(("name", "size"), [("grey16", "13000x13000"), ("rgb", "9000x9000")])
def test_a_small_file_declaring_too_many_pixels_is_refused_naming_file_size_and_limit(
    bombs: dict[str, Path], name: str, size: str
) -> None:
    path = bombs[name]
    assert path.stat().st_size < 400_000  # small on disk: only the header tells its real size
    limits = ImageLimits()
    with pytest.raises(ImageTooLargeError) as refused:
        open_image_checked(path, limits)
    message = str(refused.value)
    assert str(path) in message and size in message
    assert f"{limits.max_pixels:,}" in message and "image_limits.max_pixels" in message


def test_high_bit_depth_reaches_the_memory_budget_at_fewer_pixels(tmp_path: Path) -> None:
    """2000x2000 16-bit grey makes three float64 working arrays of 32 MB each on its way to 8-bit RGB; the
    same size in 8-bit grey needs a few bytes a pixel. A 64 MB budget takes the second, refuses the first."""
    limits = ImageLimits(max_pixels=10**9, max_memory_mb=64)
    deep = write_zero_png(tmp_path / "deep.png", 2000, 2000, bit_depth=16, colour_type=GREY)
    flat = write_zero_png(tmp_path / "flat.png", 2000, 2000, bit_depth=8, colour_type=GREY)
    with pytest.raises(ImageTooLargeError, match=r"deep\.png is 2000x2000.*budget of 64 MB.*max_memory_mb"):
        open_image_checked(deep, limits)
    image = open_image_checked(flat, limits)
    assert image.size == (2000, 2000) and not np.asarray(to_rgb(image)).any()


def test_images_within_the_limits_decode_as_before(fixtures_dir: Path) -> None:
    path = fixtures_dir / "coco_sample/images/000000142238.jpg"
    with Image.open(path) as reference:
        expected = np.asarray(reference.convert("RGB"))
    assert np.array_equal(np.asarray(open_image_checked(path).convert("RGB")), expected)


# Runs a command as its only child and reports that child's peak RSS (kilobytes on Linux) on its last stdout
# line: this test process's own RUSAGE_CHILDREN also counts every earlier child of the test session.
PEAK_RSS_OF_CHILD = """
import resource, subprocess, sys
finished = subprocess.run(sys.argv[1:], capture_output=True, text=True)
sys.stderr.write(finished.stderr)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(finished.returncode)
"""


@pytest.mark.slow
def test_predict_refuses_the_sixteen_bit_bomb_in_little_memory(
    bombs: dict[str, Path], tmp_path: Path
) -> None:
    """The CLI as a person runs it, in a child process whose peak RSS is read back from the kernel."""
    command = [
        sys.executable,
        "-m",
        "flmm_lightning.predict",
        f"ckpt={tmp_path / 'never_read.ckpt'}",  # refused before the checkpoint is opened
        f"image={bombs['grey16']}",
        "phrases=a man",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    finished = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_OF_CHILD, *command], capture_output=True, text=True, timeout=300
    )
    peak_bytes = int(finished.stdout.split()[-1]) * 1024
    assert finished.returncode != 0
    assert f"predict: image too large: {bombs['grey16']} is 13000x13000" in finished.stderr
    print(f"predict on the 13000x13000 16-bit PNG: peak RSS {peak_bytes / 2**30:.2f} GiB")
    assert peak_bytes < MAX_PREDICT_RSS_BYTES


def test_chat_refuses_the_bomb_with_one_line(
    bombs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["chat", "ckpt=never_read.ckpt", f"image={bombs['rgb']}", f"hydra.run.dir={tmp_path / 'run'}"]
    message = cli_exit(chat_main, argv, monkeypatch)
    assert isinstance(message, str) and "\n" not in message
    assert message.startswith(f"chat: image too large: {bombs['rgb']} is 9000x9000")


def test_chat_limits_are_settings(bombs: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    argv = [
        "chat",
        "ckpt=never_read.ckpt",
        f"image={bombs['rgb']}",
        "image_limits.max_pixels=1000",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit, match="above the limit of 1,000 pixels"):
        chat_main()


def test_a_dataset_image_over_the_limits_is_a_bad_sample_naming_the_file(bombs: dict[str, Path]) -> None:
    with pytest.raises(BadSampleError) as refused:
        load_rgb_image(bombs["rgb"], dataset="refcoco", sample_id="42", expected_wh=(9000, 9000))
    error = refused.value
    assert (error.dataset, error.sample_id, error.path) == ("refcoco", "42", str(bombs["rgb"]))
    assert "9000x9000" in str(error) and "max_pixels" in str(error)


def test_grounder_measures_images_before_reading_them(
    tiny_checkpoint: Path, bombs: dict[str, Path], tmp_path: Path
) -> None:
    grounder = Grounder.from_checkpoint(tiny_checkpoint, device="cpu")
    with Image.open(bombs["rgb"]) as lazy, pytest.raises(ImageTooLargeError, match="9000x9000"):
        grounder.ground(lazy, "a man")
    small = write_zero_png(tmp_path / "small.png", 20, 10)
    grounder.image_limits = ImageLimits(max_pixels=100)
    with pytest.raises(ImageTooLargeError, match=r"small\.png is 20x10 .* limit of 100 pixels"):
        grounder.chat(small, "What is it?")
