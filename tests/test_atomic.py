import os
import stat

import pytest

from facekd.errors import DataError
from facekd.io.atomic import atomic_directory, atomic_write_text


def test_atomic_write_replaces_whole_and_keeps_usual_permissions(tmp_path):
    path = tmp_path / "out.csv"
    atomic_write_text(path, "a\n")
    atomic_write_text(path, "b\n")
    assert path.read_text() == "b\n"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]


def test_atomic_write_failure_keeps_old_file(tmp_path):
    from facekd.io.atomic import atomic_write

    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as handle:
            handle.write("half")
            raise RuntimeError("killed")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_directory(tmp_path):
    out = tmp_path / "data"
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            (tmp / "a.txt").write_text("x")
            raise RuntimeError("killed")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("x")
    assert (out / "a.txt").read_text() == "x"
    with pytest.raises(DataError, match="not empty"):
        with atomic_directory(out):
            pass
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("y")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_atomic_directory_refuses_unusable_targets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x").write_text("keep")
    with pytest.raises(DataError, match="current folder"):
        with atomic_directory(".", overwrite=True):
            pass
    with pytest.raises(DataError, match="current folder"):
        with atomic_directory("..", overwrite=True):
            pass
    with pytest.raises(DataError, match="cannot create the output folder"):
        with atomic_directory(tmp_path / "x" / "out"):
            pass
    assert (tmp_path / "x").read_text() == "keep"


def test_data_error_survives_pickling():
    import pickle

    error = pickle.loads(pickle.dumps(DataError("a.png", "truncated PNG")))
    assert (error.path, error.reason, str(error)) == ("a.png", "truncated PNG", "a.png: truncated PNG")
