from __future__ import annotations

import json

import pytest

from csulora.errors import InputError
from csulora.eval import splits
from csulora.eval.prompts import load_advbench


def test_advbench_splits_are_disjoint_cover_and_deterministic():
    parts = splits.advbench_splits()
    ids = [p.id for ps in parts.values() for p in ps]
    assert len(ids) == len(set(ids)) == 520
    assert {k: len(v) for k, v in parts.items()} == splits.ADVBENCH_SPLITS
    assert [p.id for p in splits.advbench_splits()["test"]] == [p.id for p in parts["test"]]
    assert all(p.split == "test" for p in parts["test"])


def test_another_seed_gives_another_split():
    assert [p.id for p in splits.advbench_splits(seed=1)["test"]] != [p.id for p in splits.advbench_splits()["test"]]


def test_airt_halves_are_stratified_by_file():
    parts = splits.airt_splits()
    val, test = parts["airt-val"], parts["airt-test"]
    assert len(val) + len(test) == 39 and abs(len(val) - len(test)) <= 1
    assert not {p.id for p in val} & {p.id for p in test}
    for category in {p.category for p in val + test}:
        n_val = sum(p.category == category for p in val)
        n_test = sum(p.category == category for p in test)
        assert abs(n_val - n_test) <= 1 and n_val >= 1 and n_test >= 1


def test_shipped_manifest_matches_the_splits():
    manifest = splits.read_manifest()
    assert manifest == splits.build_manifest(manifest["seed"])
    assert manifest["sources"]["advbench"]["test"]["count"] == 100


def test_manifest_is_written_once_and_rechecked(tmp_path):
    path = tmp_path / "splits.json"
    first = splits.ensure_manifest(path)
    assert splits.ensure_manifest(path) == first
    tampered = json.loads(path.read_text())
    tampered["sources"]["advbench"]["test"]["sha256"] = "0" * 64
    path.write_text(json.dumps(tampered))
    with pytest.raises(InputError, match="no longer match"):
        splits.ensure_manifest(path)


def test_split_order_does_not_depend_on_input_order():
    goals = load_advbench()
    a = splits.split_prompts(goals, {"x": 10}, seed=3)["x"]
    b = splits.split_prompts(list(reversed(goals)), {"x": 10}, seed=3)["x"]
    assert [p.id for p in a] == [p.id for p in b]


# --------------------------------------------------------------------------- benign halves

# The shipped AdvBench/airt entries, as first written: adding the benign source must not move them.
PINNED = {
    ("advbench", "align"): (200, "dca07e47c46a7b1fb29eeaa78765b319491d61357f2a28deda1093dd1b722896"),
    ("advbench", "attack"): (120, "69d09abb02b40a9a104ca34bfe66bc8bade4b2bee897879388aedfd68598e81d"),
    ("advbench", "validation"): (100, "577d8411c5107c38be9d165affba5083abd3435f3cab796ce19f833f3423cb39"),
    ("advbench", "test"): (100, "7a42a3f1615ba9e4ba6dd189e3934a88a55d2c8a253745984a78f35061f811af"),
    ("airt", "airt-val"): (19, "a65d877af68fc2547bcfb58e398ca5b31cf6b5f853f81682f38d5ae35fdf9fad"),
    ("airt", "airt-test"): (20, "4b4a700adadf13817fc368e5096513b4c1582accd2042b8bad79b862b9443957"),
}


def test_harmful_manifest_entries_are_unchanged():
    sources = splits.read_manifest()["sources"]
    assert list(sources) == ["advbench", "airt", "benign", "objectives"]
    for (source, name), (count, digest) in PINNED.items():
        assert sources[source][name] == {"count": count, "sha256": digest}
    assert list(sources["advbench"]) == list(splits.ADVBENCH_SPLITS)
    assert list(sources["airt"]) == list(splits.AIRT_SPLITS)


def test_benign_halves_are_disjoint_cover_the_pool_and_hold_100_each():
    from csulora.eval.prompts import load_benign, load_benign_pool, normalise_prompt

    parts = splits.benign_splits()
    val, test = parts["validation"], parts["test"]
    assert len(val) >= 100 and len(test) >= 100 and 0 <= len(test) - len(val) <= 1
    assert not {p.id for p in val} & {p.id for p in test}
    assert not {normalise_prompt(p.text) for p in val} & {normalise_prompt(p.text) for p in test}
    pool = load_benign_pool()
    assert sorted(p.id for p in val + test) == [p.id for p in pool]
    assert {(p.id, p.text) for p in val + test} == {(p.id, p.text) for p in pool}
    assert {p.split for p in val} == {"validation"} and {p.split for p in test} == {"test"}
    original = {p.id for p in load_benign()}  # both halves mix the original and the added prompts
    assert 30 <= len(original & {p.id for p in val}) <= len(val) - 30


def test_benign_spec_loads_the_checked_halves():
    from csulora.eval.specs import load_prompts

    assert load_prompts("benign:validation") == splits.benign_split("validation")
    assert splits.benign_split("validation") == splits.benign_splits()["validation"]
    assert load_prompts("benign:test") == splits.benign_split("test")
    manifest = splits.read_manifest()["sources"]["benign"]
    assert manifest["test"]["count"] == len(load_prompts("benign:test")) >= 100
    assert [p.id for p in splits.benign_splits(seed=1)["test"]] != [p.id for p in splits.benign_splits()["test"]]


def test_changed_benign_file_fails_against_the_manifest(monkeypatch):
    pool = splits.load_benign_pool()
    monkeypatch.setattr(splits, "load_benign_pool", lambda: pool[:-1])
    with pytest.raises(InputError, match=r"benign split 'test' does not match its manifest .*benign"):
        splits.benign_split("test")
    with pytest.raises(InputError, match="unknown split"):
        splits.benign_split("train")


def test_a_manifest_from_before_the_benign_source_is_still_checked(tmp_path):
    path = tmp_path / "old.json"
    old = splits.build_manifest()
    del old["sources"]["benign"]
    path.write_text(json.dumps(old))
    assert splits.ensure_manifest(path) == old  # a pipeline cache's copy keeps working
    old["sources"]["airt"]["airt-test"]["count"] = 21
    path.write_text(json.dumps(old))
    with pytest.raises(InputError, match="no longer match"):
        splits.ensure_manifest(path)
    path.write_text(json.dumps({**old, "sources": {}}))
    with pytest.raises(InputError, match="no longer match"):
        splits.ensure_manifest(path)


def test_tampered_or_unknown_benign_entries_fail(tmp_path):
    path = tmp_path / "splits.json"
    manifest = splits.ensure_manifest(path)
    assert "benign" in manifest["sources"]
    manifest["sources"]["benign"]["validation"]["count"] = 99
    path.write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="no longer match"):
        splits.ensure_manifest(path)
    fresh = splits.build_manifest()
    fresh["sources"]["extra"] = {}
    path.write_text(json.dumps(fresh))
    with pytest.raises(InputError, match="no longer match"):
        splits.ensure_manifest(path)


# --------------------------------------------------------------------------- the second harmful source

# Cut once (docs/second_source.md): these are the shipped entries, and they must never move.
OBJECTIVES_PINNED = {
    "validation": (100, "abcdeb59cadc7eb7612e73f2e72f94538c0b069aa15521bb8d310779a8a3714e"),
    "test": (171, "6d9d057098e95f2c6cf97cfdb3d3144f7e684d1d257570413bbf14d9884154a7"),
}


def test_objectives_split_once_into_100_validation_and_the_rest_test():
    from csulora.eval.prompts import load_objectives, normalise_prompt

    parts = splits.objectives_splits()
    val, test = parts["validation"], parts["test"]
    assert len(val) == splits.OBJECTIVES_VALIDATION_SIZE == 100 and len(test) >= 150
    pool = load_objectives()
    assert sorted(p.id for p in val + test) == [p.id for p in pool]
    assert not {normalise_prompt(p.text) for p in val} & {normalise_prompt(p.text) for p in test}
    assert {p.split for p in val} == {"validation"} and {p.split for p in test} == {"test"}
    # hashed, not file order; and every big category is on both sides
    assert [p.id for p in val] != sorted(p.id for p in val)
    assert [p.id for p in splits.objectives_splits()["validation"]] == [p.id for p in val]
    for category in ("violence", "self_harm", "privacy", "exploits", "hate_speech", "information_integrity"):
        assert sum(p.category == category for p in val) >= 5 and sum(p.category == category for p in test) >= 5
    entries = splits.read_manifest()["sources"]["objectives"]
    assert {name: (e["count"], e["sha256"]) for name, e in entries.items()} == OBJECTIVES_PINNED
    assert [p.id for p in splits.objectives_splits(seed=1)["test"]] != [p.id for p in test]


def test_changed_objectives_file_fails_against_the_manifest(monkeypatch):
    from dataclasses import replace

    pool = splits.load_objectives()
    first_test = splits.objectives_split("test")[0]
    monkeypatch.setattr(splits, "load_objectives", lambda: [p for p in pool if p.id != first_test.id])
    with pytest.raises(InputError, match=r"objectives split 'test' does not match its manifest .*objectives\.jsonl"):
        splits.objectives_split("test")
    monkeypatch.setattr(splits, "load_objectives", lambda: [replace(p, text=p.text + " now") for p in pool])
    for name in splits.OBJECTIVES_SPLITS:
        with pytest.raises(InputError, match=f"objectives split '{name}' does not match its manifest"):
            splits.objectives_split(name)
    with pytest.raises(InputError, match="unknown split"):
        splits.objectives_split("val")


def test_a_manifest_from_before_the_objectives_source_is_still_checked(tmp_path):
    path = tmp_path / "old.json"
    old = splits.build_manifest()
    del old["sources"]["objectives"]
    path.write_text(json.dumps(old))
    assert splits.ensure_manifest(path) == old
