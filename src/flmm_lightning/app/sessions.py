"""Where the app writes: one folder per browser session (downloads), removed when the session ends, under
one root per process (Gradio's upload cache included), removed when the process stops."""

from __future__ import annotations

import re
import shutil
import tempfile
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

    def folder(self, session_id: str | None) -> Path:
        """The session's folder (created on first use)."""
        if not session_id or not _SESSION_ID.fullmatch(session_id):
            raise ValueError(f"not a session id: {session_id!r}")
        folder = self.sessions / session_id
        folder.mkdir(exist_ok=True)
        return folder

    def close(self, session_id: str | None) -> None:
        """Removes the session's folder (its downloads)."""
        if session_id and _SESSION_ID.fullmatch(session_id):
            shutil.rmtree(self.sessions / session_id, ignore_errors=True)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
