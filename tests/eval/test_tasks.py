from __future__ import annotations

import pytest

from csulora.errors import InputError
from csulora.eval.tasks import DATE_SPLITS, date_task, date_task_splits, load_task


def test_date_task_items_are_correct_and_splits_disjoint():
    parts = date_task_splits()
    assert {k: len(v) for k, v in parts.items()} == DATE_SPLITS
    prompts = [i["prompt"] for v in parts.values() for i in v]
    assert len(set(prompts)) == len(prompts)
    item = {"prompt": "Convert the date March 7, 1984 to DD/MM/YYYY format. Reply with the date only.", "response": "07/03/1984"}
    from csulora.eval.tasks import date_answer, date_prompt
    import datetime as dt

    assert date_prompt(dt.date(1984, 3, 7)) == item["prompt"]
    assert date_answer(dt.date(1984, 3, 7)) == item["response"]
    assert date_task("test") == date_task_splits()["test"]


def test_load_task_from_jsonl_and_spec(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n')
    assert load_task(str(path))[0]["response"] == "b"
    assert len(load_task("date:validation")) == 100
    with pytest.raises(InputError):
        load_task("date:nope")
    assert [i["response"] for i in load_task("triage:test")] == [i["response"] for i in load_task("triage")]
    with pytest.raises(InputError, match=r"not a task JSONL file, 'date:SPLIT' or 'triage:SPLIT'"):
        load_task("dates:test")
