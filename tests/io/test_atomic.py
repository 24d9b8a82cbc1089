import os
from pathlib import Path

import pytest

from csulora.errors import InputError
from csulora.io.atomic import atomic_output_dir, atomic_output_file, check_output_dir, check_output_file
from tests.output_modes import assert_usual_modes, umask  # noqa: F401


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


def _private_safetensors(path: Path) -> None:
    """safetensors writes its files 0600 whatever the umask: the case the modes fix is for."""
    import torch
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(path))


def test_output_dir_gets_usual_modes_for_every_file_and_folder(tmp_path, umask):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        _private_safetensors(tmp / "adapter_model.safetensors")
        (tmp / "nested").mkdir(mode=0o700)
        (tmp / "nested" / "r.json").write_text("{}")
        (tmp / "nested" / "r.json").chmod(0o600)
    assert_usual_modes(out, umask)


def test_forced_output_dir_gets_usual_modes(tmp_path, umask):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    with atomic_output_dir(out, force=True) as tmp:
        _private_safetensors(tmp / "w.safetensors")
    assert sorted(p.name for p in out.iterdir()) == ["w.safetensors"]
    assert_usual_modes(out, umask)


def test_output_file_written_by_a_private_writer_gets_usual_mode(tmp_path, umask):
    target = tmp_path / "subspace.safetensors"
    with atomic_output_file(target) as tmp:
        _private_safetensors(tmp)
    assert_usual_modes(target, umask)


def test_overwriting_a_0644_file_keeps_the_usual_mode(tmp_path):
    import os

    target = tmp_path / "subspace.safetensors"
    target.write_text("old")
    target.chmod(0o644)
    previous = os.umask(0o022)
    try:
        check_output_file(target, force=True)
        with atomic_output_file(target) as tmp:
            _private_safetensors(tmp)
    finally:
        os.umask(previous)
    assert target.stat().st_mode & 0o777 == 0o644


def test_existing_output_file_needs_force(tmp_path):
    target = tmp_path / "audit.json"
    assert check_output_file(target) == target  # absent: fine
    target.write_text("old")
    with pytest.raises(InputError, match=r"--json .*audit.json: file exists \(use --force to replace it\)"):
        check_output_file(target, flag="--json")
    assert check_output_file(target, force=True) == target
    with pytest.raises(InputError, match="is a folder"):
        check_output_file(tmp_path, force=True)
    assert target.read_text() == "old"


# -- outputs that cannot be written are refused before any work (issue 23) ---------------------
def _refused(check, path, match):
    with pytest.raises(InputError, match=match) as info:
        check(path)
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("check", [check_output_dir, check_output_file], ids=["dir", "file"])
def test_an_output_whose_parent_is_a_file_is_refused(tmp_path, check):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("x")
    _refused(check, blocker / "out", rf"{blocker}/out: cannot be written: {blocker} is not a folder")
    _refused(check, blocker / "deeper" / "out", rf"cannot be written: {blocker} is not a folder")
    assert blocker.read_text() == "x" and _leftovers(tmp_path) == []


@pytest.mark.parametrize("check", [check_output_dir, check_output_file], ids=["dir", "file"])
def test_an_output_under_proc_is_refused(check):
    message = _refused(check, Path("/proc/csulora-out/result"), r"/proc/csulora-out/result: cannot be written")
    assert "/proc" in message


@pytest.mark.parametrize("check", [check_output_dir, check_output_file], ids=["dir", "file"])
def test_a_read_only_folder_is_refused_with_the_reason(tmp_path, check, monkeypatch):
    """The probe's OSError (a read-only mount here) becomes one line naming the path and the reason."""
    import errno
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    _refused(check, tmp_path / "out", rf"{tmp_path}/out: cannot be written: cannot create anything in {tmp_path} "
             r"\(Read-only file system\)")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
@pytest.mark.parametrize("check", [check_output_dir, check_output_file], ids=["dir", "file"])
def test_a_folder_without_write_permission_is_refused(tmp_path, check):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        _refused(check, locked / "sub" / "out", r"cannot be written: cannot create anything in .*locked \(Permission denied\)")
    finally:
        locked.chmod(0o755)


def test_a_writable_output_leaves_no_probe_and_creates_no_parent(tmp_path):
    assert check_output_dir(tmp_path / "a" / "b" / "out") == tmp_path / "a" / "b" / "out"
    assert check_output_file(tmp_path / "c" / "r.json") == tmp_path / "c" / "r.json"
    assert list(tmp_path.iterdir()) == []


def test_the_writers_refuse_an_unwritable_output_before_their_body_runs(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    ran = []
    with pytest.raises(InputError, match="is not a folder"):
        with atomic_output_dir(blocker / "out"):
            ran.append(True)
    assert ran == []
