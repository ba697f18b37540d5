"""The app's per-session files without a server: only uploads are read, each session through its own copy;
shared uploads outlive one session's closing; idle sessions are swept."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason="the app extra (gradio) is not installed")

from flmm_lightning.app.sessions import SessionFolders, UploadError  # noqa: E402


@pytest.fixture
def folders(tmp_path: Path) -> Iterator[SessionFolders]:
    folders = SessionFolders(tmp_path, max_idle_s=3600)
    yield folders
    folders.remove()


def upload(folders: SessionFolders, name: str = "photo.png", content: bytes = b"pixels") -> Path:
    """A file where Gradio caches an upload: a folder named by a hash, the file under its own name."""
    path = folders.uploads / "0123abcd" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def test_files_outside_the_upload_cache_are_refused(folders: SessionFolders, tmp_path: Path) -> None:
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"server data")
    link = upload(folders).with_name("link.png")
    link.symlink_to(secret)
    escape = folders.uploads / ".." / "sessions" / "other" / "x.png"
    for path in (secret, escape, link):
        with pytest.raises(UploadError):
            folders.own_copy("session1", path)
    assert not list(folders.sessions.rglob("*.png"))


def test_a_copy_outlives_the_cached_upload_and_other_sessions(folders: SessionFolders) -> None:
    cached = upload(folders)
    first, second = folders.own_copy("first", cached), folders.own_copy("second", cached)
    assert first != second and first.read_bytes() == second.read_bytes() == b"pixels"
    folders.close("first")
    assert cached.exists()  # the second session sent it too
    folders.close("second")
    assert not cached.exists() and not first.exists() and not second.exists()


def test_an_expired_upload_is_a_message_not_an_errno(folders: SessionFolders) -> None:
    cached = upload(folders)
    copy = folders.own_copy("keeper", cached)
    cached.unlink()  # Gradio's time-to-live
    assert folders.own_copy("keeper", cached) == copy
    with pytest.raises(UploadError, match="expired.*upload it again"):
        folders.own_copy("latecomer", cached)


def test_idle_sessions_are_swept(folders: SessionFolders) -> None:
    cached = upload(folders)
    folders.own_copy("idle", cached)
    folders.own_copy("busy", cached)
    old = time.time() - 2 * folders.max_idle_s
    os.utime(folders.sessions / "idle", (old, old))
    assert folders.sweep() == ["idle"]
    assert not (folders.sessions / "idle").exists() and (folders.sessions / "busy").exists()
    assert cached.exists()
    # a session in the middle of a request is not idle, however old its folder
    os.utime(folders.sessions / "busy", (old, old))
    with folders.in_use("busy"):
        assert folders.sweep() == []
    assert folders.sweep() == ["busy"] and not cached.exists()
