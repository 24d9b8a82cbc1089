"""``csulora.references.calibration.answers``: the aligned model's answers, generated once (issue 21).

A second calibration of the same aligned model with other task data generates nothing and
gives the same harmful statistics; anything the answers depend on changes the key; a corrupt
entry is generated again; the cache can be turned off or moved.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import csulora.references.calibration.answers as answers_module
from csulora.eval.tasks import date_task
from csulora.io.calibration_file import load_calibration
from csulora.references.calibration.answers import (
    ANSWERS_FORMAT,
    answer_cache_dir,
    default_answer_cache_dir,
)
from tests.references.calibration.helpers import run, write_pairs
from tests.references.calibration.test_passes import RecordingBar


def no_generation(*args, **kwargs):
    raise AssertionError("the answers were generated again")


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "answer-cache"


@pytest.fixture
def other_task(tmp_path) -> Path:
    return write_pairs(tmp_path / "other-task.jsonl", date_task("train")[50:60])


def entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.json"))


def test_a_second_calibration_with_other_task_data_generates_nothing(tiny_world, data, outs, cache, other_task,
                                                                     monkeypatch):  # fmt: skip
    first = run(tiny_world, outs / "first.safetensors", data, answer_cache=cache)
    assert not first.answers_read_back and first.run["answers"]["status"] == "written"
    [entry] = entries(cache)
    assert first.run["answers"]["file"] == str(entry) and first.run["answers"]["generated_tokens"] > 0
    monkeypatch.setattr(answers_module, "generate_answers", no_generation)
    second = run(tiny_world, outs / "second.safetensors", data, task=other_task, targets="q_proj,o_proj",
                 answer_cache=cache)  # fmt: skip
    assert second.answers_read_back and second.answers == first.answers
    assert second.run["answers"] == {"file": str(entry), "status": "read", "read_back": True, "generated_tokens": 0}
    a, b = load_calibration(first.path), load_calibration(second.path)
    assert a.info["harmful"] == b.info["harmful"]  # same prompts, same answers, same tokens
    for module in b.modules:
        assert torch.equal(a.module(module).harmful.matrix, b.module(module).harmful.matrix)
        assert not torch.equal(a.module(module).task.matrix, b.module(module).task.matrix)


# a framing too (issue 24): a framed calibration never reads a plain one's answers
@pytest.mark.parametrize("change", [{"max_new_tokens": 8}, {"batch_size": 3}, {"harmful": "fewer prompts"},
                                    {"framing": "aoa"}])  # fmt: skip
def test_what_the_answers_depend_on_is_in_the_key(tiny_world, data, outs, cache, change):
    if "harmful" in change:
        fewer = outs.parent / "fewer.txt"
        fewer.write_text("\n".join(data.harmful.read_text().splitlines()[:6]) + "\n")
        change = {"harmful": [str(fewer)]}
    run(tiny_world, outs / "first.safetensors", data, answer_cache=cache, targets="o_proj")
    again = run(tiny_world, outs / "second.safetensors", data, answer_cache=cache, targets="o_proj", **change)
    assert not again.answers_read_back and len(entries(cache)) == 2


def test_a_corrupt_entry_is_generated_again_and_replaced(tiny_world, data, outs, cache, capsys):
    first = run(tiny_world, outs / "first.safetensors", data, answer_cache=cache, targets="o_proj")
    [entry] = entries(cache)
    record = json.loads(entry.read_text())
    for damage in ('{"format": "csulora-calibration-answers", "ans', json.dumps({**record, "answers": record["answers"][:-1]}),
                   json.dumps({**record, "key": {**record["key"], "max_new_tokens": 99}}), "\x00\xff"):  # fmt: skip
        entry.write_text(damage)
        again = run(tiny_world, outs / "again.safetensors", data, answer_cache=cache, targets="o_proj", force=True,
                    progress=True)  # fmt: skip
        assert not again.answers_read_back and again.answers == first.answers
        assert "generating the answers again" in capsys.readouterr().err
        assert json.loads(entry.read_text()) == record  # replaced by a good entry
    assert again.path.read_bytes() == first.path.read_bytes()


def test_the_cache_can_be_turned_off(tiny_world, data, outs, cache, monkeypatch):
    monkeypatch.setenv("CSULORA_CACHE", str(cache.parent / "root"))
    result = run(tiny_world, outs / "c.safetensors", data, answer_cache=False, targets="o_proj")
    assert result.run["answers"]["status"] == "off" and not (cache.parent / "root").exists()


def test_an_unwritable_cache_does_not_stop_the_calibration(tiny_world, data, outs, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run(tiny_world, outs / "c.safetensors", data, answer_cache=blocker / "cache", targets="o_proj")
    assert result.run["answers"]["status"].startswith("not written")
    assert load_calibration(result.path).modules


def test_the_default_cache_lives_where_salora_keeps_its_feature_passes(monkeypatch, tmp_path):
    monkeypatch.setenv("CSULORA_CACHE", str(tmp_path / "root"))
    assert default_answer_cache_dir() == tmp_path / "root" / "calibration-answers"
    monkeypatch.delenv("CSULORA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_answer_cache_dir() == tmp_path / "xdg" / "csulora" / "calibration-answers"
    assert answer_cache_dir(True) == answer_cache_dir(None) == default_answer_cache_dir()
    assert answer_cache_dir(False) is None and answer_cache_dir(tmp_path) == tmp_path


def test_an_entry_says_what_it_holds(tiny_world, data, outs, cache, aligned_model):
    result = run(tiny_world, outs / "c.safetensors", data, answer_cache=cache, targets="o_proj")
    [entry] = entries(cache)
    record = json.loads(entry.read_text())
    assert record["format"] == ANSWERS_FORMAT and record["answers"] == result.answers
    key = record["key"]
    assert key["model"] == result.info["model_fingerprint"]["digest"]
    assert key["prompts_sha256"] == result.info["harmful"]["sha256"] and key["prompts"] == 12
    assert (key["max_new_tokens"], key["batch_size"], key["device"], key["dtype"]) == (16, 4, "cpu", "float32")
    assert {"csulora_version", "torch_version", "transformers_version"} <= key.keys()
    assert "framing" not in key  # a plain calibration keeps the key of runs before framings
    assert entry.name == f"{answers_module.AnswerKey(**key).digest()}.json"


def test_generation_runs_under_one_bar_in_tokens(aligned_model, data, monkeypatch):
    import tqdm.auto

    model, tokenizer = aligned_model
    texts = data.harmful.read_text().splitlines()
    RecordingBar.made = []
    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)
    answers, generated = answers_module.generate_with_bar(model, tokenizer, texts, batch_size=4, max_new_tokens=16,
                                                          progress=True)  # fmt: skip
    [bar] = RecordingBar.made
    assert bar.kwargs["unit"] == "tok" and sum(bar.updates) == generated > 0 and len(bar.updates) == 3
    assert bar.postfixes[-1] == "12/12 prompts"
    # Batch by batch, the answers of one generate_responses call.
    from csulora.eval.generation import generate_responses

    assert answers == generate_responses(model, tokenizer, texts, batch_size=4, max_new_tokens=16, progress=False)
