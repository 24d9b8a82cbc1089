"""Deterministic, disjoint splits of the prompt sets, pinned by a manifest.

Order is decided by hashing ``seed|id|text`` with sha256, not by a PRNG, so the same
seed gives the same splits on every Python and platform. AdvBench is cut into
``align`` / ``attack`` / ``validation`` / ``test``; airt into ``airt-val`` / ``airt-test``
halves, stratified by file so every harm category appears on both sides; the benign pool
(both benign files, see :mod:`csulora.eval.prompts`) into ``validation`` (over-refusal
while tuning) and ``test`` (reported numbers) halves, the larger half going to test; the
second harmful source (``objectives``, the committed ``data/objectives.jsonl``) into
``validation`` (the first 100 of the hashed order: what tune scores) and ``test`` (the rest).

The manifest (counts, seed, sha256 of each split's ids and texts) was written once and
ships as ``eval/data/splits.json``; every load recomputes the split and checks it
against the manifest, so a changed pyrit file or split rule fails loudly instead of
silently mixing test prompts into training. The ``benign`` source was added to the
manifest later; a manifest written before that (a pipeline cache's copy) is still
checked on the sources it pins (the same holds for ``objectives``, added after ``benign``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from csulora.errors import InputError
from csulora.eval.prompts import DATA_DIR, Prompt, load_advbench, load_airt, load_benign_pool, load_objectives
from csulora.io.atomic import atomic_output_file

SPLIT_SEED = 0
# align: the aligned model's safety data; attack: the attacker's harmful data;
# validation: choosing knobs (tune); test: reported numbers only.
ADVBENCH_SPLITS: dict[str, int] = {"align": 200, "attack": 120, "validation": 100, "test": 100}
AIRT_SPLITS = ("airt-val", "airt-test")
BENIGN_SPLITS = ("validation", "test")
OBJECTIVES_SPLITS = ("validation", "test")
# At most 100 on validation (each prompt is scored at every grid value tune tries); the
# rest, at least 150, on test (docs/second_source.md).
OBJECTIVES_VALIDATION_SIZE = 100
MANIFEST_FILE = DATA_DIR / "splits.json"


def _order_key(seed: int, prompt: Prompt) -> str:
    return hashlib.sha256(f"{seed}|{prompt.id}|{prompt.text}".encode()).hexdigest()


def shuffled(prompts: Sequence[Prompt], seed: int) -> list[Prompt]:
    """A seed-determined permutation, identical on every platform."""
    return sorted(prompts, key=lambda p: _order_key(seed, p))


def split_prompts(prompts: Sequence[Prompt], sizes: dict[str, int], seed: int) -> dict[str, list[Prompt]]:
    """Cut a seeded permutation into consecutive, disjoint parts of the given sizes."""
    if sum(sizes.values()) > len(prompts):
        raise InputError(f"split sizes {sizes} need {sum(sizes.values())} prompts, only {len(prompts)} given")
    order = shuffled(prompts, seed)
    out, start = {}, 0
    for name, size in sizes.items():
        out[name] = [replace(p, split=name) for p in order[start : start + size]]
        start += size
    return out


def stratified_halves(prompts: Sequence[Prompt], names: tuple[str, str], seed: int) -> dict[str, list[Prompt]]:
    """Split each category in two; odd categories give their extra prompt alternately.

    Alternating the odd one out (second half first) keeps the two halves within one
    prompt of each other overall, with the larger half going to the second name (test).
    """
    first, second = names
    out: dict[str, list[Prompt]] = {first: [], second: []}
    categories = list(dict.fromkeys(p.category for p in prompts))
    extra_to_second = True
    for category in categories:
        group = shuffled([p for p in prompts if p.category == category], seed)
        n_first = len(group) // 2
        if len(group) % 2:
            n_first += 0 if extra_to_second else 1
            extra_to_second = not extra_to_second
        out[first] += [replace(p, split=first) for p in group[:n_first]]
        out[second] += [replace(p, split=second) for p in group[n_first:]]
    return out


def advbench_splits(seed: int = SPLIT_SEED, sizes: dict[str, int] | None = None) -> dict[str, list[Prompt]]:
    return split_prompts(load_advbench(), sizes or ADVBENCH_SPLITS, seed)


def airt_splits(seed: int = SPLIT_SEED) -> dict[str, list[Prompt]]:
    return stratified_halves(load_airt(), AIRT_SPLITS, seed)


def benign_splits(seed: int = SPLIT_SEED) -> dict[str, list[Prompt]]:
    """The benign pool in two halves of a seeded order (test gets the odd prompt)."""
    pool = load_benign_pool()
    first, second = BENIGN_SPLITS
    return split_prompts(pool, {first: len(pool) // 2, second: len(pool) - len(pool) // 2}, seed)


def objectives_splits(seed: int = SPLIT_SEED) -> dict[str, list[Prompt]]:
    """The second harmful source cut once: the first 100 of a seeded order validate, the rest test."""
    return cut_objectives(load_objectives(), seed)


def cut_objectives(pool: Sequence[Prompt], seed: int = SPLIT_SEED) -> dict[str, list[Prompt]]:
    """The objectives split rule on any pool (the build script reports its counts with it)."""
    first, second = OBJECTIVES_SPLITS
    return split_prompts(
        pool, {first: OBJECTIVES_VALIDATION_SIZE, second: len(pool) - OBJECTIVES_VALIDATION_SIZE}, seed
    )


def split_hash(prompts: Sequence[Prompt]) -> str:
    """sha256 over the ids and texts, in split order."""
    digest = hashlib.sha256()
    for p in prompts:
        digest.update(f"{p.id}\t{p.text}\n".encode())
    return digest.hexdigest()


def build_manifest(seed: int = SPLIT_SEED) -> dict:
    parts = {
        "advbench": advbench_splits(seed),
        "airt": airt_splits(seed),
        "benign": benign_splits(seed),
        "objectives": objectives_splits(seed),
    }
    return {
        "seed": seed,
        "rule": "sha256(seed|id|text) order; airt stratified by file",
        "sources": {
            source: {name: {"count": len(ps), "sha256": split_hash(ps)} for name, ps in splits.items()}
            for source, splits in parts.items()
        },
    }


def write_manifest(path: str | Path = MANIFEST_FILE, seed: int = SPLIT_SEED) -> Path:
    """Write the manifest (once: the shipped one was made by this function)."""
    with atomic_output_file(path) as tmp:
        tmp.write_text(json.dumps(build_manifest(seed), indent=2) + "\n")
    return Path(path)


def ensure_manifest(path: str | Path, seed: int = SPLIT_SEED) -> dict:
    """Write the manifest at ``path`` if missing, else re-read it and check it still holds."""
    file = Path(path)
    if not file.exists():
        write_manifest(file, seed)
    manifest = read_manifest(file)
    expected = build_manifest(int(manifest.get("seed", seed)))
    pinned = manifest.get("sources") if isinstance(manifest.get("sources"), dict) else {}
    # A manifest written before a source was added pins only the sources it names.
    expected["sources"] = {k: v for k, v in expected["sources"].items() if k in pinned}
    if not pinned or manifest != expected:
        raise InputError(f"{file}: splits no longer match their manifest (pyrit data or split rule changed)")
    return manifest


def read_manifest(path: str | Path = MANIFEST_FILE) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: unreadable split manifest ({exc})") from None


def _checked(source: str, name: str, prompts: list[Prompt], seed: int) -> list[Prompt]:
    if seed != SPLIT_SEED or not MANIFEST_FILE.exists():
        return prompts
    entry = read_manifest(MANIFEST_FILE)["sources"].get(source, {}).get(name)
    if entry is not None and (entry["count"] != len(prompts) or entry["sha256"] != split_hash(prompts)):
        why = {
            "benign": "(eval/data/benign*.txt changed?)",
            "objectives": "(eval/data/objectives.jsonl changed? rebuild it only with a new manifest)",
        }.get(source, "(pyrit data changed?); reinstall with `pip install --no-deps pyrit==1.1.0`")
        raise InputError(f"{MANIFEST_FILE}: {source} split {name!r} does not match its manifest {why}")
    return prompts


def advbench_split(name: str, seed: int = SPLIT_SEED) -> list[Prompt]:
    """One AdvBench split, checked against the shipped manifest."""
    if name not in ADVBENCH_SPLITS:
        raise InputError(f"advbench:{name}: unknown split (choose from {', '.join(ADVBENCH_SPLITS)})")
    return _checked("advbench", name, advbench_splits(seed)[name], seed)


def airt_split(name: str, seed: int = SPLIT_SEED) -> list[Prompt]:
    """``airt-val`` or ``airt-test``, checked against the shipped manifest."""
    if name not in AIRT_SPLITS:
        raise InputError(f"{name}: unknown airt split (choose from airt:val, airt:test)")
    return _checked("airt", name, airt_splits(seed)[name], seed)


def benign_split(name: str, seed: int = SPLIT_SEED) -> list[Prompt]:
    """``validation`` or ``test`` half of the benign pool, checked against the shipped manifest."""
    if name not in BENIGN_SPLITS:
        raise InputError(f"benign:{name}: unknown split (choose from benign:validation, benign:test)")
    return _checked("benign", name, benign_splits(seed)[name], seed)


def objectives_split(name: str, seed: int = SPLIT_SEED) -> list[Prompt]:
    """``validation`` or ``test`` part of the second harmful source, checked against the shipped manifest."""
    if name not in OBJECTIVES_SPLITS:
        raise InputError(f"objectives:{name}: unknown split (choose from objectives:validation, objectives:test)")
    return _checked("objectives", name, objectives_splits(seed)[name], seed)
