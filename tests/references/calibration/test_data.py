"""``csulora.references.calibration.data``: which prompts and task data, refused before a model is
loaded: one line, nothing written (docs/design.md §5c)."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest

from csulora.errors import InputError, OptionError
from csulora.eval.splits import advbench_split, airt_split, benign_split
from csulora.eval.tasks import date_task
from csulora.references.calibration.data import harmful_prompts, input_files, task_pairs
from tests.references.calibration.helpers import assert_nothing_written, run, write_lines, write_pairs


@pytest.mark.parametrize(
    ("source", "where"),
    [
        (lambda: advbench_split("validation")[3], "advbench:validation"),
        (lambda: advbench_split("test")[0], "advbench:test"),
        (lambda: airt_split("airt-val")[0], "airt:val"),
        (lambda: airt_split("airt-test")[1], "airt:test"),
        (lambda: benign_split("validation")[-1], "benign(:validation)?"),
    ],
)
def test_harmful_prompts_that_are_scored_elsewhere_are_refused(tiny_world, data, outs, source, where):
    prompt = source()
    mixed = write_lines(outs.parent / "mixed.txt", [*data.harmful.read_text().splitlines()[:3], prompt.text.upper()])
    with pytest.raises(InputError, match=rf"mixed-4 .* is also in {where} as {prompt.id}") as info:
        run(tiny_world, outs / "calibration.safetensors", data, harmful=[str(mixed)])
    assert "\n" not in str(info.value)
    assert_nothing_written(outs)


def test_the_default_harmful_set_is_disjoint_from_every_scored_set():
    prompts = harmful_prompts(None)
    assert len(prompts) == 400 and {p.source for p in prompts} == {"advbench", "requests"}


@pytest.mark.parametrize("harmful", [None, ["requests"]])
def test_missing_pyrit_is_one_line(monkeypatch, tiny_world, data, outs, harmful):
    real = importlib.metadata.distribution

    def without_pyrit(name):
        if name == "pyrit":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", without_pyrit)
    expected = "default harmful prompts .* need pyrit" if harmful is None else "checking --harmful .* needs pyrit"
    with pytest.raises(InputError, match=rf"{expected}: run `pip install --no-deps pyrit==1\.1\.0`"):
        run(tiny_world, outs / "calibration.safetensors", data, harmful=harmful)
    assert_nothing_written(outs)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("date:validation", "--task date:validation: the split tune selects on; calibrate on the adapter's training"),
        ("date:test", "--task date:test: a test split"),
        ("date", "--task date: a test split"),
        ("date:later", "--task date:later: not a split"),
        ("triage:validation", "--task triage:validation: the split tune selects on; calibrate on the adapter's "
                              "training data (triage:train or its JSONL)"),
        ("triage", "--task triage: a test split"),
        ("advbench:validation", "--task advbench:validation: not task data"),
        ("requests", "--task requests: not task data"),
    ],
)
def test_task_specs_that_are_not_training_data_are_refused(tiny_world, data, outs, spec, message):
    with pytest.raises(InputError, match=re.escape(message)):
        run(tiny_world, outs / "calibration.safetensors", data, task=spec)
    assert_nothing_written(outs)


def test_a_task_file_holding_held_out_prompts_is_refused(tmp_path):
    leaked = write_pairs(tmp_path / "leak.jsonl", [*date_task("train")[:2], date_task("test")[5]])
    with pytest.raises(InputError, match=r"leak.jsonl: record 3 is a prompt of date:test"):
        task_pairs(leaked)
    assert len(task_pairs("date:train")) == 200


def test_the_triage_training_split_is_task_data_and_its_held_out_prompts_are_refused(tmp_path):
    from csulora.eval.triage import triage_task

    assert task_pairs("triage:train") == triage_task("train") and len(triage_task("train")) >= 600
    leaked = write_pairs(tmp_path / "leak.jsonl", [*triage_task("train")[:3], triage_task("validation")[7]])
    with pytest.raises(InputError, match=r"leak.jsonl: record 4 is a prompt of triage:validation"):
        task_pairs(leaked)


def test_a_task_line_without_prompt_or_response_names_file_and_line(tiny_world, data, outs):
    bad = outs.parent / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "no answer"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2: missing or non-string field 'response'"):
        run(tiny_world, outs / "calibration.safetensors", data, task=bad)
    bad.write_text('{"response": "no question"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:1: missing or non-string field 'prompt'"):
        run(tiny_world, outs / "calibration.safetensors", data, task=bad)
    assert_nothing_written(outs)


def test_bad_options_are_refused(tiny_world, data, outs):
    for options, message in (
        ({"max_new_tokens": 0}, "--max-new-tokens must be >= 1"),
        ({"batch_size": 0}, "--batch-size must be >= 1"),
        ({"memory_budget_gb": 0.0}, "--memory-budget must be > 0"),
        ({"harmful": []}, "--harmful needs at least one SPEC"),
    ):
        with pytest.raises(OptionError, match=re.escape(message)):
            run(tiny_world, outs / "calibration.safetensors", data, **options)
    assert_nothing_written(outs)


def test_the_input_files_are_the_task_file_and_the_harmful_files(tmp_path, data):
    """What an output may never be or lie inside: files, not the named sets."""
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"text": "x"}\n')
    files = input_files(data.task, [str(data.harmful), "requests", f"{jsonl}:text", "advbench:align"])
    assert files == {"--task": Path(data.task), "--harmful (1)": Path(data.harmful), "--harmful (3)": jsonl}
    assert input_files("date:train", None) == {}
