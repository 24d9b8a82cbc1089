"""``tune --score-cache``: every scored state is kept, so a rerun (or a killed run) generates nothing twice."""

from __future__ import annotations

import json

import pytest

import csulora.tuning.runner as runner_module
from csulora.eval.metrics import Rate
from csulora.tuning.config import TuneConfig
from csulora.tuning.runner import tune_adapter
from csulora.tuning.score_cache import ScoreCache, adapter_digest
from csulora.tuning.scoring import TuneData
from csulora.tuning.selection import SettingScores


def test_scores_survive_the_round_trip():
    scores = SettingScores(
        asr={"a": Rate(0.25, (0.0, 0.5), 12), "b": Rate(1.0, (1.0, 1.0), 3)},
        utility=Rate(0.5, (0.25, 0.75), 12), task_loglik=-1.5, over_refusal=None, margin=2.0,
        harmful_empty={"a": Rate(0.0, (0.0, 0.0), 12)}, benign_short=Rate(0.1, (0.0, 0.2), 10), benign_fluency=-2.25,
    )  # fmt: skip
    assert SettingScores.from_dict(json.loads(json.dumps(scores.to_dict()))) == scores


def run_tune(world, data, out, cache, **options):
    return tune_adapter(
        world.attacked, out, aligned=world.aligned, base=world.base,
        config=TuneConfig(method="scale", grid=(1.0, 0.5, 0.0), max_new_tokens=16, max_utility_drop=1.0),
        harmful=[str(data["advbench"]), str(data["airt"])], task=str(data["task"]), benign=str(data["benign"]),
        device="cpu", dtype="float32", progress=False, score_cache=cache, **options,
    )  # fmt: skip


def test_a_rerun_reads_every_state_back_and_decides_the_same(tiny_world, tune_data, tmp_path, monkeypatch):
    cache = tmp_path / "scores"
    first = run_tune(tiny_world, tune_data, tmp_path / "one", cache)
    # aligned, the adapter, and each generated setting (factor 1 is the adapter itself: not scored again)
    stored = sorted(cache.glob("*.json"))
    assert len(stored) == 2 + sum(1 for row in first.record["settings"] if not row["same_as_adapter"])

    def no_generation(*_args, **_kwargs):
        raise AssertionError("a cached state was generated again")

    monkeypatch.setattr(runner_module, "score_model", no_generation)
    second = run_tune(tiny_world, tune_data, tmp_path / "two", cache)
    assert second.record["settings"] == first.record["settings"]
    # tune.json says which scores were read back (their timing_s is the read, not the scoring)
    assert first.record["score_cache"]["read"] == []
    assert second.record["score_cache"]["read"] == [state for state in second.record["timing_s"] if state != "load_aligned"]
    assert "aligned" in second.record["score_cache"]["read"]
    assert second.record["aligned"] == first.record["aligned"] and second.record["choice"] == first.record["choice"]
    two = (tmp_path / "two" / runner_module.GENERATIONS).read_text()
    assert two == (tmp_path / "one" / runner_module.GENERATIONS).read_text()


def test_keys_change_with_what_the_scores_depend_on(tiny_world, tmp_path):
    data = TuneData(harmful={"a": ["How do I pick a lock?"]}, benign=["Name a colour."])
    generation = {"batch_size": 4, "max_new_tokens": 16, "seed": 0, "device": "cpu", "dtype": "float32"}
    cache = ScoreCache(tmp_path / "c", tiny_world.aligned, data, generation)
    assert cache.key(None) == ScoreCache(tmp_path / "c", tiny_world.aligned, data, generation).key(None)
    assert cache.key(None) != cache.key(tiny_world.attacked)
    other_data = TuneData(harmful={"a": ["How do I pick a lock?"]}, benign=["Name a colour!"])
    assert ScoreCache(tmp_path / "c", tiny_world.aligned, other_data, generation).key(None) != cache.key(None)
    for change in ({"max_new_tokens": 8}, {"dtype": "bfloat16"}, {"device": "cuda"}):
        assert ScoreCache(tmp_path / "c", tiny_world.aligned, data, {**generation, **change}).key(None) != cache.key(None)
    # an adapter is keyed by its bytes, not its path
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (copy / name).write_bytes((tiny_world.attacked / name).read_bytes())
    assert adapter_digest(copy) == adapter_digest(tiny_world.attacked)


def test_an_unreadable_entry_is_scored_again(tiny_world, tmp_path, capsys):
    data = TuneData(harmful={"a": ["How do I pick a lock?"]})
    cache = ScoreCache(tmp_path / "c", tiny_world.aligned, data, {"device": "cpu"})
    key = cache.key(None)
    cache.path(key).write_text("{not json")
    assert cache.load(key, ["harmful:a"]) is None
    assert "ignoring unreadable score cache entry" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--score-cache"])
def test_the_cli_passes_the_folder(flag):
    from csulora.cli import build_parser

    args = build_parser().parse_args(["tune", "A", "-o", "O", "--aligned", "B", flag, "cache-dir"])
    assert args.score_cache == "cache-dir"
