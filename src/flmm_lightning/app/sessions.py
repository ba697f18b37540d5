"""Where the app writes and what it reads: one folder per browser session, under one root per process
(Gradio's upload cache included), removed when the process stops.

A request names its photo by a path in Gradio's upload cache. The app reads only such a file, and only
through the session's own copy of it (``own_copy``): Gradio caches uploads by content, so two tabs sending
the same photo share one cached file, which the other tab's closing or the cache's time-to-live may delete.
A session's folder (downloads and photo copies) is removed when its tab closes, or once it has been idle
for ``max_idle_s`` (a killed client never says it left); a cached upload goes with the last session that
sent it, at the latest after Gradio's own time-to-live.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

# Gradio's session ids are short random strings; anything else is refused rather than turned into a path.
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
PHOTOS = "photos"


class UploadError(ValueError):
    """A request naming a photo the app will not read: not an upload, or one that has expired."""


class SessionFolders:
    def __init__(self, root: str | Path | None = None, max_idle_s: float = 3600.0):
        self.root = Path(tempfile.mkdtemp(prefix="flmm_app_", dir=root)).resolve()
        self.uploads = self.root / "uploads"  # GRADIO_TEMP_DIR
        self.sessions = self.root / "sessions"
        self.uploads.mkdir()
        self.sessions.mkdir()
        self.max_idle_s = max_idle_s
        self._uploads_of: dict[str, set[Path]] = {}
        self._requests: Counter[str] = Counter()  # requests running per session: never swept meanwhile
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._sweeper = threading.Thread(
            target=self._sweep_until_stopped, name="flmm-app-sweeper", daemon=True
        )
        self._sweeper.start()

    def folder(self, session_id: str | None) -> Path:
        """The session's folder (created on first use), marked as used now."""
        if not session_id or not _SESSION_ID.fullmatch(session_id):
            raise ValueError(f"not a session id: {session_id!r}")
        folder = self.sessions / session_id
        folder.mkdir(exist_ok=True)
        os.utime(folder)
        return folder

    @contextlib.contextmanager
    def in_use(self, session_id: str | None) -> Iterator[None]:
        """Marks the session as busy (a request is reading its photo) so that ``sweep`` leaves it alone."""
        with self._lock:
            self._requests[session_id or ""] += 1
        try:
            yield
        finally:
            with self._lock:
                self._requests[session_id or ""] -= 1
                if self._requests[session_id or ""] <= 0:
                    del self._requests[session_id or ""]

    def own_copy(self, session_id: str | None, photo: str | Path | None) -> Path | None:
        """The session's own copy of the uploaded ``photo`` (a path in the upload cache), made on first use;
        None for None. Raises ``UploadError`` for a path outside the upload cache (a server-side file) and for
        an upload that is gone and was never copied (expired: the person uploads it again)."""
        if photo is None:
            return None
        cached = Path(os.path.abspath(photo))
        if not cached.is_relative_to(self.uploads) or ".." in Path(photo).parts:
            raise UploadError(
                "this app reads only photos uploaded to it in this session; upload the photo "
                "(an API call sends it with gradio_client.handle_file)"
            )
        # The cached file's path (content hash and name) is the photo's identity; the copy is named after it.
        copy = self.folder(session_id) / PHOTOS / hashlib.sha256(str(cached).encode()).hexdigest()[:32]
        copy = copy / cached.name
        if copy.is_file():
            return copy
        if cached.is_symlink() or not cached.is_file() or not cached.resolve().is_relative_to(self.uploads):
            raise UploadError(
                "the photo uploaded earlier has expired (uploads are kept a limited time): upload it again"
            )
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cached, copy, follow_symlinks=False)
        with self._lock:
            self._uploads_of.setdefault(session_id, set()).add(cached)
        return copy

    def close(self, session_id: str | None) -> None:
        """Removes the session's folder (downloads, photo copies) and the cached uploads it sent that no
        other open session sent too."""
        if not session_id or not _SESSION_ID.fullmatch(session_id):
            return
        shutil.rmtree(self.sessions / session_id, ignore_errors=True)
        with self._lock:
            uploads = self._uploads_of.pop(session_id, set())
            still_used = set().union(*self._uploads_of.values())
        for path in uploads - still_used:
            path.unlink(missing_ok=True)
            if path.parent != self.uploads:  # Gradio's per-file folder
                shutil.rmtree(path.parent, ignore_errors=True)

    def sweep(self) -> list[str]:
        """Closes every session idle for longer than ``max_idle_s``; returns their ids."""
        deadline = time.time() - self.max_idle_s
        idle = []
        for folder in self.sessions.iterdir():
            with self._lock:
                if self._requests[folder.name] > 0:
                    continue
            try:
                if folder.stat().st_mtime < deadline:
                    idle.append(folder.name)
            except FileNotFoundError:  # closed meanwhile
                continue
        for session_id in idle:
            self.close(session_id)
        return idle

    def _sweep_until_stopped(self) -> None:
        while not self._stopped.wait(max(0.5, min(60.0, self.max_idle_s / 2))):
            try:
                self.sweep()
            except FileNotFoundError:  # the app is stopping: its root is being removed
                return

    def remove(self) -> None:
        self._stopped.set()
        shutil.rmtree(self.root, ignore_errors=True)
