"""difftune._atomic.atomic_write: all or nothing, and the mode a plain write would give."""

from __future__ import annotations

import os
import stat

import pytest

from difftune._atomic import atomic_write


def test_a_new_file_gets_the_umask_mode_and_a_replaced_one_keeps_its_own(tmp_path):
    umask = os.umask(0o022)
    try:
        fresh = atomic_write(tmp_path / "p.json", lambda tmp: tmp.write_text("{}"))
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o644  # readable by a server running as another user
        fresh.chmod(0o640)
        atomic_write(fresh, lambda tmp: tmp.write_text("[]"))
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o640 and fresh.read_text() == "[]"
    finally:
        os.umask(umask)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "p.json"
    target.write_text("old")

    def broken(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]
