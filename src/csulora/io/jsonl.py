"""JSON Lines in and out: the one reader behind every JSONL the project takes or writes.

Errors name the file and line; blank lines are skipped; writes are atomic.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from csulora.errors import InputError
from csulora.io.atomic import atomic_output_file


def read_jsonl(path: str | Path, *, what: str = "JSONL file") -> list[tuple[int, dict]]:
    """``(line number, object)`` for every non-blank line; InputError naming file:line."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{file}: no such {what}")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise InputError(f"{file}: not UTF-8 text ({exc.reason})") from None
    records = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{file}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise InputError(f"{file}:{lineno}: expected a JSON object, got {type(record).__name__}")
        records.append((lineno, record))
    return records


def read_jsonl_records(path: str | Path, *, what: str = "JSONL file") -> list[dict]:
    """The objects of a JSONL file in order: ``read_jsonl`` without the line numbers."""
    return [record for _, record in read_jsonl(path, what=what)]


def write_jsonl(path: str | Path, records: Iterable[dict]) -> Path:
    """Write one JSON object a line (UTF-8, not ASCII-escaped), atomically."""
    with atomic_output_file(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    return Path(path)
