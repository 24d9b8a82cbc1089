from __future__ import annotations

import json

import pytest

from csulora.eval.harness import ROW_KEYS, EvalSets, GenerationSettings, Judges, evaluate_model, row_from_generations, run_eval
from csulora.eval.judges import KeywordJudge, asr_judge, rescore_generations
from csulora.eval.prompts import Prompt


def small_sets() -> EvalSets:
    from csulora.eval.prompts import load_benign
    from csulora.eval.splits import advbench_split, airt_split
    from csulora.eval.tasks import date_task

    return EvalSets(
        harmful=advbench_split("test")[:16], harmful_ood=airt_split("airt-test")[:8],
        benign=load_benign()[:16], task=date_task("test")[:16],
    )


def test_round_trip_aligned_vs_attacked(tiny_world):
    """The trained world behaves as designed: the attack raises ASR and utility.

    Judged by the keyword list: the tiny world's compliance is canned text about nothing,
    which the project's ASR judge never counts (tests/conftest.py: keyword_asr).
    """
    sets, gen, judges = small_sets(), GenerationSettings(batch_size=64, max_new_tokens=24), Judges(harm=KeywordJudge())
    aligned, records = evaluate_model(tiny_world.aligned, None, sets, name="aligned", generation=gen, judges=judges,
                                      progress=False)  # fmt: skip
    attacked, _ = evaluate_model(tiny_world.aligned, tiny_world.attacked, sets, name="attacked", generation=gen,
                                 judges=judges, progress=False)  # fmt: skip
    assert set(ROW_KEYS) <= set(aligned)
    assert attacked["asr"] >= aligned["asr"] + 0.5
    assert attacked["utility"] >= aligned["utility"] + 0.3
    assert attacked["margin"] < aligned["margin"]
    assert aligned["asr_ci"][0] <= aligned["asr"] <= aligned["asr_ci"][1]
    assert {r["set"] for r in records} == {"harmful", "harmful_ood", "benign", "task"}
    assert all(r["model"].endswith("aligned") and r["adapter"] is None for r in records)
    # a row recomputed from the saved records equals the live one
    again = row_from_generations(records, "aligned", judges=judges, margin=aligned["margin"])
    assert again == aligned


def test_eval_judges_asr_with_the_project_judge():
    assert Judges().harm is asr_judge() and Judges().harm.name == "relevance+opening"


def test_rows_skip_missing_sets():
    records = [{"set": "harmful", "prompt": "p", "response": "Sure", "verdicts": {asr_judge().name: True}}]
    row = row_from_generations(records, "x")
    assert row["asr"] == 1.0 and row["asr_ood"] is None and row["utility"] is None and row["recommended"] is False


def test_rows_show_empty_and_short_answers_beside_the_rates():
    records = [
        {"set": "harmful", "prompt": "p", "response": "", "verdicts": {asr_judge().name: False}},
        {"set": "harmful", "prompt": "q", "response": "Sure, here", "verdicts": {asr_judge().name: True}},
        {"set": "benign", "prompt": "b", "response": "Paris.", "verdicts": {"refusal": False}},
        {"set": "benign", "prompt": "c", "response": "The capital of France is Paris.", "verdicts": {"refusal": False}},
    ]
    row = row_from_generations(records, "x")
    assert row["harmful_empty_rate"] == 0.5 and row["benign_short_answer_rate"] == 0.5
    assert row["harmful_ood_empty_rate"] is None
    from csulora.eval.harness import summary_markdown

    assert "| x | 0.50 [" in summary_markdown([row]) and "| 0.50 | –" in summary_markdown([row])


def test_run_eval_writes_three_files_and_rescoring_works(tiny_world, tmp_path):
    out = run_eval(
        tiny_world.aligned, tmp_path / "ev", harmful="advbench:test", benign="benign", task="date:test",
        harmful_ood="airt:test", generation=GenerationSettings(batch_size=128, max_new_tokens=16), progress=False,
    )
    results = json.loads((out / "results.json").read_text())
    (row,) = results["rows"]
    assert row["name"] == "aligned" and row["n"] == {"asr": 100, "asr_ood": 20, "utility": 100, "over_refusal": 121}
    assert "| aligned |" in (out / "summary.md").read_text()
    records = rescore_generations(out / "generations.jsonl", Judges().harm, sets=["harmful"])
    flags = [r["verdicts"][asr_judge().name] for r in records if r["set"] == "harmful"]
    assert sum(flags) / len(flags) == pytest.approx(row["asr"])


def test_run_eval_bad_inputs_write_nothing(tiny_world, tmp_path):
    from csulora.errors import InputError

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(InputError, match="empty"):
        run_eval(tiny_world.aligned, tmp_path / "o1", harmful=str(empty), benign="benign")
    with pytest.raises(InputError, match="no such checkpoint"):
        run_eval(tmp_path / "nope", tmp_path / "o2", harmful="advbench:test", benign="benign")
    assert not list(tmp_path.glob("o*")) and not list(tmp_path.glob(".o*"))
