"""Where the app writes: one folder per browser session (downloads), removed when the session ends, under
one root per process (Gradio's upload cache included), removed when the process stops. The photos a
session sent are removed from the upload cache with its folder."""

from __future__ import annotations

import re
import shutil
import tempfile
import threading
from pathlib import Path

# Gradio's session ids are short random strings; anything else is refused rather than turned into a path.
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class SessionFolders:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(tempfile.mkdtemp(prefix="flmm_app_", dir=root))
        self.uploads = self.root / "uploads"  # GRADIO_TEMP_DIR
        self.sessions = self.root / "sessions"
        self.uploads.mkdir()
        self.sessions.mkdir()
        self._uploads_of: dict[str, set[Path]] = {}
        self._lock = threading.Lock()

    def folder(self, session_id: str | None) -> Path:
        """The session's folder (created on first use)."""
        if not session_id or not _SESSION_ID.fullmatch(session_id):
            raise ValueError(f"not a session id: {session_id!r}")
        folder = self.sessions / session_id
        folder.mkdir(exist_ok=True)
        return folder

    def note_upload(self, session_id: str | None, path: str | Path | None) -> None:
        """Remembers a file the session uploaded (Gradio caches uploads by content, outside the session's
        folder) so that ``close`` removes it; paths outside the upload cache are ignored."""
        if not session_id or path is None:
            return
        path = Path(path).resolve()
        if path.is_relative_to(self.uploads.resolve()):
            with self._lock:
                self._uploads_of.setdefault(session_id, set()).add(path)

    def close(self, session_id: str | None) -> None:
        """Removes the session's folder (its downloads) and the uploads it sent."""
        if not session_id or not _SESSION_ID.fullmatch(session_id):
            return
        shutil.rmtree(self.sessions / session_id, ignore_errors=True)
        with self._lock:
            uploads = self._uploads_of.pop(session_id, set())
        for path in uploads:
            path.unlink(missing_ok=True)
            if path.parent != self.uploads.resolve():  # Gradio's per-file folder
                shutil.rmtree(path.parent, ignore_errors=True)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
