from pathlib import Path

import pytest

from csulora.errors import InputError
from csulora.io.atomic import atomic_output_dir, atomic_output_file


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_output_dir_appears_only_on_success(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "a.txt").write_text("x")
        assert not out.exists()
    assert (out / "a.txt").read_text() == "x"
    assert _leftovers(tmp_path) == []


def test_failure_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out) as tmp:
            (tmp / "a.txt").write_text("x")
            raise RuntimeError("interrupted")
    assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_existing_dir_needs_force_and_is_kept_on_refusal(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(InputError, match="--force"):
        with atomic_output_dir(out):
            pass
    assert (out / "old.txt").read_text() == "old"
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert _leftovers(tmp_path) == []


def test_failed_forced_run_keeps_old_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(ValueError):
        with atomic_output_dir(out, force=True):
            raise ValueError
    assert (out / "old.txt").read_text() == "old"


def test_empty_existing_dir_is_accepted(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with atomic_output_dir(out) as tmp:
        (tmp / "f").write_text("1")
    assert (out / "f").exists()


def test_atomic_file(tmp_path):
    target = tmp_path / "sub" / "r.json"
    with pytest.raises(KeyError):
        with atomic_output_file(target) as tmp:
            tmp.write_text("partial")
            raise KeyError
    assert not target.exists()
    with atomic_output_file(target) as tmp:
        tmp.write_text("{}")
    assert target.read_text() == "{}"
    assert _leftovers(target.parent) == []


def test_atomic_file_gets_the_usual_mode_not_a_private_one(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        with atomic_output_file(tmp_path / "r.json") as tmp:
            tmp.write_text("{}")
    finally:
        os.umask(umask)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644
