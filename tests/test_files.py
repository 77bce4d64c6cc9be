"""platform_common.files: whole-file replacement for files other processes read."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from platform_common.files import write_atomically


def test_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "ready.json"
    target.write_text("old\n")
    write_atomically(target, "new\n")
    assert target.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ready.json"]


def test_private_files_are_never_readable_by_others(tmp_path: Path) -> None:
    old_umask = os.umask(0)  # the mode must not depend on the caller's umask
    try:
        write_atomically(tmp_path / "secret", "s3cret\n", private=True)
        write_atomically(tmp_path / "public", "hello\n", durable=True)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "secret").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "public").stat().st_mode) == 0o666


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text("kept\n")
    with pytest.raises(UnicodeEncodeError):
        write_atomically(target, "\udcff")  # not encodable as UTF-8
    assert target.read_text() == "kept\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
