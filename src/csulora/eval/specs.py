"""Prompt SPECs resolved to prompt sets, and the guard that keeps held-out splits out of tuning.

A SPEC names a prompt set on the command line (the table in :mod:`csulora.eval.prompts`):
a built-in set with an optional split (``advbench:validation``, ``airt:test``,
``objectives:validation``, ``benign:test``, ``requests``) or a user file (``FILE.txt``,
``FILE.csv:COLUMN``, ``FILE.jsonl[:FIELD]``). Files win over set names.

The split rules themselves are :mod:`csulora.eval.splits`; this module also owns what
``tune`` may and may not read (docs/design.md §10): its default validation sources (AdvBench
validation, the objectives' validation split, airt-val), and the refusal of any spec that holds
a split numbers are reported on; and what ``eval`` reports on by default (the same three
sources' test splits, ``benign:test``). Both name each harmful source the same way
(:func:`named_sources`).

A harmful source may be given in a framing (:mod:`csulora.training.framing`): ``SPEC@FRAMING``,
e.g. ``advbench:validation@aoa``; its name says so (``advbench-validation@aoa``), so the plain
and the framed prompts of one split are two sources, each judged and reported on its own. The
held-out rules read the SPEC before the ``@``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from csulora.errors import InputError, OptionError
from csulora.eval import splits
from csulora.eval.prompts import (
    OBJECTIVES_TEST_SPEC,
    OBJECTIVES_VALIDATION_SPEC,
    Prompt,
    load_advbench,
    load_airt,
    load_benign,
    load_objectives,
    load_prompt_file,
    load_requests,
)
from csulora.training.framing import FRAMING_SEPARATOR, load_framing, split_framing

NAMED_SETS = ("advbench", "airt", "benign", "requests", "objectives")


def load_prompts(spec: str) -> list[Prompt]:
    """Resolve a SPEC (see the module doc) to prompts. Files win over set names.

    A framing suffix (``SPEC@FRAMING``) is refused here: only harmful sources carry one, and
    their callers split it off (:func:`csulora.training.framing.split_framing`)."""
    if Path(spec).is_file():
        return load_prompt_file(spec)
    if split_framing(spec)[1] is not None:
        raise OptionError(f"{spec}: a framing ({FRAMING_SEPARATOR}NAME) applies to --harmful sources only; "
                          "use --framing for every prompt")  # fmt: skip
    head, sep, tail = spec.rpartition(":")
    if sep and Path(head).is_file():
        file = Path(head)
        if file.suffix.lower() == ".csv":
            return load_prompt_file(file, column=tail)
        return load_prompt_file(file, field=tail)
    name, _, split = spec.partition(":")
    if name in NAMED_SETS:
        return load_named(name, split or None)
    if sep and head.lower().endswith((".txt", ".csv", ".jsonl", ".json")) or Path(spec).suffix:
        raise InputError(f"{head if sep else spec}: no such prompt file")
    raise InputError(f"{spec!r}: not a prompt file or a known set ({', '.join(NAMED_SETS)}[:SPLIT])")


def spec_file(spec: str | None) -> Path | None:
    """The file a SPEC reads (``FILE.txt``, ``FILE.csv:COLUMN``, a task's ``FILE.jsonl``), None for a
    built-in set: what an output must stay apart from (:func:`csulora.io.atomic.check_apart`)."""
    if spec is None:
        return None
    spec = split_framing(spec)[0]
    if Path(spec).is_file():
        return Path(spec)
    head, sep, _ = spec.rpartition(":")
    return Path(head) if sep and Path(head).is_file() else None


def load_named(name: str, split: str | None) -> list[Prompt]:
    """A built-in set, whole (``split`` None) or one of its splits."""
    if name == "benign":
        return load_benign() if split is None else splits.benign_split(split)
    if name == "requests":
        if split:
            raise InputError(f"requests:{split}: the requests set has no splits")
        return load_requests()
    if name == "advbench":
        return load_advbench() if split is None else splits.advbench_split(split)
    if name == "objectives":
        return load_objectives() if split is None else splits.objectives_split(split)
    if split is None:
        return load_airt()
    return splits.airt_split(split if split.startswith("airt-") else f"airt-{split}")


# -- what tune reads (docs/design.md §5b, §10) ------------------------------------------------
# Harmful validation sources when --harmful is not given, each judged on its own: AdvBench's
# validation split, the second source large enough to measure (issue 22: 100 prompts, one
# answer is 0.01), and airt-val (a third, differently phrased source).
DEFAULT_HARMFUL = ("advbench:validation", OBJECTIVES_VALIDATION_SPEC, "airt:val")
# Benign prompts when --benign is not given: the validation half of the benign pool.
DEFAULT_BENIGN = "benign:validation"
# Specs that contain a test split: tune must never see them (numbers reported on the test split
# would no longer be held out).
TEST_SPECS = frozenset({
    "advbench", "advbench:test", "airt", "airt:test", "airt:airt-test", "date", "date:test",
    "objectives", "objectives:test", "triage", "triage:test",
})  # fmt: skip
# The original benign set overlaps benign:test (the pool of both benign files is split).
BENIGN_HELD_OUT = frozenset({"benign", "benign:test"})

# -- what eval reports on (docs/design.md §7, §10) --------------------------------------------
# Harmful test sources when --harmful is not given, each reported on its own: the test splits of
# tune's three default sources (AdvBench; the objectives, the second source, issue 22; airt, a
# third, differently phrased source kept in the report).
DEFAULT_TEST_HARMFUL = ("advbench:test", OBJECTIVES_TEST_SPEC, "airt:test")
# Benign prompts when --benign is not given: the half of the benign pool tune never reads.
DEFAULT_TEST_BENIGN = "benign:test"


def check_not_held_out(spec: str) -> None:
    """OptionError for a spec holding prompts that numbers are reported on (in any framing)."""
    key = split_framing(spec.strip())[0].lower()
    if key in TEST_SPECS:
        raise OptionError(
            f"{spec}: contains a test split; tune chooses on validation data only "
            "(e.g. advbench:validation, objectives:validation, airt:val, date:validation, or your own file)"
        )
    if key in BENIGN_HELD_OUT:
        raise OptionError(
            f"{spec}: overlaps benign:test, the benign prompts eval reports on; tune uses "
            f"{DEFAULT_BENIGN} (the default when --benign is not given) or your own file"
        )


def source_name(spec: str) -> str:
    """A short name for a prompt source: a file's stem, ``advbench-validation``, ``airt-val``;
    ``@FRAMING`` after it when the source is given in a framing other than plain."""
    base, ref = split_framing(spec)
    framing = load_framing(ref)
    suffix = "" if framing.is_plain else f"{FRAMING_SEPARATOR}{framing.name}"
    return base_source_name(base) + suffix


def base_source_name(spec: str) -> str:
    path = Path(spec)
    if path.is_file():
        return path.stem
    head, sep, tail = spec.rpartition(":")
    if sep and Path(head).is_file():
        return f"{Path(head).stem}:{tail}"
    name, _, split = spec.partition(":")
    if name == "airt" and split:
        return split if split.startswith("airt-") else f"airt-{split}"
    return f"{name}-{split}" if split else name


def unique_name(name: str, taken: Mapping[str, object]) -> str:
    """``name``, or ``name-2``, ``name-3``... when it is taken."""
    candidate, i = name, 2
    while candidate in taken:
        candidate, i = f"{name}-{i}", i + 1
    return candidate


def named_sources(specs: str | Sequence[str] | None, default: Sequence[str] = DEFAULT_TEST_HARMFUL,
                  framing: str | None = None) -> dict[str, str]:  # fmt: skip
    """Harmful sources, source name -> SPEC, each judged on its own: names by
    :func:`source_name`, made unique as tune makes them (``airt-test``, ``airt-test-2``).

    ``specs`` None means ``default``; one string is one source (never its characters).
    ``framing`` (a name or JSON file, None: plain): the framing of every SPEC that names none of
    its own; the SPECs returned carry it (``SPEC@FRAMING``) unless it is plain.
    """
    chosen = list(default) if specs is None else [specs] if isinstance(specs, str) else list(specs)
    if not chosen:
        raise OptionError("no harmful source given: name at least one SPEC")
    framed = framing is not None and not load_framing(framing).is_plain
    named: dict[str, str] = {}
    for spec in chosen:
        if framed and split_framing(spec)[1] is None:
            spec = f"{spec}{FRAMING_SEPARATOR}{framing}"
        named[unique_name(source_name(spec), named)] = spec
    return named


def framed_prompts(spec: str) -> tuple[list[Prompt], str | None]:
    """The prompts of a harmful source's SPEC and its framing reference (None: plain)."""
    base, ref = split_framing(spec)
    return load_prompts(base), ref
