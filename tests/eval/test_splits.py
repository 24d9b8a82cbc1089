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
