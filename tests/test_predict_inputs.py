"""What a person hands to predict / ``Grounder``: phone photos with an EXIF orientation, 16-bit and other
PIL modes, a single phrase as a plain string, broken files, phrases in any script in the overlay legend."""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_exit import cli_exit
from fontTools.ttLib import TTFont
from omegaconf import DictConfig
from PIL import Image
from pycocotools import mask as mask_utils

from flmm_lightning.common.masks import mask_scores
from flmm_lightning.data import RefCocoDataset
from flmm_lightning.data.images import UnreadableImageError, as_displayed, load_photo, to_rgb
from flmm_lightning.inference.grounder import Grounder, PhraseError, phrase_list
from flmm_lightning.outputs.overlays import legend_entry, overlay_masks
from flmm_lightning.predict import main, predict

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PHOTO = "coco_sample/images/000000142238.jpg"
EXIF_ORIENTATION = 0x0112
# Orientation 6: the stored pixels must be turned 90 degrees clockwise to be shown upright.
ROTATE_CLOCKWISE = 6


pytestmark = pytest.mark.usefixtures("pinned_threads")


@pytest.fixture(scope="module")
def grounder(tiny_checkpoint: Path) -> Grounder:
    return Grounder.from_checkpoint(tiny_checkpoint, device="cpu")


@pytest.fixture
def sideways_photo(fixtures_dir: Path, tmp_path: Path) -> tuple[Path, np.ndarray]:
    """The fixture photo stored turned 90 degrees anticlockwise with EXIF orientation 6, as a phone held
    upright writes it; returns the file and its stored (decoded) pixels."""
    with Image.open(fixtures_dir / PHOTO) as photo:
        stored = photo.convert("RGB").transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATE_CLOCKWISE
    path = tmp_path / "sideways.jpg"
    stored.save(path, exif=exif, quality=95)
    with Image.open(path) as written:
        assert written.getexif()[EXIF_ORIENTATION] == ROTATE_CLOCKWISE
        return path, np.asarray(written.convert("RGB"))


def predict_config(
    compose_config: Callable[..., DictConfig], checkpoint: Path, image: Path, out: Path, phrases: str
):
    overrides = [
        f"ckpt={checkpoint}",
        f"image={image}",
        f"phrases={phrases}",
        "device=cpu",
        f"paths.output_dir={out}",
    ]
    return compose_config(overrides, config_name="predict")


# ---- EXIF orientation --------------------------------------------------------------------------------------
def test_sideways_phone_photo_is_grounded_as_displayed(
    grounder: Grounder,
    sideways_photo: tuple[Path, np.ndarray],
    compose_config,
    tiny_checkpoint: Path,
    tmp_path: Path,
) -> None:
    path, stored = sideways_photo
    displayed = np.rot90(stored, k=-1)  # turned clockwise
    height, width = displayed.shape[:2]
    assert (height, width) == stored.shape[1::-1]

    from_path = grounder.ground(path, ["the man"])
    with Image.open(path) as opened:
        from_pil = grounder.ground(opened, ["the man"])
    for grounding in (from_path, from_pil):
        assert grounding.masks.shape == (1, height, width)
        assert np.array_equal(np.asarray(grounding.image), displayed)
    assert torch.equal(from_path.masks, from_pil.masks)

    overlay_path, json_path = predict(
        predict_config(compose_config, tiny_checkpoint, path, tmp_path / "run", "[the man]")
    )
    with Image.open(overlay_path) as overlay:
        assert overlay.size == (width, height)
    (record,) = json.loads(json_path.read_text())["objects"]
    assert record["segmentation"]["size"] == [height, width]
    rle = {"size": record["segmentation"]["size"], "counts": record["segmentation"]["counts"].encode()}
    assert np.array_equal(mask_utils.decode(rle).astype(bool), from_path.masks[0].numpy())


def test_coco_datasets_keep_the_stored_pixel_grid(coco_sample: Path) -> None:
    """COCO annotations are drawn on the stored pixels: an orientation tag must not turn a dataset image."""
    stored_sizes = {}
    for path in (coco_sample / "images").glob("*.jpg"):
        with Image.open(path) as image:
            pixels = image.convert("RGB")
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = ROTATE_CLOCKWISE
        pixels.save(path, exif=exif, quality=95)
        stored_sizes[int(path.stem)] = pixels.size
    samples = list(RefCocoDataset(coco_sample, "refcoco", "unc", "val", "images"))
    assert samples
    for sample in samples:
        assert sample.image.size == stored_sizes[sample.image_id]
        assert sample.masks.shape[1:] == (sample.image.height, sample.image.width)


# ---- bit depths and modes ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("mode", "byte_order"), [("I;16", "<u2"), ("I;16B", ">u2")])
def test_sixteen_bit_grey_spans_the_eight_bit_range(mode: str, byte_order: str) -> None:
    ramp = np.linspace(0, 65535, 256 * 3).round().astype(np.uint16).reshape(3, 256)
    image = Image.frombytes(mode, (256, 3), ramp.astype(byte_order).tobytes())

    rgb = np.asarray(to_rgb(image))
    assert rgb.dtype == np.uint8 and rgb.shape == (*ramp.shape, 3)
    assert (rgb == rgb[..., :1]).all()  # grey
    grey = rgb[..., 0].ravel().astype(int)
    assert grey.min() == 0 and grey.max() == 255 and (np.diff(grey) >= 0).all()
    # 65535 / 255 = 257 sixteen-bit levels per eight-bit level
    assert np.abs(grey - ramp.ravel() / 257).max() <= 0.5


@pytest.mark.parametrize(
    ("dtype", "low", "high"), [(np.int32, -70000, 900000), (np.float32, 0.0, 1.0), (np.float32, -3.5, 12.0)]
)
def test_integer_and_float_grey_use_their_own_value_range(dtype: type, low: float, high: float) -> None:
    ramp = np.linspace(low, high, 512).astype(dtype).reshape(2, 256)
    image = Image.fromarray(ramp)
    assert image.mode == ("I" if dtype == np.int32 else "F")

    grey = np.asarray(to_rgb(image))[..., 0].ravel().astype(int)
    assert grey.min() == 0 and grey.max() == 255 and (np.diff(grey) >= 0).all()
    expected = (ramp.ravel().astype(np.float64) - low) / (high - low) * 255
    assert np.abs(grey - expected).max() <= 0.5 + 1e-6 * 255


def test_palette_cmyk_alpha_and_bilevel_modes_convert_to_their_colours() -> None:
    colours = [(200, 10, 10), (10, 200, 10), (10, 10, 200)]
    palette = Image.new("P", (3, 1))
    palette.putpalette([value for colour in colours for value in colour])
    palette.putdata([0, 1, 2])
    palette.info["transparency"] = 1
    assert np.asarray(to_rgb(palette)).reshape(3, 3).tolist() == [list(c) for c in colours]

    # CMYK: full cyan is red-less, full black is black, no ink is white
    cmyk = Image.new("CMYK", (3, 1))
    cmyk.putdata([(255, 0, 0, 0), (0, 0, 0, 255), (0, 0, 0, 0)])
    assert np.asarray(to_rgb(cmyk)).reshape(3, 3).tolist() == [[0, 255, 255], [0, 0, 0], [255, 255, 255]]

    # alpha is dropped, the colour under it kept
    rgba = Image.new("RGBA", (1, 1), (30, 60, 90, 0))
    assert np.asarray(to_rgb(rgba)).reshape(3).tolist() == [30, 60, 90]
    for mode in ("LA", "La"):
        grey_alpha = Image.new(mode, (1, 1), (77, 255))
        assert np.asarray(to_rgb(grey_alpha)).reshape(3).tolist() == [77, 77, 77], mode

    bilevel = Image.new("1", (2, 1))
    bilevel.putdata([0, 1])
    assert np.asarray(to_rgb(bilevel)).reshape(2, 3).tolist() == [[0, 0, 0], [255, 255, 255]]


def test_sixteen_bit_photo_is_grounded_in_its_range(grounder: Grounder, tmp_path: Path) -> None:
    ramp = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (48, 1))
    path = tmp_path / "sixteen_bit.png"
    Image.fromarray(ramp).save(path)
    grounding = grounder.ground(path, "the bright side")
    grey = np.asarray(grounding.image)[0, :, 0]
    assert grey[0] == 0 and grey[-1] == 255 and (np.diff(grey.astype(int)) > 0).all()


# ---- phrases -----------------------------------------------------------------------------------------------
def test_a_plain_string_is_one_phrase(
    grounder: Grounder, compose_config, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    image = Image.new("RGB", (64, 48), (120, 90, 60))
    grounding = grounder.ground(image, "a person")
    assert grounding.phrases == ["a person"] and grounding.masks.shape == (1, 48, 64)

    image_path = tmp_path / "plain.png"
    image.save(image_path)
    # what the shell passes for phrases='a person'
    _, json_path = predict(
        predict_config(compose_config, tiny_checkpoint, image_path, tmp_path / "run", "a person")
    )
    assert [record["phrase"] for record in json.loads(json_path.read_text())["objects"]] == ["a person"]


@pytest.mark.parametrize(
    ("phrases", "expected"),
    [(["a", "b c"], ["a", "b c"]), (("x",), ["x"]), ([1984, "the road"], ["1984", "the road"])],
)
def test_phrase_lists_keep_their_phrases(phrases, expected: list[str]) -> None:
    assert phrase_list(phrases) == expected


@pytest.mark.parametrize("phrases", [[], "", "  ", ["a man", ""], [["nested"]], None])
def test_no_phrase_or_a_blank_one_is_refused(phrases) -> None:
    with pytest.raises(PhraseError):
        phrase_list(phrases)


# ---- unreadable files --------------------------------------------------------------------------------------
@pytest.fixture(params=["truncated", "not_an_image", "missing"])
def broken_image(request: pytest.FixtureRequest, fixtures_dir: Path, tmp_path: Path) -> Path:
    path = tmp_path / f"{request.param}.jpg"
    if request.param == "truncated":
        data = (fixtures_dir / PHOTO).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif request.param == "not_an_image":
        path.write_text("name,phrase\n1,a man\n")
    return path


def test_unreadable_image_is_named_by_grounder(grounder: Grounder, broken_image: Path) -> None:
    with pytest.raises(UnreadableImageError, match=str(broken_image)):
        grounder.ground(broken_image, "a man")
    with pytest.raises(UnreadableImageError, match=str(broken_image)):
        load_photo(broken_image)


def test_unreadable_image_ends_predict_with_one_line(
    broken_image: Path, tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI (Hydra's main) exits with one line naming the file, before the model is loaded."""
    argv = [
        "predict",
        f"ckpt={tiny_checkpoint}",
        f"image={broken_image}",
        "phrases=a man",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    message = cli_exit(main, argv, monkeypatch)
    assert isinstance(message, str) and "\n" not in message
    assert message.startswith("predict: ") and str(broken_image) in message


def test_lazily_opened_truncated_image_is_named(
    grounder: Grounder, fixtures_dir: Path, tmp_path: Path
) -> None:
    data = (fixtures_dir / PHOTO).read_bytes()
    path = tmp_path / "half.jpg"
    path.write_bytes(data[: len(data) // 2])
    with Image.open(path) as lazy, pytest.raises(UnreadableImageError, match=str(path)):
        grounder.ground(lazy, "a man")


# ---- legend ------------------------------------------------------------------------------------------------
def font_characters(font) -> set[str]:
    """Characters the font file maps to a glyph, read with fontTools (independently of PIL's rendering)."""
    source = font.path
    if isinstance(source, io.BytesIO):
        source = io.BytesIO(source.getvalue())
    with TTFont(source, fontNumber=0) as parsed:
        return {chr(code) for code in parsed.getBestCmap()}


@pytest.mark.parametrize(
    "phrase",
    ["the man in the white shirt", "café crème", "Жёлтый автобус", "红色的汽车", "the dog 🐶", "犬 🐶"],
)
def test_legend_draws_only_characters_its_font_has(phrase: str) -> None:
    text, font = legend_entry(2, phrase)
    covered = font_characters(font)
    assert all(character in covered or character.isspace() for character in text), (text, font.getname())
    assert text in (f"3 {phrase}", "3")
    if phrase.isascii():
        assert text == f"3 {phrase}"
    if "🐶" in phrase:  # no candidate font has colour emoji: the number stands for it
        assert text == "3"


def test_overlay_with_non_latin_phrases_keeps_the_image_size(fixtures_dir: Path) -> None:
    with Image.open(fixtures_dir / PHOTO) as photo:
        image = photo.convert("RGB")
    masks = torch.zeros(3, image.height, image.width, dtype=torch.bool)
    masks[0, :10, :10] = True
    overlay = overlay_masks(as_displayed(image), masks, ["红色的汽车", "the dog 🐶", "Жёлтый автобус"])
    assert overlay.size == image.size and overlay.mode == "RGB"


def test_a_mask_score_is_the_mean_probability_over_its_pixels() -> None:
    logits = torch.tensor([[[0.0, 2.0], [-1.0, 4.0]], [[-3.0, -3.0], [-3.0, -3.0]]])  # [2, 2, 2]
    masks = logits > 0
    probability = [1 / (1 + math.exp(-value)) for value in (2.0, 4.0)]
    expected = [sum(probability) / 2, 0.0]  # the second mask is empty
    assert mask_scores(logits, masks).tolist() == pytest.approx(expected)
