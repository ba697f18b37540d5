"""The repository works wherever it is cloned: no tracked file names a path of one particular machine."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Absolute paths into a home or work folder of some machine (a path after a word character or a dot, as in a
# URL, is not one). Written so that this pattern does not match its own source.
MACHINE_PATH = re.compile(rb"(?<![\w.])/(?:work|root|home/[\w.-]+|Users/[\w.-]+)/")


def tracked_files() -> list[Path]:
    try:
        listing = subprocess.run(
            ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"not a git checkout ({error})")
    return [REPO / name for name in listing.decode().split("\0") if name]


def test_no_tracked_file_names_a_machine_path() -> None:
    found = []
    for path in tracked_files():
        if path.is_file():
            for line_number, line in enumerate(path.read_bytes().splitlines(), start=1):
                match = MACHINE_PATH.search(line)
                if match:
                    found.append(f"{path.relative_to(REPO)}:{line_number}: {match.group().decode()}")
    assert not found, "absolute machine paths in tracked files:\n" + "\n".join(found)


# The examples are split after their first "/" so that this file itself passes the scan above.
@pytest.mark.parametrize(
    "text, machine",
    [
        (b'Path("/' + b'work/shared/fixtures")', True),
        (b"cache: /" + b"root/.cache/x", True),
        (b"see /" + b"home/alice/data", True),
        (b"open('/" + b"Users/bob/x.png')", True),
        (b"https://example.org/home/alice/page", False),
        (b"tmp_path / 'work' / 'x'", False),
        (b"/tmp/flmm_assets", False),
    ],
)
def test_machine_path_pattern(text: bytes, machine: bool) -> None:
    assert bool(MACHINE_PATH.search(text)) is machine
