"""The atomic, durable file write: the old file or the new one, never a temp file left over."""

import pytest

from fedcybgd.files import write_atomic, write_atomic_with


def test_write_atomic_replaces_the_file(tmp_path):
    path = tmp_path / "a.json"
    write_atomic(path, "old")
    write_atomic(path, b"new")
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_write_failing_midway_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "a.json"
    write_atomic(path, "old")

    def half_then_fail(tmp):
        tmp.write_text("half of the ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic_with(path, half_then_fail)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
