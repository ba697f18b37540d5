"""The app reads only what a session uploaded, keeps its own copy of it, cleans up abandoned sessions, fits
its own outputs and says when a result is empty; a photo is measured before it is decoded. Its own server
(tighter limits than tests/test_app.py's), driven through gradio_client and Gradio's HTTP API."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hostile_images import sixteen_bit_bomb
from PIL import Image
from test_app import PHOTO, QUESTION, Server, running_app

gradio_client = pytest.importorskip("gradio_client", reason="the app extra (gradio) is not installed")
pytestmark = pytest.mark.slow

SESSION_IDLE_S = 25  # longer than an upload lives (UPLOAD_TTL_S), as in the defaults (3600 vs 900)
UPLOAD_TTL_S = 8  # long enough for an upload to reach its request on a busy machine
OVERRIDES = [
    f"session_idle_s={SESSION_IDLE_S}",
    f"upload_ttl_s={UPLOAD_TTL_S}",
    "limits.max_answer_chars=1",  # every answer the app gives is longer: only its own are taken
    "limits.max_phrases=40",
]


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_app(tiny_checkpoint, tmp_path_factory.mktemp("app_uploads"), OVERRIDES) as server:
        yield server


def file_data(path: str | Path) -> dict:
    """A photo as the page sends it: a path on the server, no upload."""
    return {"path": str(path), "orig_name": Path(path).name, "meta": {"_type": "gradio.FileData"}}


def raw_call(server: Server, api_name: str, data: list, session_hash: str) -> tuple[str, object]:
    """Gradio's HTTP API, as any program can call it: the final event (``complete`` / ``error``) and data."""
    base = f"{server.url}gradio_api/call/{api_name}"
    started = httpx.post(base, json={"data": data, "session_hash": session_hash}, timeout=30)
    started.raise_for_status()
    event = None
    with httpx.stream("GET", f"{base}/{started.json()['event_id']}", timeout=300) as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: ") and event in ("complete", "error"):
                return event, json.loads(line.removeprefix("data: "))
    raise AssertionError(f"no final event from {api_name}")


def cached_upload(server: Server, name: str) -> Path:
    (path,) = (server.sessions.parent / "uploads").glob(f"*/{name}")
    return path


def test_a_server_side_path_is_refused(server: Server, tmp_path: Path) -> None:
    secret = tmp_path / "secret.png"
    Image.open(PHOTO).save(secret)
    folder_escape = server.sessions.parent / "uploads" / ".." / "sessions" / "x.png"
    for path in (secret, folder_escape):
        for api_name, data in (("ground", ["a man"]), ("chat", [QUESTION, "lmm", 0.3, ""])):
            event, payload = raw_call(server, api_name, [file_data(path), *data], "attacker1")
            assert event == "error" and "uploaded" in json.dumps(payload), (api_name, path, payload)
    assert not (server.sessions / "attacker1").exists() or not any(
        (server.sessions / "attacker1").rglob("*.png")
    )


def test_two_tabs_with_the_same_photo_keep_working_when_one_closes(server: Server, tmp_path: Path) -> None:
    photo = tmp_path / "shared.png"  # content no other test sends
    Image.open(PHOTO).rotate(90, expand=True).save(photo)
    first, second = server.connect(), server.connect()
    first.predict(gradio_client.handle_file(photo), "a man", api_name="/ground")
    second.predict(gradio_client.handle_file(photo), "a man", api_name="/ground")
    cached = cached_upload(server, photo.name)  # one cached file for both (Gradio caches by content)
    first.close()
    deadline = time.monotonic() + 20
    while (server.sessions / first.session_hash).exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not (server.sessions / first.session_hash).exists()
    # the second tab still names the cached file, as the page does; its own copy answers
    event, payload = raw_call(server, "ground", [file_data(cached), "a man"], second.session_hash)
    assert event == "complete", payload
    second.close()


def test_an_expired_upload_asks_for_the_photo_again(server: Server, tmp_path: Path) -> None:
    photo = tmp_path / "expiring.png"
    Image.open(PHOTO).rotate(180).save(photo)
    client = server.connect()
    client.predict(gradio_client.handle_file(photo), "a man", api_name="/ground")
    cached = cached_upload(server, photo.name)
    deadline = time.monotonic() + 4 * UPLOAD_TTL_S
    while cached.exists() and time.monotonic() < deadline:  # Gradio's time-to-live removes it
        time.sleep(0.5)
    assert not cached.exists()
    # the session that sent it still has its copy ...
    event, payload = raw_call(server, "ground", [file_data(cached), "a man"], client.session_hash)
    assert event == "complete", payload
    # ... a session that never had it is asked to upload it again, with no raw error
    event, payload = raw_call(server, "ground", [file_data(cached), "a man"], "latecomer1")
    assert (
        event == "error" and "upload it again" in json.dumps(payload) and "Errno" not in json.dumps(payload)
    )
    client.close()


def test_abandoned_sessions_are_removed(server: Server, tmp_path: Path) -> None:
    """A session that never closes (a killed client, a raw API caller) goes once idle for session_idle_s."""
    photo = tmp_path / "abandoned.png"
    Image.open(PHOTO).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(photo)
    client = server.connect()
    client.predict(gradio_client.handle_file(photo), "a man", api_name="/ground")
    cached = cached_upload(server, photo.name)
    event, _ = raw_call(server, "ground", [file_data(cached), "a man"], "abandoned1")
    assert event == "complete" and (server.sessions / "abandoned1").is_dir()
    deadline = time.monotonic() + 4 * SESSION_IDLE_S
    while (server.sessions / "abandoned1").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not (server.sessions / "abandoned1").exists()
    client.close()


def test_look_inside_takes_the_apps_own_answer_and_limits_typed_ones(server: Server) -> None:
    client = server.connect()
    _, answer, *_ = client.predict(
        gradio_client.handle_file(PHOTO), QUESTION, "keywords", 0.0, "", api_name="/chat"
    )
    own = "".join(piece["token"] for piece in answer["value"])
    assert len(own.strip()) > 1  # over limits.max_answer_chars
    heatmap, *_ = client.predict(
        gradio_client.handle_file(PHOTO), QUESTION, own, 0, "mean", "mean", "", api_name="/attention"
    )
    assert Path(heatmap).is_file()
    with pytest.raises(gradio_client.exceptions.AppError, match="the limit for a typed answer is 1"):
        client.predict(
            gradio_client.handle_file(PHOTO), QUESTION, "typed", 0, "mean", "mean", "", api_name="/attention"
        )
    client.close()


def test_empty_masks_are_said_and_their_boxes_are_blank(server: Server) -> None:
    """40 phrases (the legend fits); each empty mask has a notice, a blank box and a null box in the JSON."""
    client = server.connect()
    phrases = [f"thing {k}" for k in range(40)]
    overlay, table, downloads, notice = client.predict(
        gradio_client.handle_file(PHOTO), "\n".join(phrases), api_name="/ground"
    )
    (json_file,) = [path for path in downloads if path.endswith(".json")]
    document = json.loads(Path(json_file).read_text())
    empty = [record for record in document["objects"] if record["area"] == 0]
    assert len(document["notices"]) == len(empty)
    for record, row in zip(document["objects"], table["data"], strict=True):
        if record["area"] == 0:
            assert record["bbox_xyxy"] is None and row[3:7] == [None] * 4
            assert f"no mask for {record['phrase']!r}" in notice
    with Image.open(overlay) as image:
        assert image.size == Image.open(PHOTO).size
    client.close()


def test_a_decompression_bomb_is_refused_from_its_header(server: Server, tmp_path: Path) -> None:
    client = server.connect()
    with pytest.raises(gradio_client.exceptions.AppError, match="13000x13000"):
        client.predict(gradio_client.handle_file(sixteen_bit_bomb(tmp_path)), "a man", api_name="/ground")
    client.close()
