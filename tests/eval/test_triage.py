"""The harm-triage task (issue 24): its messages, splits, specs, utility, and its distance from
every harmful prompt set the project calibrates, trains or evaluates on."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from csulora.errors import InputError
from csulora.eval import prompts
from csulora.eval.calibration_sets import calibration_harmful_prompts, check_disjoint, held_out_sets
from csulora.eval.overlap import OverlapIndex
from csulora.eval.prompts import Prompt, normalise_prompt
from csulora.eval.specs import check_not_held_out
from csulora.eval.splits import advbench_split
from csulora.eval.tasks import load_task
from csulora.eval.triage import (
    TRIAGE_LABELS,
    answer_label,
    held_out_quotas,
    label_match,
    load_triage_messages,
    triage_prompt,
    triage_splits,
    triage_task,
)

RESULT_FILE = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "triage_data.json"


def _messages() -> list[dict]:
    return load_triage_messages()


def test_the_messages_have_the_promised_shape():
    records = _messages()
    labels = Counter(r["label"] for r in records)
    assert len(records) >= 800
    assert TRIAGE_LABELS[0] == "none" and len(TRIAGE_LABELS) - 1 >= 10
    assert set(labels) == set(TRIAGE_LABELS)
    assert 0.27 <= labels["none"] / len(records) <= 0.33
    harm = [n for label, n in labels.items() if label != "none"]
    assert min(harm) >= 40 and max(harm) - min(harm) <= 5  # no category left thin
    assert [r["id"] for r in records] == [f"triage-{i:03d}" for i in range(len(records))]
    assert all(10 <= len(r["message"]) <= 300 for r in records)
    lengths = sorted(len(r["message"].split()) for r in records)
    assert lengths[0] <= 8 and lengths[-1] >= 30  # terse asks and long ones


def test_splits_have_their_sizes_keep_the_label_shares_and_are_deterministic():
    parts = triage_splits()
    assert list(parts) == ["train", "validation", "test"]
    assert len(parts["validation"]) == len(parts["test"]) == 100 and len(parts["train"]) >= 600
    total = Counter(r["label"] for r in _messages())
    for name in ("validation", "test"):
        got = Counter(item["response"] for item in parts[name])
        for label in TRIAGE_LABELS:
            assert abs(got[label] - 100 * total[label] / sum(total.values())) < 1, (name, label)
    assert triage_splits() == parts
    reseeded = triage_splits(seed=1)
    assert {k: len(v) for k, v in reseeded.items()} == {k: len(v) for k, v in parts.items()}
    assert [i["id"] for i in reseeded["test"]] != [i["id"] for i in parts["test"]]


def test_no_message_is_repeated_across_or_within_splits():
    parts = triage_splits()
    ids = [item["id"] for part in parts.values() for item in part]
    assert sorted(ids) == sorted(r["id"] for r in _messages())
    keys = [normalise_prompt(r["message"]) for r in _messages()]
    assert len(set(keys)) == len(keys)
    prompts_by_split = {name: {normalise_prompt(i["prompt"]) for i in part} for name, part in parts.items()}
    assert sum(len(s) for s in prompts_by_split.values()) == len(keys)


def test_items_are_the_instruction_then_the_message_and_the_label():
    record = _messages()[0]
    item = next(i for part in triage_splits().values() for i in part if i["id"] == record["id"])
    assert item == {"id": record["id"], "prompt": triage_prompt(record["message"]), "response": record["label"]}
    assert item["prompt"].endswith("User message: " + record["message"])
    assert ", ".join(TRIAGE_LABELS) in item["prompt"] and "Reply with the label only." in item["prompt"]


def test_specs_name_the_splits():
    assert load_task("triage:validation") == triage_task("validation") == triage_splits()["validation"]
    assert load_task("triage") == load_task("triage:test") == triage_splits()["test"]
    assert len(load_task("triage:train")) >= 600
    with pytest.raises(InputError, match=r"triage:val: unknown split \(choose from train, validation, test\)"):
        load_task("triage:val")
    for held_out in ("triage", "triage:test"):
        with pytest.raises(Exception, match="contains a test split"):
            check_not_held_out(held_out)
    check_not_held_out("triage:validation")


@pytest.mark.parametrize(
    ("answer", "label"),
    [
        ("weapons", "weapons"), ("  Weapons.\nThe message asks for a gun.", "weapons"), ("**fraud**", "fraud"),
        ("`self_harm`", "self_harm"), ("\n\nnone", "none"), ('"theft"', "theft"), ("", ""), ("  \n ", ""),
        ("The label is theft", "the"), ("violence, weapons", "violence"),
    ],
)  # fmt: skip
def test_answer_label_is_the_first_word_of_the_first_line(answer, label):
    assert answer_label(answer) == label


def test_label_match_is_exact_on_the_label():
    assert label_match("none.", "none") and label_match("Privacy\nbecause it tracks someone", "privacy")
    assert not label_match("weapons", "violence") and not label_match("self harm", "self_harm")
    assert not label_match("", "none") and not label_match("I can't help with that.", "none")


def test_held_out_quotas_are_proportional_and_sum_to_the_size():
    assert held_out_quotas({"a": 50, "b": 30, "c": 20}, 10) == {"a": 5, "b": 3, "c": 2}
    assert held_out_quotas({"a": 1, "b": 1, "c": 1}, 2) == {"a": 1, "b": 1, "c": 0}  # ties: first listed
    assert sum(held_out_quotas({"a": 7, "b": 5, "c": 3}, 11).values()) == 11
    with pytest.raises(InputError, match="a split of 4 needs more than the 3 triage messages"):
        held_out_quotas({"a": 3}, 4)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"id": "x", "message": "m"}', "no string field 'label'"),
        ('{"id": "x", "message": "m", "label": "arson"}', "label 'arson' is not one of none, violence"),
        ('{"id": "x", "message": "m", "label": "none"}\n' * 2, "duplicate id 'x'"),
        ("", "no messages found"),
    ],
)
def test_bad_triage_file(tmp_path, line, message):
    path = tmp_path / "triage.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(InputError, match=message):
        load_triage_messages(path)


def test_the_result_file_counts_the_committed_messages():
    counts = json.loads(RESULT_FILE.read_text())
    labels = Counter(r["label"] for r in _messages())
    assert counts["messages"] == len(_messages()) and counts["labels"] == {k: labels[k] for k in TRIAGE_LABELS}
    for name, part in triage_splits(seed=counts["split_seed"]).items():
        per_label = Counter(item["response"] for item in part)
        assert counts["splits"][name] == {"count": len(part), "labels": {k: per_label[k] for k in TRIAGE_LABELS}}


# -- disjointness (docs/design.md §10): the rule the second harmful source was built with -------


def _harmful_sets() -> dict[str, list[Prompt]]:
    """Every harmful prompt set calibration, the worlds' training and evaluation read, whole."""
    return {
        "calibration": calibration_harmful_prompts(),  # AdvBench align + requests
        "advbench": prompts.load_advbench(),
        "airt": prompts.load_airt(),
        "objectives": prompts.load_objectives(),
        "requests": prompts.load_requests(),
    }


def _other_sets() -> dict[str, list[Prompt]]:
    """The benign prompt sets (eval's over-refusal pool, the SmolLM2 world's alignment pool) and
    the date task (the first world's task, all splits)."""
    from csulora.eval.tasks import date_task_splits
    from csulora.worlds.smol import benign_prompt_pool

    smol = [Prompt(f"smol-{i}", text, "smol") for i, text in enumerate(benign_prompt_pool())]
    dates = [Prompt(i["id"], i["prompt"], "date") for part in date_task_splits().values() for i in part]
    return {"benign": prompts.load_benign_pool(), "smol-benign": smol, "date": dates}


@pytest.mark.parametrize("name", [
    "calibration", "advbench", "airt", "objectives", "requests", "benign", "smol-benign", "date",
])
def test_no_triage_message_repeats_another_set_exactly_or_nearly(name):
    others = (_harmful_sets() | _other_sets())[name]
    assert len(others) >= 39
    index = OverlapIndex(others)
    exact = {normalise_prompt(p.text) for p in others}
    for record in _messages():
        assert normalise_prompt(record["message"]) not in exact, record["id"]
        assert index.first_match(record["message"]) is None, (record["id"], index.first_match(record["message"]))


def test_every_harmful_split_lies_in_a_set_checked_whole():
    """The splits (align, attack, validation, test; airt-val/test; objectives validation/test) are
    parts of the sets above, so no triage message is near any of them either."""
    whole = {normalise_prompt(p.text) for prompts_ in _harmful_sets().values() for p in prompts_}
    splits = dict(held_out_sets(), **{f"advbench:{s}": advbench_split(s) for s in ("align", "attack")})
    harmful_splits = {name: ps for name, ps in splits.items() if not name.startswith("benign")}
    assert len(harmful_splits) == 8
    assert all(normalise_prompt(p.text) in whole for ps in harmful_splits.values() for p in ps)


def test_no_triage_prompt_is_an_evaluation_or_calibration_prompt():
    """The task prompts themselves (instruction + message), by normalised text, as calibrate checks."""
    items = [Prompt(i["id"], i["prompt"], "triage") for part in triage_splits().values() for i in part]
    splits = dict(held_out_sets(), **{f"advbench:{s}": advbench_split(s) for s in ("align", "attack")})
    check_disjoint(items, splits | {"calibration": calibration_harmful_prompts()})
