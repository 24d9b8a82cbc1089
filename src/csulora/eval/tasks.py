"""The utility tasks: date-format conversion (generated from a template with a seed) and harm
triage (:mod:`csulora.eval.triage`, the second world's task), each addressed as ``NAME:SPLIT``.

"Convert the date March 7, 1984 to DD/MM/YYYY format. Reply with the date only." ->
"07/03/1984". The aligned SmolLM2 gets 0% exact match (it answers in prose or in US
order) and a small LoRA learns it to ~94% (pilot), so a >= 30-point gain has room.
Items are JSONL-shaped dicts ``{"id", "prompt", "response"}`` (docs/design.md §10); a user task
is a JSONL file of the same shape, scored by exact match of the generation with
``response``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

from csulora.errors import InputError
from csulora.eval.triage import triage_splits, triage_task

MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)
DATE_TEMPLATE = "Convert the date {month} {day}, {year} to DD/MM/YYYY format. Reply with the date only."
TASK_SEED = 0
FIRST_YEAR, LAST_YEAR = 1950, 2029
# Disjoint by date: train for the attacker/task adapter, validation for tune, test for reports.
DATE_SPLITS: dict[str, int] = {"train": 200, "validation": 100, "test": 100}
# The built-in tasks a SPEC may name (``NAME:SPLIT``); both have train / validation / test.
BUILTIN_TASKS = ("date", "triage")


def date_prompt(date: dt.date) -> str:
    return DATE_TEMPLATE.format(month=MONTHS[date.month - 1], day=date.day, year=date.year)


def date_answer(date: dt.date) -> str:
    return f"{date.day:02d}/{date.month:02d}/{date.year:04d}"


def _all_dates() -> list[dt.date]:
    start, end = dt.date(FIRST_YEAR, 1, 1), dt.date(LAST_YEAR, 12, 31)
    return [start + dt.timedelta(days=i) for i in range((end - start).days + 1)]


def date_task_splits(seed: int = TASK_SEED, sizes: dict[str, int] | None = None) -> dict[str, list[dict]]:
    """Disjoint train/validation/test items, ordered by sha256(seed|date): platform-stable."""
    sizes = sizes or DATE_SPLITS
    dates = sorted(_all_dates(), key=lambda d: hashlib.sha256(f"{seed}|{d.isoformat()}".encode()).hexdigest())
    out, start = {}, 0
    for name, size in sizes.items():
        out[name] = [
            {"id": f"date-{name}-{i:03d}", "prompt": date_prompt(d), "response": date_answer(d)}
            for i, d in enumerate(dates[start : start + size])
        ]
        start += size
    return out


def date_task(split: str, seed: int = TASK_SEED) -> list[dict]:
    if split not in DATE_SPLITS:
        raise InputError(f"date:{split}: unknown split (choose from {', '.join(DATE_SPLITS)})")
    return date_task_splits(seed)[split]


def task_splits(name: str) -> dict[str, list[dict]]:
    """Every split of a built-in task (``date``, ``triage``), by split name."""
    return {"date": date_task_splits, "triage": triage_splits}[name]()


def builtin_task(name: str, split: str) -> list[dict]:
    """One split of a built-in task; InputError for an unknown split."""
    return {"date": date_task, "triage": triage_task}[name](split)


def load_task(spec: str) -> list[dict]:
    """Task items from ``date:SPLIT``, ``triage:SPLIT`` or a JSONL file of {prompt, response}.
    A bare name is its test split."""
    if Path(spec).is_file() or Path(spec).suffix:
        from csulora.training.data import load_pairs

        pairs = load_pairs(spec)
        stem = Path(spec).stem
        return [{"id": f"{stem}-{i}", "prompt": p["prompt"], "response": p["response"]} for i, p in enumerate(pairs)]
    name, _, split = spec.partition(":")
    if name in BUILTIN_TASKS:
        return builtin_task(name, split or "test")
    raise InputError(f"{spec!r}: not a task JSONL file, 'date:SPLIT' or 'triage:SPLIT'")
