"""Atomic file writes: a reader sees the old file or the whole new one, never a part of it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flmm_lightning.common.files import atomic_write


def test_a_finished_write_replaces_the_file_and_leaves_nothing_else(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with atomic_write(target) as handle:
        handle.write(b"new")
        assert target.read_text() == "old"  # not visible before the block ends
    assert target.read_text() == "new"
    assert [path.name for path in tmp_path.iterdir()] == ["metrics.json"]


@pytest.mark.parametrize("durable", [False, True])
def test_a_failed_write_keeps_the_old_file(tmp_path: Path, durable: bool) -> None:
    target = tmp_path / "last.ckpt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_write(target, durable=durable) as handle:
        handle.write(b"half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [path.name for path in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_fixed_temporary_name_overwrites_what_a_killed_writer_left(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "last.ckpt"
    target.parent.mkdir()
    (target.parent / ".last.ckpt.tmp").write_bytes(b"partial from a killed process")
    with atomic_write(target, durable=True, temp_name=".last.ckpt.tmp") as handle:
        handle.write(b"whole")
    assert target.read_bytes() == b"whole"
    assert sorted(path.name for path in target.parent.iterdir()) == ["last.ckpt"]


def test_mode_overrides_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o077)
    try:
        with atomic_write(tmp_path / "private") as handle:
            handle.write(b"x")
        with atomic_write(tmp_path / "shared", mode=0o644) as handle:
            handle.write(b"x")
    finally:
        os.umask(previous)
    assert (tmp_path / "private").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "shared").stat().st_mode & 0o777 == 0o644
