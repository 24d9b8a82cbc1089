"""The lazy sweep (issue 21): it stops when the choice is decided, and decides exactly as the full sweep."""

from __future__ import annotations

import json

import pytest

from csulora.eval import judges
from csulora.eval.judges import KeywordJudge, asr_judge
from csulora.eval.metrics import Rate
from csulora.tuning.config import TuneConfig
from csulora.tuning.runner import GENERATIONS, tune_adapter
from csulora.tuning.scores import SettingScores
from csulora.tuning.verdicts import Rule


def tune(world, data, out, *, full_sweep: bool, grid=(1.0, 0.9, 0.6, 0.3, 0.0), gap: float = 0.35):
    # The tiny world repairs nothing short of deleting the update (scale 0, docs/design.md §8): the
    # weaker settings fail on their first harmful batch, the last one qualifies.
    config = TuneConfig(method="scale", grid=grid, max_new_tokens=16, max_utility_drop=1.0, max_asr_gap=gap,
                        max_fluency_loss=100.0, full_sweep=full_sweep)  # fmt: skip
    return tune_adapter(
        world.attacked, out, aligned=world.aligned, base=world.base, config=config,
        harmful=[str(data["advbench"]), str(data["airt"])], task=str(data["task"]), benign=str(data["benign"]),
        device="cpu", dtype="float32", progress=False,
    )  # fmt: skip


def verdicts(out, judge=None) -> dict[tuple[str, str, str], bool]:
    judge = judge or KeywordJudge()
    found = {}
    for line in (out / GENERATIONS).read_text().splitlines():
        r = json.loads(line)
        if r["set"].startswith("harmful:"):
            found[(r["state"], r["set"], r["prompt"])] = judge.judge([r["prompt"]], [r["response"]])[0]
    return found


def lazy_and_full(world, data, root):
    return (tune(world, data, root / "lazy", full_sweep=False),
            tune(world, data, root / "full", full_sweep=True))  # fmt: skip


@pytest.fixture(scope="module")
def both(tiny_world, tune_data, tmp_path_factory):
    # Judged by keywords (tests/conftest.py: keyword_asr): only there does the tiny attack show,
    # so that weaker settings are rejected and the lazy sweep has something to stop.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(judges, "ASR_JUDGE", KeywordJudge())
        return lazy_and_full(tiny_world, tune_data, tmp_path_factory.mktemp("sweeps"))


def test_under_the_project_judge_the_early_stop_changes_no_verdict(tiny_world, tune_data, tmp_path):
    """tune's own judge (asr_judge) stops answers at its own fixed verdicts: the same verdict
    for every prompt both runs answered, and every cut answer a fixed non-success."""
    judge = asr_judge()
    assert judge.name == "relevance+opening"
    lazy, full = lazy_and_full(tiny_world, tune_data, tmp_path)
    mine, theirs = verdicts(lazy.out_dir, judge), verdicts(full.out_dir, judge)
    shared = mine.keys() & theirs.keys()
    assert shared and {k: mine[k] for k in shared} == {k: theirs[k] for k in shared}
    assert (lazy.chosen_method, lazy.chosen_params) == (full.chosen_method, full.chosen_params)
    cut = [json.loads(line) for line in (lazy.out_dir / GENERATIONS).read_text().splitlines()]
    cut = [r for r in cut if r["truncated"]]
    assert cut and all(judge.verdict_fixed(r["prompt"], r["response"]) for r in cut)


def test_lazy_and_full_sweeps_agree_on_every_shared_prompt_and_on_the_pick(both):
    lazy, full = both
    shared = verdicts(lazy.out_dir).keys() & verdicts(full.out_dir).keys()
    assert shared, "both runs answered the aligned model's and the adapter's prompts"
    assert {k: verdicts(lazy.out_dir)[k] for k in shared} == {k: verdicts(full.out_dir)[k] for k in shared}
    assert lazy.record["choice"]["index"] is not None
    assert (lazy.chosen_method, lazy.chosen_params) == (full.chosen_method, full.chosen_params)
    # the chosen setting is scored completely in both, with identical scores
    chosen = [r for r in lazy.record["settings"] if r["chosen"]][0]
    twin = [r for r in full.record["settings"] if r["chosen"]][0]
    assert chosen["scores"] == twin["scores"]


def test_the_lazy_sweep_stops_at_the_first_qualifying_setting_and_says_what_it_skipped(tiny_world, tune_data, tmp_path):
    # With the ASR gap wide open the update itself (factor 1) qualifies: nothing stronger is scored.
    lazy = tune(tiny_world, tune_data, tmp_path / "lazy", full_sweep=False, grid=(1.0, 0.6, 0.0), gap=1.0)
    assert [r["value"] for r in lazy.record["settings"]] == [1.0]
    assert lazy.record["not_scored"] == [{"method": "scale", "value": 0.6}, {"method": "scale", "value": 0.0}]
    assert lazy.chosen_params == {"factor": 1.0}


def test_only_harmful_answers_are_truncated_and_only_when_not_full(both):
    lazy, full = both
    lines = [json.loads(line) for line in (lazy.out_dir / GENERATIONS).read_text().splitlines()]
    assert any(r["truncated"] for r in lines)
    assert all(r["set"].startswith("harmful:") for r in lines if r["truncated"])
    full_lines = [json.loads(line) for line in (full.out_dir / GENERATIONS).read_text().splitlines()]
    assert not any(r["truncated"] for r in full_lines)
    assert len(lines) < len(full_lines)  # the rejected settings stopped after their first harmful batch


def test_a_rejected_setting_reports_how_far_it_got(both):
    lazy, _ = both
    stopped = [r for r in lazy.record["settings"] if r["scores"].get("reached")]
    for row in stopped:
        verdict = row["verdict"]
        assert not verdict["qualifies"] and verdict["failed"]
        assert verdict["not_reached"] or verdict["decided_early"]
        for early in verdict["decided_early"]:
            assert 0 < early["prompts"] <= 12


def rate(value: float, n: int) -> Rate:
    return Rate(value, (value, value), n)


@pytest.mark.parametrize(("aligned", "gap", "n", "limit"), [
    (0.0, 0.05, 100, 5), (0.01, 0.05, 100, 6), (4 / 19, 0.05, 19, 5), (0.0, 0.0, 12, 1), (1.0, 0.05, 10, 10),
])
def test_the_count_limit_is_the_condition_itself(aligned, gap, n, limit):
    """The lazy scorer stops on counts: the largest count the rule still accepts, never off by one."""
    scores = SettingScores(asr={"s": rate(aligned, n)}, harmful_empty={"s": rate(0.0, n)})
    rule = Rule(scores, None, TuneConfig(method="scale", max_asr_gap=gap))
    asr_limit, _ = rule.harmful_limits("s")
    assert asr_limit == min(limit, n)
