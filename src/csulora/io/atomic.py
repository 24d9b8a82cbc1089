"""Write outputs so that an interrupted run leaves nothing half-written.

Every output -- a folder (an adapter, an eval run) or a single file (a subspace cache, a
JSON report, a plot) -- follows one rule: it is written to a temporary path beside its
final name and renamed into place at the end, and an existing output is replaced only
with ``force``, and one that cannot be written (a read-only mount, a parent that is a file,
``/proc``) is refused in one line -- both checked by :func:`check_output_dir` /
:func:`check_output_file` before any heavy work.

Modes: ``mkdtemp``/``mkstemp`` make private temporaries (0700/0600), and some writers
(safetensors) create private files of their own. A finished output gets the mode any
ordinary tool would give it -- files ``0666 & ~umask``, folders ``0777 & ~umask`` -- set
on every file and folder under it just before the rename, so what appears is already final.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from csulora.errors import InputError

PathLike = str | os.PathLike


# -- modes ------------------------------------------------------------------------------------
def current_umask() -> int:
    """The process umask (read from /proc where possible: setting it, even briefly, races threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def apply_usual_modes(path: Path) -> None:
    """Give ``path`` and everything under it the modes of a plain ``open``/``mkdir``."""
    umask = current_umask()
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    if not path.is_dir():
        path.chmod(file_mode)
        return
    for root, dirs, files in os.walk(path):
        for name in files:
            file = Path(root) / name
            if not file.is_symlink():
                file.chmod(file_mode)
        for name in dirs:
            folder = Path(root) / name
            if not folder.is_symlink():
                folder.chmod(dir_mode)
    path.chmod(dir_mode)


# -- refusing to overwrite, proving the output can be created -----------------------------------
def check_output_dir(out_dir: str | os.PathLike, force: bool = False) -> Path:
    """Refuse an existing, non-empty OUTDIR unless ``force``, and one that cannot be created;
    call before any heavy work."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise InputError(f"{out}: output directory exists and is not empty (use --force to replace it)")
    check_creatable(out)
    return out


def check_output_file(path: str | os.PathLike, force: bool = False, *, flag: str | None = None) -> Path:
    """Refuse an existing output FILE unless ``force``, a folder always, and a file that cannot be
    created; call before any heavy work.

    ``flag`` names the option the path came from (``--json``), so the message says which.
    """
    out = Path(path)
    where = f"{flag} {out}" if flag else str(out)
    if out.is_dir():
        raise InputError(f"{where}: is a folder; give a file name")
    if out.exists() and not force:
        raise InputError(f"{where}: file exists (use --force to replace it)")
    check_creatable(out, flag=flag)
    return out


def check_creatable(out: Path, *, flag: str | None = None) -> None:
    """Prove ``out`` can appear: create (and remove) a probe where the writers will stage it.

    The atomic writers stage beside the output, in its parent (made with ``mkdir -p`` when
    missing), and rename at the end; a read-only mount, a parent that is a file, a path through
    a file or ``/proc`` would otherwise fail only then, after all the work, with an OSError
    traceback. The probe is made in the nearest folder that exists, as the writers' ``mkdir -p``
    would be: if a hidden folder can be created there, so can the missing parents.
    """
    where = f"{flag} {out}" if flag else str(out)
    ancestor = out.absolute().parent
    while not ancestor.exists() and not ancestor.is_symlink():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"{where}: cannot be written: {ancestor} is not a folder")
    try:
        probe = tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=ancestor)
    except OSError as exc:
        raise InputError(f"{where}: cannot be written: cannot create anything in {ancestor} ({exc.strerror or exc})") from None
    os.rmdir(probe)


# -- outputs never touch inputs ---------------------------------------------------------------
def check_apart(outputs: Mapping[str, PathLike | None], inputs: Mapping[str, PathLike | None]) -> None:
    """Refuse an output that is, contains, or lies inside an input -- ``--force`` or not.

    ``outputs`` and ``inputs`` map the flag a path came from (``-o/--output``, ``--aligned``) to
    the path (None: not given). Paths are compared as resolved real paths (symlinks followed; an
    output that does not exist yet resolves through its existing parents), so a symlink or a
    ``..`` cannot hide that ``-o A --force`` would replace the input adapter A, that
    ``-o ALIGNED/calib.safetensors`` would write into the aligned model, or that ``-o PARENT``
    would delete the input inside it.
    """
    for out_flag, out in outputs.items():
        if out is None:
            continue
        target = Path(out).resolve()
        for in_flag, given in inputs.items():
            if given is None:
                continue
            source = Path(given).resolve()
            if target == source:
                why = "is"
            elif source.is_relative_to(target):
                why = "contains"
            elif target.is_relative_to(source):
                why = "lies inside"
            else:
                continue
            raise InputError(
                f"{out_flag} {out} {why} the input {in_flag} {given}: an output may never be, contain or lie "
                "inside an input (nothing written); choose another output path"
            )


# -- writing ----------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``out_dir``; rename it into place on success.

    The temporary directory lives in the same parent so the final ``rename`` is atomic on
    one filesystem. On any exception it is removed and ``out_dir`` is left as it was.
    """
    out = check_output_dir(out_dir, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        apply_usual_modes(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        # --force: move the old directory aside first so the swap never leaves a gap
        # with neither the old nor the new output in place.
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


@contextlib.contextmanager
def atomic_output_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place on success.

    Overwrites ``path``: the caller decides whether that is allowed (:func:`check_output_file`
    at the edge, before any heavy work).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # After the writer: it may have replaced the temporary with a private file of its own.
        apply_usual_modes(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, final)
