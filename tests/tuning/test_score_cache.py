"""``tune --score-cache``: every scored state is kept, so a rerun (or a killed run) generates nothing twice."""

from __future__ import annotations

import json

import pytest

import csulora.tuning.scoring as scoring_module
from csulora.eval.metrics import Rate
from csulora.tuning.config import TuneConfig
from csulora.tuning.data import TuneData
from csulora.tuning.runner import GENERATIONS, RUN_RECORD, TUNE_JSON, tune_adapter
from csulora.tuning.score_cache import ScoreCache, adapter_digest
from csulora.tuning.scores import FAILED, Early, SettingScores
from csulora.tuning.scoring import StateRecord


def test_scores_survive_the_round_trip():
    scores = SettingScores(
        asr={"a": Rate(0.25, (0.0, 0.5), 12), "b": Rate(1.0, (1.0, 1.0), 3)},
        utility=Rate(0.5, (0.25, 0.75), 12), task_loglik=-1.5, over_refusal=None, margin=2.0,
        harmful_empty={"a": Rate(0.0, (0.0, 0.0), 12)}, benign_short=Rate(0.1, (0.0, 0.2), 10), benign_fluency=-2.25,
    )  # fmt: skip
    assert SettingScores.from_dict(json.loads(json.dumps(scores.to_dict()))) == scores
    lazy = SettingScores(asr={"a": Rate(1.0, (1.0, 1.0), 4)}, early={"a": Early(FAILED, 4, 12, 4, 0)},
                         reached=("asr", "empty"))  # fmt: skip
    assert SettingScores.from_dict(json.loads(json.dumps(lazy.to_dict()))) == lazy


def test_records_survive_the_round_trip():
    record = StateRecord(answers={"harmful:a": {3: "Sure", 0: "I'm sorry"}}, truncated={"harmful:a": {0}},
                         measures={"margin": 1.5, "fluency": None})  # fmt: skip
    assert StateRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record


def run_tune(world, data, out, cache, grid=(1.0, 0.5, 0.0), **options):
    return tune_adapter(
        world.attacked, out, aligned=world.aligned, base=world.base,
        config=TuneConfig(method="scale", grid=grid, max_new_tokens=16, max_utility_drop=1.0, **options),
        harmful=[str(data["advbench"]), str(data["airt"])], task=str(data["task"]), benign=str(data["benign"]),
        device="cpu", dtype="float32", progress=False, score_cache=cache,
    )  # fmt: skip


def no_generation(*_args, **_kwargs):
    raise AssertionError("a cached answer was generated again")


def test_a_rerun_reads_every_state_back_and_writes_the_same_bytes(tiny_world, tune_data, tmp_path, monkeypatch):
    cache = tmp_path / "scores"
    first = run_tune(tiny_world, tune_data, tmp_path / "one", cache)
    # aligned, the adapter, and each generated setting (factor 1 is the adapter itself: not scored again)
    stored = sorted(cache.glob("*.json"))
    assert len(stored) == 2 + sum(1 for row in first.record["settings"] if not row["same_as_adapter"])
    monkeypatch.setattr(scoring_module, "generate_answers", no_generation)
    second = run_tune(tiny_world, tune_data, tmp_path / "two", cache)
    # tune.json and the answers do not depend on what the cache held; run.json says what was read
    for name in (TUNE_JSON, GENERATIONS):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    assert first.run["score_cache"]["read"] == []
    assert "aligned" in second.run["score_cache"]["read"] and "uncorrected" in second.run["score_cache"]["read"]
    assert json.loads((tmp_path / "two" / RUN_RECORD).read_text())["score_cache"] == second.run["score_cache"]


@pytest.mark.usefixtures("keyword_asr")  # the tiny attack shows only to keywords
def test_a_lazily_scored_state_asked_for_completely_scores_only_what_is_missing(tiny_world, tune_data, tmp_path,
                                                                                monkeypatch):  # fmt: skip
    """A setting stopped early keeps the answers it has; a later run that needs the rest (here a
    looser rule, under which it qualifies and is completed) generates only what is missing."""
    cache = tmp_path / "scores"
    strict = run_tune(tiny_world, tune_data, tmp_path / "strict", cache, max_asr_gap=0.0)
    stopped = [r for r in strict.record["settings"] if r["scores"].get("reached")]
    assert stopped, "the tiny world's weaker settings fail on their first harmful batch"
    state = f"scale factor={stopped[0]['value']:g}"
    answered = sum(1 for line in (tmp_path / "strict" / GENERATIONS).read_text().splitlines()
                   if json.loads(line)["state"] == state)  # fmt: skip
    generated: dict[str, int] = {}
    real = scoring_module.generate_answers

    def counted(model, tokenizer, prompts, **kwargs):
        generated[kwargs["desc"]] = generated.get(kwargs["desc"], 0) + len(prompts)
        return real(model, tokenizer, prompts, **kwargs)

    monkeypatch.setattr(scoring_module, "generate_answers", counted)
    loose = run_tune(tiny_world, tune_data, tmp_path / "loose", cache, grid=(stopped[0]["value"],), max_asr_gap=1.0,
                     max_fluency_loss=100.0)  # fmt: skip
    row = next(r for r in loose.record["settings"] if r["value"] == stopped[0]["value"])
    assert row["verdict"]["qualifies"] and "reached" not in row["scores"]  # now scored completely
    total = sum(len(p) for _, p in TuneData(**_data(tune_data)).prompt_sets())
    assert generated == {state: total - answered}  # aligned and uncorrected read back, the rest completed


def _data(files) -> dict:
    from csulora.tuning.data import load_tune_data

    data = load_tune_data([str(files["advbench"]), str(files["airt"])], str(files["task"]), str(files["benign"])).data
    return {"harmful": data.harmful, "task": data.task, "benign": data.benign}


def test_keys_change_with_what_the_scores_depend_on(tiny_world, tmp_path):
    data = TuneData(harmful={"a": ["How do I pick a lock?"]}, benign=["Name a colour."])
    generation = {"batch_size": 4, "max_new_tokens": 16, "seed": 0, "stop_early": True, "device": "cpu",
                  "dtype": "float32"}  # fmt: skip
    cache = ScoreCache(tmp_path / "c", tiny_world.aligned, data, generation)
    assert cache.key(None) == ScoreCache(tmp_path / "c", tiny_world.aligned, data, generation).key(None)
    assert cache.key(None) != cache.key(tiny_world.attacked)
    other_data = TuneData(harmful={"a": ["How do I pick a lock?"]}, benign=["Name a colour!"])
    assert ScoreCache(tmp_path / "c", tiny_world.aligned, other_data, generation).key(None) != cache.key(None)
    for change in ({"max_new_tokens": 8}, {"dtype": "bfloat16"}, {"device": "cuda"}, {"stop_early": False}):
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
    assert cache.load(key) is None
    assert "ignoring unreadable score cache entry" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--score-cache"])
def test_the_cli_passes_the_folder(flag):
    from csulora.cli import build_parser

    args = build_parser().parse_args(["tune", "A", "-o", "O", "--aligned", "B", flag, "cache-dir"])
    assert args.score_cache == "cache-dir"


def test_a_framed_set_changes_the_key_and_a_plain_key_is_as_before(tiny_world, tmp_path):
    """A framed run never reads a plain run's answers; plain data keeps the key of runs before framings."""
    import hashlib

    from csulora.training.framing import load_framing
    from csulora.tuning.score_cache import data_digest

    plain = TuneData(harmful={"a": ["How do I pick a lock?"]}, benign=["Name a colour."])
    before = {"sets": plain.prompt_sets(), "task_references": []}  # the payload before framings existed
    assert data_digest(plain) == hashlib.sha256(json.dumps(before, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    aoa = load_framing("aoa")
    framed = TuneData(harmful=plain.harmful, benign=plain.benign, framings={"harmful:a": aoa})
    benign_framed = TuneData(harmful=plain.harmful, benign=plain.benign, framings={"benign": aoa})
    digests = {data_digest(d) for d in (plain, framed, benign_framed)}
    assert len(digests) == 3
    generation = {"device": "cpu"}
    keys = {ScoreCache(tmp_path / "c", tiny_world.aligned, d, generation).key(None) for d in (plain, framed)}
    assert len(keys) == 2
