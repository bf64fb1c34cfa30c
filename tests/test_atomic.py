import os

import pytest

from liveditor.atomic import atomic_directory, atomic_output, old_copy, write_json


def test_atomic_output_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as handle:
            handle.write(b"half")
            raise RuntimeError("writer failed")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]  # no temporary left behind
    with atomic_output(target) as handle:
        handle.write(b"new")
    assert target.read_bytes() == b"new"


def test_write_json_creates_the_folder(tmp_path):
    write_json(tmp_path / "a" / "b.json", {"x": 1})
    assert (tmp_path / "a" / "b.json").read_text() == '{\n  "x": 1\n}\n'


def test_atomic_directory_publishes_only_a_finished_folder(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("interrupted")
    assert not target.exists() and list(tmp_path.iterdir()) == []

    previous = os.umask(0o022)
    try:
        with atomic_directory(target) as tmp:
            (tmp / "weights").write_text("v1")
    finally:
        os.umask(previous)
    assert (target / "weights").read_text() == "v1"
    assert os.stat(target).st_mode & 0o777 == 0o755  # ordinary permissions, not mkdtemp's private 0700


def test_atomic_directory_refuses_or_replaces_an_existing_folder(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_directory(target) as tmp:
            (tmp / "weights").write_text("v2")
    assert (target / "weights").read_text() == "v1"

    with pytest.raises(RuntimeError):
        with atomic_directory(target, replace=True) as tmp:
            (tmp / "weights").write_text("v2-half")
            raise RuntimeError("interrupted")
    assert (target / "weights").read_text() == "v1"  # a failed replacement leaves the old folder

    with atomic_directory(target, replace=True) as tmp:
        (tmp / "weights").write_text("v2")
    assert (target / "weights").read_text() == "v2"
    assert not old_copy(target).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
