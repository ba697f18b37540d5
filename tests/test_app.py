"""The web app (``python -m flmm_lightning.app``), served on a free local port with a tiny checkpoint and
used as people and programs use it: through ``gradio_client`` (the named endpoints) and a real headless
Chromium (Debian's ``chromium``, driven by Playwright; nothing downloaded)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES_DIR, intra_op_threads
from PIL import Image
from pycocotools import mask as mask_utils

from flmm_lightning.inference.grounder import Grounder
from flmm_lightning.outputs.overlays import object_color, object_hex_color, overlay_heatmap

gradio_client = pytest.importorskip("gradio_client", reason="the app extra (gradio) is not installed")
pytestmark = pytest.mark.slow

PHOTO = FIXTURES_DIR / "coco_sample/images/000000142238.jpg"  # 640x427
QUESTION = "What is in the image?"
MAX_NEW_TOKENS = 4
LIMITS = {"max_pixels": 300_000, "max_file_mb": 1, "max_question_chars": 200, "max_phrases": 3}
CHAT_DEFAULTS = ("keywords", 0.0, "")  # selector, threshold (every token is a keyword), phrases
STARTUP_TIMEOUT_S = 240


@dataclass
class Server:
    url: str
    temp_dir: Path
    seconds_to_first_page: float

    @property
    def sessions(self) -> Path:
        (root,) = self.temp_dir.glob("flmm_app_*")
        return root / "sessions"

    def connect(self) -> gradio_client.Client:
        """A new API session; what it downloads stays in the test's temporary folder."""
        return gradio_client.Client(self.url, verbose=False, download_files=str(self.downloads))

    @property
    def downloads(self) -> Path:
        return self.temp_dir.parent / f"{self.temp_dir.name}_downloads"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def page_status(url: str) -> int | None:
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.TransportError:
        return None


@contextlib.contextmanager
def running_app(checkpoint: Path, temp_dir: Path, overrides: Sequence[str] = ()) -> Iterator[Server]:
    """The app as its CLI starts it (``overrides`` after the tests' own), until the block ends."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "flmm_lightning.app",
        f"ckpt={checkpoint}",
        f"port={port}",
        "device=cpu",
        f"temp_dir={temp_dir}",
        f"hydra.run.dir={temp_dir / 'run'}",
        f"generation.max_new_tokens={MAX_NEW_TOKENS}",
        *(f"limits.{key}={value}" for key, value in LIMITS.items()),
        *overrides,
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(intra_op_threads()),
        # a closed tab is noticed within a second (Gradio's default heartbeat is 15 s)
        "GRADIO_HEARTBEAT_INTERVAL": "1",
    }
    log = (temp_dir / "server.log").open("w")
    started = time.monotonic()
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        while page_status(url) != 200:
            if process.poll() is not None or time.monotonic() - started > STARTUP_TIMEOUT_S:
                pytest.fail(f"the app did not serve its page:\n{(temp_dir / 'server.log').read_text()}")
            time.sleep(0.25)
        yield Server(url, temp_dir, time.monotonic() - started)
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
    assert not list(temp_dir.glob("flmm_app_*")), "the app left its temporary folder behind"


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The app as its CLI starts it, shared by this module's tests (one model load)."""
    with running_app(tiny_checkpoint, tmp_path_factory.mktemp("app_tmp")) as server:
        yield server


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[gradio_client.Client]:
    client = server.connect()
    yield client
    client.close()


@pytest.fixture(scope="module")
def grounder(tiny_checkpoint: Path) -> Grounder:
    return Grounder.from_checkpoint(tiny_checkpoint, device="cpu")


def chat(client: gradio_client.Client, photo: Path, question: str = QUESTION) -> tuple:
    return client.predict(gradio_client.handle_file(photo), question, *CHAT_DEFAULTS, api_name="/chat")


def highlighted_text(update: dict) -> str:
    return "".join(piece["token"] for piece in update["value"])


# ---- the endpoints -----------------------------------------------------------------------------------------
def test_app_serves_its_page_soon(server: Server) -> None:
    print(f"app: first page served {server.seconds_to_first_page:.1f} s after the command started")
    assert server.seconds_to_first_page < STARTUP_TIMEOUT_S


def test_chat_answers_as_the_grounder_does_with_coloured_phrases_overlay_and_json(
    server: Server, grounder: Grounder
) -> None:
    client = server.connect()
    history, answer, overlay, shown, downloads, notice = chat(client, PHOTO)
    expected = grounder.chat(PHOTO, QUESTION, threshold=0.0, max_new_tokens=MAX_NEW_TOKENS)
    assert highlighted_text(answer) == expected.answer and notice == ""
    labelled = [piece for piece in answer["value"] if piece["class_or_confidence"] is not None]
    assert [piece["token"] for piece in labelled] == [phrase.text for phrase in expected.phrases]
    assert answer["color_map"] == {str(k + 1): object_hex_color(k) for k in range(len(expected.phrases))}
    assert shown["value"] == list(range(len(expected.phrases)))
    with Image.open(overlay) as image:
        assert image.size == Image.open(PHOTO).size
    png, json_file = sorted(downloads, key=lambda path: Path(path).suffix, reverse=True)
    assert Path(png).read_bytes() == Path(overlay).read_bytes()
    record = json.loads(Path(json_file).read_text())
    assert record["answer"] == expected.answer and record["question"] == QUESTION
    for phrase, stored in zip(expected.phrases, record["phrases"], strict=True):
        assert stored["char_span"] == list(phrase.char_span)
        assert np.array_equal(mask_utils.decode(stored["segmentation"]).astype(bool), phrase.mask.numpy())

    # the next turn about the same photo has the first as its history
    history, answer, *_ = chat(client, PHOTO, "And what else?")
    second = grounder.chat(
        PHOTO, "And what else?", history=[expected], threshold=0.0, max_new_tokens=MAX_NEW_TOKENS
    )
    assert highlighted_text(answer) == second.answer
    assert [message["role"] for message in history] == ["user", "assistant"] * 2

    # looking inside the last turn reads it with the first turn as history, as it was answered
    view = grounder.attention(PHOTO, "And what else?", second.answer.strip(), history=[expected])
    word = len(view.words) - 1
    heatmap, *_ = client.predict(
        gradio_client.handle_file(PHOTO),
        "And what else?",
        second.answer,
        word,
        "mean",
        "mean",
        "",
        api_name="/attention",
    )
    expected_map = np.asarray(overlay_heatmap(view.image, view.heatmap(word)), dtype=np.int16)
    assert np.abs(np.asarray(Image.open(heatmap).convert("RGB"), dtype=np.int16) - expected_map).max() <= 1
    client.close()


def test_given_phrases_are_the_ones_highlighted(client: gradio_client.Client, grounder: Grounder) -> None:
    answer_text = grounder.chat(PHOTO, QUESTION, max_new_tokens=MAX_NEW_TOKENS, threshold=0.0).answer
    phrase = answer_text.strip().split()[0]
    _, answer, *_ = client.predict(
        gradio_client.handle_file(PHOTO), QUESTION, "given", 0.3, phrase, api_name="/chat"
    )
    labelled = [piece["token"] for piece in answer["value"] if piece["class_or_confidence"] is not None]
    assert highlighted_text(answer) == answer_text and labelled == [phrase]


def test_ground_returns_masks_with_their_boxes(client: gradio_client.Client, grounder: Grounder) -> None:
    phrases = ["a man", "the ball"]
    overlay, table, downloads, notice = client.predict(
        gradio_client.handle_file(PHOTO), "\n".join(phrases), api_name="/ground"
    )
    expected = grounder.ground(PHOTO, phrases)
    (json_file,) = [path for path in downloads if path.endswith(".json")]
    objects = json.loads(Path(json_file).read_text())["objects"]
    assert [row[1] for row in table["data"]] == [record["phrase"] for record in objects] == phrases
    for row, record, mask, score in zip(table["data"], objects, expected.masks, expected.scores, strict=True):
        decoded = mask_utils.decode(record["segmentation"]).astype(bool)
        assert np.array_equal(decoded, mask.numpy()) and row[-1] == decoded.sum()
        assert record["mask_score"] == pytest.approx(float(score)) and row[2] == pytest.approx(
            float(score), abs=1e-3
        )
        if decoded.any():
            ys, xs = np.nonzero(decoded)
            assert row[3:7] == [xs.min(), ys.min(), xs.max(), ys.max()]


def test_a_sideways_phone_photo_is_grounded_upright(client: gradio_client.Client, tmp_path: Path) -> None:
    with Image.open(PHOTO) as photo:
        stored = photo.convert("RGB").transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "sideways.jpg"
    stored.save(path, exif=exif)
    overlay, *_ = client.predict(gradio_client.handle_file(path), "a man", api_name="/ground")
    with Image.open(overlay) as image:
        assert image.size == Image.open(PHOTO).size  # upright again, as a viewer shows it


def test_attention_shows_a_words_heatmap_and_ranks_the_answers_words_in_a_box(
    client: gradio_client.Client, grounder: Grounder
) -> None:
    answer_text = grounder.chat(PHOTO, QUESTION, max_new_tokens=MAX_NEW_TOKENS, threshold=0.0).answer
    view = grounder.attention(PHOTO, QUESTION, answer_text)
    word = len(view.words) - 1  # the answer's last word
    box = (0, 0, view.image.width / 2, view.image.height)
    heatmap, words, layer, head, answer, ranking, notice = client.predict(
        gradio_client.handle_file(PHOTO),
        QUESTION,
        answer_text,
        word,
        "1",
        "0",
        ", ".join(map(str, box)),
        api_name="/attention",
    )
    assert answer == view.answer and [label.split(": ", 1)[1] for label, _ in words["choices"]] == [
        f"{word.text} ({word.part})" for word in view.words
    ]
    assert (layer["value"], head["value"]) == ("1", "0")
    expected = np.asarray(overlay_heatmap(view.image, view.heatmap(word, layer=1, head=0)), dtype=np.int16)
    shown = np.asarray(Image.open(heatmap).convert("RGB"), dtype=np.int16)
    inside_box_outline = np.ones(shown.shape[:2], dtype=bool)
    inside_box_outline[4:-4, 4 : int(box[2]) - 4] = False  # the box is drawn over the map: leave its edges
    assert np.abs(shown - expected)[~inside_box_outline].max() <= 1  # rounding under other thread counts
    ranked = view.rank_region(box)
    assert [row[0] for row in ranking["data"]] == [index for index, _ in ranked]
    assert [row[2] for row in ranking["data"]] == pytest.approx([share for _, share in ranked], abs=1e-3)


@pytest.mark.parametrize(
    ("word", "layer", "box", "message"),
    [
        (999, "mean", "", "word must be a number from 0"),
        (0, "99", "", "layer must be 'mean' or a number"),
        (0, "mean", "1 2 3", "a box is four numbers"),
        (0, "mean", "0 0 5000 10", "reaches outside"),
    ],
)
def test_attention_settings_out_of_range_are_refused(
    client: gradio_client.Client, word: int, layer: str, box: str, message: str
) -> None:
    with pytest.raises(gradio_client.exceptions.AppError, match=message):
        client.predict(
            gradio_client.handle_file(PHOTO), QUESTION, "", word, layer, "mean", box, api_name="/attention"
        )


# ---- limits: each refused with a message, the app keeps serving --------------------------------------------
def broken_upload(tmp_path: Path, kind: str) -> Path:
    if kind == "truncated":
        path = tmp_path / "truncated.jpg"
        path.write_bytes(PHOTO.read_bytes()[:20_000])
    else:  # a table saved under a photo's name, or a text file
        path = tmp_path / ("table.jpg" if kind == "renamed" else "notes.txt")
        path.write_text("name,phrase\n1,a man\n")
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("truncated", "cannot read image truncated.jpg"),
        ("renamed", "cannot read image table.jpg"),
        ("text", "cannot read image notes.txt"),
    ],
)
def test_unreadable_uploads_are_refused_and_the_app_keeps_serving(
    client: gradio_client.Client, tmp_path: Path, kind: str, message: str
) -> None:
    with pytest.raises(gradio_client.exceptions.AppError, match=message):
        chat(client, broken_upload(tmp_path, kind))
    history, answer, *_ = chat(client, PHOTO)
    assert highlighted_text(answer)


def test_a_long_question_is_refused(client: gradio_client.Client) -> None:
    with pytest.raises(gradio_client.exceptions.AppError, match="the limit is 200"):
        chat(client, PHOTO, "why " * 60)


def test_too_many_phrases_are_refused(client: gradio_client.Client) -> None:
    with pytest.raises(gradio_client.exceptions.AppError, match="4 phrases given; the limit is 3"):
        client.predict(gradio_client.handle_file(PHOTO), "a\nb\nc\nd", api_name="/ground")


def test_a_file_above_the_size_limit_is_refused(client: gradio_client.Client, tmp_path: Path) -> None:
    path = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (800, 700, 3), dtype=np.uint8)).save(path)
    assert path.stat().st_size > LIMITS["max_file_mb"] * 2**20
    with pytest.raises(Exception, match="(?i)file size"):
        client.predict(gradio_client.handle_file(path), "a man", api_name="/ground")


def test_a_photo_above_the_pixel_limit_is_downscaled_with_a_notice(
    client: gradio_client.Client, tmp_path: Path
) -> None:
    path = tmp_path / "large.jpg"
    Image.open(PHOTO).resize((1280, 854)).save(path, quality=70)
    overlay, table, downloads, notice = client.predict(
        gradio_client.handle_file(path), "a man", api_name="/ground"
    )
    with Image.open(overlay) as image:
        width, height = image.size
    assert width * height <= LIMITS["max_pixels"] and abs(width / height - 1280 / 854) < 0.01
    assert "downscaled" in notice and f"{width}x{height}" in notice


# ---- per-session files -------------------------------------------------------------------------------------
def test_a_closed_session_leaves_no_files(server: Server, tmp_path: Path) -> None:
    photo = tmp_path / "session_photo.png"  # content no other test sends: its cached upload is this session's
    Image.open(PHOTO).rotate(180).save(photo)
    client = server.connect()
    client.predict(gradio_client.handle_file(photo), "a man", api_name="/ground")
    folder = server.sessions / client.session_hash
    assert sorted(path.suffix for path in folder.iterdir() if path.is_file()) == [".json", ".png"]
    (upload,) = (server.sessions.parent / "uploads").glob(f"*/{photo.name}")
    client.close()
    deadline = time.monotonic() + 20
    while (folder.exists() or upload.exists()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not folder.exists() and not upload.exists()


# ---- a real browser ----------------------------------------------------------------------------------------
def save_screenshot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("FLMM_SCREENSHOT_DIR"):
        target = Path(os.environ["FLMM_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / name)
    return path


@pytest.fixture
def browser_page(server: Server) -> Iterator:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("no `chromium` on PATH (Debian: apt-get install chromium; .ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (dev extra) is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"], headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        # Every wait may span a model request, and a small shared machine can be slow to answer one.
        page.set_default_timeout(120_000)
        sync_api.expect.set_options(timeout=120_000)
        page.goto(server.url)
        yield page
        browser.close()


def test_a_person_uploads_a_photo_asks_and_sees_the_answer_and_overlay(
    browser_page, server: Server, grounder: Grounder, tmp_path: Path
) -> None:
    from playwright import sync_api

    page = browser_page
    sessions_before = set(server.sessions.iterdir())
    page.locator("#photo input[type=file]").set_input_files(str(PHOTO))
    page.locator("#question textarea").fill(QUESTION)
    page.locator("#ask").click()
    page.locator("#overlay img").wait_for(state="visible", timeout=120_000)
    expected = grounder.chat(PHOTO, QUESTION, threshold=0.0, max_new_tokens=MAX_NEW_TOKENS)
    shown = page.locator("#answer").inner_text()
    assert all(phrase.text.strip() in shown for phrase in expected.phrases)
    highlights = page.locator("#answer .token.highlighted")
    assert highlights.count() == len(expected.phrases)
    for k in range(len(expected.phrases)):  # each phrase in its mask's colour
        assert "rgba({}, {}, {}".format(*object_color(k)) in highlights.nth(k).get_attribute("style")
    save_screenshot(page, tmp_path, "app_chat_turn.png")
    # hiding the phrases: the answer loses its labels, the overlay is redrawn without masks
    overlay_src = page.locator("#overlay img").get_attribute("src")
    for box in page.locator("#shown input[type=checkbox]").all():
        box.uncheck()
    page.wait_for_function(
        "src => document.querySelector('#overlay img').getAttribute('src') !== src", arg=overlay_src
    )
    assert highlights.count() == 0

    # look inside the turn: a word's heat-map, then a box drawn by two clicks ranks the answer's words
    page.get_by_role("tab", name="Look inside").click()
    page.get_by_role("button", name="Use the last chat turn").click()
    page.locator("#look-answer textarea").wait_for(state="visible")
    page.wait_for_function("() => document.querySelector('#look-answer textarea').value !== ''")
    page.locator("#look").click()
    heatmap = page.locator("#heatmap img")
    heatmap.wait_for(state="visible", timeout=120_000)
    bounds, first_map = heatmap.bounding_box(), heatmap.get_attribute("src")
    heatmap.click(position={"x": bounds["width"] * 0.1, "y": bounds["height"] * 0.1})
    heatmap.click(position={"x": bounds["width"] * 0.6, "y": bounds["height"] * 0.9})
    page.wait_for_function("() => document.querySelector('#box textarea, #box input').value !== ''")
    answer_words = expected.answer.split()
    sync_api.expect(page.locator("#ranking")).to_contain_text(answer_words[0], timeout=60_000)
    page.wait_for_function(  # the map with the box drawn on it, loaded
        "src => { const img = document.querySelector('#heatmap img');"
        " return img.getAttribute('src') !== src && img.complete; }",
        arg=first_map,
    )
    save_screenshot(page, tmp_path, "app_token_heatmap.png")
    (session,) = set(server.sessions.iterdir()) - sessions_before
    page.close()  # the tab closes: its session's files go
    deadline = time.monotonic() + 20
    while session.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not session.exists()
