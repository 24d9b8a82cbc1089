"""Where ``calibrate`` writes: the statistics file and its run record (issue 23).

- **Checked before any work.** An existing output needs ``force``; an output may never be,
  contain or lie inside an input (``csulora.io.atomic.check_apart``); and the staging file is
  created beside the output first, so an output that cannot be written (a read-only folder,
  a parent that is a file, ``/proc/...``) is one line before the model is even loaded.
- **Byte-identical reruns.** The statistics file holds only what decides the statistics
  (docs/design.md §5c); what differs between identical runs -- seconds, the memory budget
  and the passes it gave, whether the answers were read from the cache, the machine -- goes
  to one record beside it, ``<output>.run.json`` (:func:`run_record_path`), the only file
  allowed to differ.
- **Nothing half-written.** The statistics are written into the staging file and renamed onto
  the output at the end; on any failure or interrupt the staging file (and any folder made for
  it) is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from csulora.errors import InputError
from csulora.io.atomic import apply_usual_modes, atomic_output_file, check_apart, check_output_file

RUN_RECORD_SUFFIX = ".run.json"
RUN_RECORD_FORMAT = "csulora-calibration-run"


def run_record_path(out: str | os.PathLike) -> Path:
    """``<output>.run.json``: the timings and machine facts of the run that wrote ``out``."""
    out = Path(out)
    return out.with_name(out.name + RUN_RECORD_SUFFIX)


@dataclass(frozen=True)
class OutputPaths:
    """The statistics file and its run record (None: not written)."""

    statistics: Path
    record: Path | None

    @classmethod
    def checked(cls, out_file: str | os.PathLike, record: bool, force: bool) -> OutputPaths:
        """Both refused when they exist (unless ``force``) or are folders."""
        statistics = check_output_file(out_file, force)
        path = run_record_path(statistics) if record else None
        if path is not None:
            check_output_file(path, force)
        return cls(statistics, path)

    def check_apart(self, inputs: Mapping[str, os.PathLike | str | None], answer_cache: Path | None = None) -> None:
        """No output -- the answer cache's folder included: it is written too -- may be, contain or
        lie inside an input."""
        outputs = {"-o/--output": self.statistics, "the run record": self.record, "--answer-cache": answer_cache}
        check_apart(outputs, inputs)


def missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, outermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing[::-1]


def create_staging(out: Path) -> tuple[Path, list[Path]]:
    """A new empty file beside ``out`` (made with the folders it needs) and those folders; one
    line naming ``out`` when it cannot be written there."""
    made = missing_folders(out.parent)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    except OSError as exc:
        remove_folders(made)
        raise InputError(
            f"-o/--output {out}: cannot write there ({exc.strerror or type(exc).__name__}); nothing was computed"
        ) from None
    os.close(fd)
    return Path(name), made


def remove_folders(folders: list[Path]) -> None:
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when still empty


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """Yield the staging file beside ``out``, created now; removed (with the folders made for it)
    unless :func:`publish` moved it onto ``out``."""
    staging, made = create_staging(out)
    try:
        yield staging
    except BaseException:
        staging.unlink(missing_ok=True)
        remove_folders(made)
        raise


def publish(staging: Path, paths: OutputPaths, record: Mapping[str, Any]) -> None:
    """Rename the written statistics onto the output, then write the run record beside it."""
    apply_usual_modes(staging)
    os.replace(staging, paths.statistics)
    if paths.record is not None:
        with atomic_output_file(paths.record) as tmp:
            tmp.write_text(json.dumps(dict(record), indent=2, sort_keys=True) + "\n", encoding="utf-8")
