"""tune_adapter: data loading, planning the methods, the sweep's mechanics, and what lands in OUTDIR."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from csulora.cli import main
from csulora.errors import OptionError
from csulora.methods import registry
from csulora.methods.base import CALIBRATION, Tuning
from csulora.methods.resta import Resta
from csulora.tuning.config import TuneConfig
from csulora.tuning.data import load_tune_data
from csulora.tuning.plan import SourceFiles, plan_methods
from csulora.tuning.runner import (
    CALIBRATION_FILE,
    GENERATIONS,
    RUN_RECORD,
    SUBSPACE_FILE,
    TUNE_JSON,
    TUNE_PNG,
    tune_adapter,
)
from tests.toy_methods import Dampen


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------- data


def test_default_sources_are_the_validation_splits():
    from csulora.eval.splits import advbench_split, airt_split, benign_split, objectives_split

    loaded = load_tune_data(None, None, None)
    assert list(loaded.data.harmful) == ["advbench-validation", "objectives-validation", "airt-val"]
    assert len(loaded.data.harmful["advbench-validation"]) == 100
    assert len(loaded.data.harmful["objectives-validation"]) == 100  # issue 22: one answer is 0.01
    assert 15 <= len(loaded.data.harmful["airt-val"]) <= 20
    held_out = {p.text for p in advbench_split("test")} | {p.text for p in airt_split("airt-test")}
    held_out |= {p.text for p in objectives_split("test")}
    tuned_on = {t for prompts in loaded.data.harmful.values() for t in prompts}
    assert not tuned_on & held_out
    assert loaded.description["harmful"]["airt-val"]["spec"] == "airt:val"
    # benign prompts always: the validation half, disjoint from what eval reports on
    assert loaded.description["benign"] == {"spec": "benign:validation", "n": 108, "default": True}
    assert not set(loaded.data.benign) & {p.text for p in benign_split("test")}


def test_user_sources_are_named_by_file_and_held_out_sets_refused(tmp_path):
    a = tmp_path / "a" / "goals.txt"
    b = tmp_path / "b" / "goals.txt"
    for path, text in ((a, "one\ntwo\n"), (b, "three\n")):
        path.parent.mkdir()
        path.write_text(text)
    loaded = load_tune_data([str(a), str(b)], "date:validation", str(b))
    assert {k: len(v) for k, v in loaded.data.harmful.items()} == {"goals": 2, "goals-2": 1}
    assert len(loaded.data.task) == 100 and set(loaded.data.task[0]) == {"prompt", "response"}
    assert loaded.data.benign == ["three"] and loaded.description["benign"]["default"] is False
    for spec in ("advbench", "airt:test", "ADVBENCH:test"):
        with pytest.raises(OptionError, match="test split"):
            load_tune_data([spec], None, None)
    for spec in ("benign:test", "benign", "Benign"):  # the whole original set overlaps benign:test
        with pytest.raises(OptionError, match="overlaps benign:test.*benign:validation"):
            load_tune_data(None, None, spec)


def test_identity_settings():
    assert TuneConfig(method="resta").is_identity(0.0) and not TuneConfig(method="resta").is_identity(0.5)
    assert TuneConfig(method="scale").is_identity(1.0) and not TuneConfig(method="scale").is_identity(0.9)
    assert TuneConfig(method="csulora").is_identity(0.0)
    assert not TuneConfig(method="csulora", method_options={"restore": 1.0}).is_identity(0.0)
    assert not TuneConfig(method="safelora").is_identity(0.1)


# --------------------------------------------------------------------------- planning the methods


class Halve(Dampen):
    name = "toy-halve"
    pretty_name = "Toy halving"
    tuning = Tuning(knob="strength", grid=(0.0, 0.5), identity=0.0)


class NeedsStatistics(Dampen):
    name = "toy-statistics"
    pretty_name = "Toy statistics"
    inputs = frozenset({CALIBRATION})


@pytest.fixture
def toy_registry(monkeypatch):
    """A registry of two toy methods, one that reads statistics, and the real RESTA (needs a subspace)."""
    monkeypatch.setattr(registry, "METHODS", {})
    for method in (Dampen(), Halve(), Resta(), NeedsStatistics()):
        registry.register(method)


def test_plans_give_each_method_what_it_needs_and_skip_the_rest_with_all(toy_registry, tmp_path):
    plans, skipped = plan_methods(TuneConfig(method="all"), SourceFiles())
    assert [p.config.method for p in plans] == ["toy-dampen", "toy-halve"]
    assert set(skipped) == {"resta", "toy-statistics"}
    assert "needs the safety subspace" in skipped["resta"] and "activation statistics" in skipped["toy-statistics"]
    # one method: a missing input is an error, not a skip
    with pytest.raises(OptionError, match="RESTA \\(rank-k\\) needs the safety subspace"):
        plan_methods(TuneConfig(method="resta"), SourceFiles())
    # statistics no swept method reads are refused, not ignored
    with pytest.raises(OptionError, match="--calibration does not apply to --method toy-dampen"):
        plan_methods(TuneConfig(method="toy-dampen"), SourceFiles(calibration=tmp_path / "c.safetensors"))
    plans, skipped = plan_methods(TuneConfig(method="all"), SourceFiles(calibration_task="train.jsonl"))
    assert "toy-statistics" in [p.config.method for p in plans] and list(skipped) == ["resta"]


def test_all_with_nothing_runnable_is_one_line(monkeypatch):
    monkeypatch.setattr(registry, "METHODS", {})
    registry.register(Resta())
    with pytest.raises(OptionError, match="--method all: no method has the inputs it needs \\(resta: RESTA"):
        plan_methods(TuneConfig(method="all"), SourceFiles())


# --------------------------------------------------------------------------- the tiny world


@pytest.mark.usefixtures("keyword_asr")  # the tiny attack shows only to keywords
def test_tune_on_the_tiny_world_picks_the_weakest_qualifying_setting(tiny_world, tune_data, tmp_path, capsys):
    w, d = tiny_world, tune_data
    out = tmp_path / "tuned"
    # Factor 0 is the aligned model itself, so a safe setting exists whatever the world;
    # the utility bound is opened so the choice is made by the other conditions. --full-sweep:
    # every setting scored completely (the lazy default has its own tests below).
    code = main(
        ["tune", str(w.attacked), "-o", str(out), "--aligned", str(w.aligned), "--base", str(w.base),
         "--method", "scale", "--grid", "1,0,0.6", "--harmful", str(d["advbench"]), str(d["airt"]),
         "--task", str(d["task"]), "--benign", str(d["benign"]), "--max-utility-drop", "1", "--max-new-tokens", "16",
         "--device", "cpu", "--dtype", "float32", "--full-sweep"]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "chose factor=" in printed and "ASR advbench-val" in printed and "fluency" in printed
    assert "why settings did not qualify:\n  1: ASR on advbench-val" in printed  # the adapter itself
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "csulora_report.json", TUNE_JSON, TUNE_PNG, GENERATIONS} <= names
    assert CALIBRATION_FILE not in names
    assert (out / TUNE_PNG).read_bytes().startswith(b"\x89PNG")
    assert leftovers(tmp_path) == []

    record = json.loads((out / TUNE_JSON).read_text())
    aligned, adapter, rows = record["aligned"], record["adapter"], record["settings"]
    assert record["inputs"]["device"] == "cpu" and record["inputs"]["dtype"] == "float32"
    assert set(aligned["asr"]) == {"advbench-val", "airt-val"}
    assert [row["value"] for row in rows] == [1.0, 0.6, 0.0]  # weakest first
    for source, rate in aligned["asr"].items():  # the world's premise: the attack broke safety
        assert adapter["asr"][source]["value"] > rate["value"] + 0.05
        assert rate["n"] == 12 and len(rate["ci"]) == 2
        assert aligned["harmful_empty"][source]["n"] == 12
    # factor 1 is the adapter itself (not generated again); factor 0 the aligned model
    assert rows[0]["same_as_adapter"] and rows[0]["scores"] == adapter
    zero = rows[-1]["scores"]
    assert zero["asr"] == aligned["asr"] and zero["benign_short"] == aligned["benign_short"]
    assert zero["margin"] == pytest.approx(aligned["margin"], abs=1e-4)
    # disable_adapter on the swapped-adapter model gives the aligned model back: the aligned
    # model scores factor 0's answers (its own) as it scored them bare
    assert zero["benign_fluency"] == pytest.approx(aligned["benign_fluency"], abs=1e-4)
    assert aligned["benign_fluency"] < 0 and aligned["margin"] > adapter["margin"]
    chosen = [i for i, row in enumerate(rows) if row["chosen"]]
    assert len(chosen) == 1 and record["choice"]["index"] == chosen[0]
    assert record["choice"]["params"] == {"factor": rows[chosen[0]]["value"]} and record["choice"]["method"] == "scale"
    for i, row in enumerate(rows):
        verdict = row["verdict"]
        kinds = [c["kind"] for c in verdict["conditions"]]
        assert kinds == ["asr", "asr", "empty", "empty", "utility", "over_refusal", "short", "fluency"]
        assert verdict["qualifies"] == all(c["ok"] for c in verdict["conditions"])
        assert verdict["failed"] == [c["name"] for c in verdict["conditions"] if not c["ok"]]
        assert verdict["qualifies"] if i == chosen[0] else (not verdict["qualifies"] or i > chosen[0])
        assert row["scores"]["utility"]["n"] == 12 and row["scores"]["over_refusal"]["n"] == 3
    assert rows[-1]["verdict"]["qualifies"]  # the aligned model's own answers pass every condition
    assert record["datasets"]["task"]["n"] == 12 and record["warnings"] == []
    # the chosen adapter's report names no temporary folder
    report = json.loads((out / "csulora_report.json").read_text())
    assert not any(".candidates-" in str(v) or ".tmp-" in str(v) for v in report["sources"].values())


@pytest.mark.usefixtures("keyword_asr")  # the tiny attack shows only to keywords
def test_none_qualifies_exits_1_and_writes_the_sweep_without_an_adapter(tiny_world, tune_data, tmp_path, capsys):
    w, d = tiny_world, tune_data
    out = tmp_path / "tuned"
    # restore 0 is the uncorrected attack: it cannot be within the gap of the aligned model
    code = main(
        ["tune", str(w.attacked), "-o", str(out), "--aligned", str(w.aligned), "--base", str(w.base),
         "--method", "resta", "--grid", "0", "--harmful", str(d["advbench"]), str(d["airt"]),
         "--benign", str(d["benign"]), "--max-new-tokens", "16"]
    )  # fmt: skip
    assert code == 1
    printed = capsys.readouterr().out
    assert "no setting qualifies" in printed and "is still unsafe" in printed
    # --base and a method that reads a subspace: it is built once, kept in OUTDIR with the sweep
    assert sorted(p.name for p in out.iterdir()) == sorted([TUNE_JSON, TUNE_PNG, GENERATIONS, RUN_RECORD, SUBSPACE_FILE])
    record = json.loads((out / TUNE_JSON).read_text())
    assert record["choice"]["chosen"] is None and record["choice"]["qualified"] is False
    assert record["choice"]["params"] is None and not record["settings"][0]["chosen"]
    assert "the strongest, restore=0, is still unsafe" in record["choice"]["hint"]
    assert record["choice"]["hint"] in record["choice"]["summary"]
    assert "subspace" in json.loads((out / RUN_RECORD).read_text())["timing_s"]  # built once for the sweep
    assert any("no task data" in note for note in record["choice"]["notes"])
    # aligned and uncorrected generated (24 harmful + 3 benign); restore=0 reuses the adapter's answers
    assert len(lines(out / GENERATIONS)) == 2 * (24 + 3)
    assert leftovers(tmp_path) == []


def test_swapped_adapters_score_like_a_fresh_merged_load(tiny_world, tune_data, tmp_path):
    from csulora.references.subspace import build_subspace
    from csulora.pipeline.api import correct_adapter
    from csulora.eval.margin import mean_response_logprob
    from csulora.io.adapters import read_adapter
    from csulora.io.modeling import load_model

    w, d = tiny_world, tune_data
    subspace = tmp_path / "subspace.safetensors"
    targets = read_adapter(w.attacked).module_names()
    build_subspace(w.base, w.aligned, subspace, targets=targets, progress=False)
    config = TuneConfig(
        method="resta", grid=(2.0, 0.5, 1.0), max_asr_gap=1.0, max_utility_drop=1.0, max_fluency_loss=100.0,
        max_new_tokens=8,
    )  # fmt: skip
    result = tune_adapter(
        w.attacked, tmp_path / "tuned", aligned=w.aligned, subspace=subspace, config=config,
        harmful=[str(d["advbench"])], task=str(d["task"]), benign=str(d["benign"]), progress=False,
    )  # fmt: skip
    # Open bounds let every setting qualify, so the weakest (0.5: the grid is re-sorted) is
    # chosen, and the default sweep leaves the stronger ones unscored.
    assert result.qualified and result.chosen_params == {"restore": 0.5} and result.chosen_method == "resta"
    assert result.record["not_scored"] == [{"method": "resta", "value": 1.0}, {"method": "resta", "value": 2.0}]
    assert "only one harmful source" in result.record["warnings"][0]
    assert result.adapter_dir == tmp_path / "tuned"

    correct_adapter(w.attacked, tmp_path / "reference", "resta", subspace=subspace, restore=0.5, progress=False)
    written = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    expected = load_file(str(tmp_path / "reference" / "adapter_model.safetensors"))
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], expected[k]) for k in written)

    # The sweep swapped adapters on one in-memory model; a fresh merged load scores the same.
    items = [json.loads(line) for line in d["task"].read_text().splitlines()]
    model, tokenizer = load_model(w.aligned, result.adapter_dir)
    fresh = mean_response_logprob(model, tokenizer, items, batch_size=4)
    assert result.record["settings"][0]["scores"]["task_loglik"] == pytest.approx(fresh, abs=1e-4)


@pytest.mark.usefixtures("keyword_asr")  # the tiny attack shows only to keywords
def test_all_sweeps_every_method_it_can_and_recommends_the_best(toy_registry, tiny_world, tune_data, tmp_path):
    w, d = tiny_world, tune_data
    config = TuneConfig(method="all", max_new_tokens=16, max_utility_drop=1.0)
    result = tune_adapter(
        w.attacked, tmp_path / "tuned", aligned=w.aligned, config=config,
        harmful=[str(d["advbench"]), str(d["airt"])], task=str(d["task"]), benign=str(d["benign"]), progress=False,
    )  # fmt: skip
    record = result.record
    rows = record["settings"]
    assert [(row["method"], row["value"]) for row in rows] == [
        ("toy-dampen", 0.0), ("toy-dampen", 1.0), ("toy-halve", 0.0), ("toy-halve", 0.5)
    ]
    assert set(record["methods"]) == {"toy-dampen", "toy-halve"}
    # no --subspace/--base, no statistics: those methods are skipped with a note, not an error
    assert set(record["skipped_methods"]) == {"resta", "toy-statistics"}
    assert any(n.startswith("resta not swept: ") for n in record["choice"]["notes"])
    # each method's identity setting is the adapter: scored once, not generated again
    assert [row["same_as_adapter"] for row in rows] == [True, False, True, False]
    assert rows[0]["scores"] == rows[2]["scores"] == record["adapter"]
    states = {line["state"] for line in lines(result.out_dir / GENERATIONS)}
    assert states == {"aligned", "uncorrected", "toy-dampen strength=1", "toy-halve strength=0.5"}
    # strength 1 deletes the adapter: the aligned model's answers, so it qualifies
    assert rows[1]["verdict"]["qualifies"] and rows[1]["scores"]["asr"] == record["aligned"]["asr"]
    # the recommendation: the highest validation utility among the qualifying settings
    qualifying = [row for row in rows if row["verdict"]["qualifies"]]
    best = max(row["verdict"]["utility_drop"] for row in qualifying)
    chosen = rows[record["choice"]["index"]]
    assert result.qualified and chosen["chosen"] and chosen["verdict"]["utility_drop"] == min(
        row["verdict"]["utility_drop"] for row in qualifying
    ) <= best
    assert result.chosen_method == chosen["method"] and result.chosen_params == {"strength": chosen["value"]}
    assert set(record["choice"]["per_method"]) == {"toy-dampen", "toy-halve"}
    written = load_file(str(result.out_dir / "adapter_model.safetensors"))
    scale = 1.0 - chosen["value"]
    original = load_file(str(Path(w.attacked) / "adapter_model.safetensors"))
    for key, tensor in written.items():
        expected = original[key] * scale if "lora_B" in key else original[key]
        assert torch.allclose(tensor.float(), expected.float(), atol=1e-6), key
    assert (result.out_dir / TUNE_PNG).read_bytes().startswith(b"\x89PNG")


def test_all_needs_task_data(toy_registry, tiny_world, tune_data, tmp_path):
    with pytest.raises(OptionError, match="--method all ranks the methods by utility: give --task"):
        tune_adapter(tiny_world.attacked, tmp_path / "o", aligned=tiny_world.aligned, config=TuneConfig(method="all"),
                     harmful=[str(tune_data["advbench"])], benign=str(tune_data["benign"]))  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_calibration_task_must_not_be_the_validation_data(toy_registry, tiny_world, tune_data, tmp_path):
    with pytest.raises(OptionError, match="also in the validation task.*training data"):
        tune_adapter(
            tiny_world.attacked, tmp_path / "o", aligned=tiny_world.aligned, calibration_task=str(tune_data["task"]),
            config=TuneConfig(method="toy-statistics"), task=str(tune_data["task"]),
            harmful=[str(tune_data["advbench"])], benign=str(tune_data["benign"]),
        )  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_calibration_task_writes_the_statistics_inside_outdir(tiny_world, tune_data, tmp_path):
    assert "calibrated" in registry.tunable_methods()
    from csulora.eval.tasks import date_task

    w, d = tiny_world, tune_data
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": i["prompt"], "response": i["response"]}) + "\n"
                             for i in date_task("train")[:24]))  # fmt: skip
    out = tmp_path / "work" / "tuned"
    config = TuneConfig(method="calibrated", grid=(0.0, 30.0), max_new_tokens=16, max_utility_drop=1.0, max_asr_gap=1.0,
                        max_fluency_loss=100.0)  # fmt: skip
    result = tune_adapter(
        w.attacked, out, aligned=w.aligned, calibration_task=str(train), config=config,
        harmful=[str(d["advbench"]), str(d["airt"])], task=str(d["task"]), benign=str(d["benign"]), progress=False,
    )  # fmt: skip
    assert (out / CALIBRATION_FILE).is_file()
    assert result.record["inputs"]["calibration"] == {
        "file": CALIBRATION_FILE, "written_by": "tune --calibration-task", "task": {"spec": str(train), "n": 24}
    }  # fmt: skip
    assert "calibration" in result.run["timing_s"] and "timing_s" not in result.record
    # every bound open: the weakest setting is chosen; a corrected one would name the statistics in OUTDIR
    assert result.qualified and result.chosen_params["strength"] == 0.0
    report = json.loads((out / "csulora_report.json").read_text())
    assert report["sources"]["calibration"] == CALIBRATION_FILE  # named inside OUTDIR, never by a temporary path
    assert leftovers(out.parent) == []


@pytest.mark.usefixtures("keyword_asr")  # the tiny attack shows only to keywords
def test_hub_ids_are_resolved_for_adapter_aligned_and_base(tiny_world, tune_data, tmp_path, monkeypatch):
    """ADAPTER/ALIGNED/BASE as hub ids, as the API takes them (they were refused as missing folders)."""
    from tests.io.test_hub import use_fake_hub

    w = tiny_world
    repos = {"tiny-org/attacked": w.attacked, "tiny-org/aligned": w.aligned, "tiny-org/base": w.base}
    hub = use_fake_hub(monkeypatch, tmp_path / "hub", repos)
    d = tune_data
    result = tune_adapter(
        "tiny-org/attacked", tmp_path / "tuned", aligned="tiny-org/aligned", base="tiny-org/base",
        config=TuneConfig(method="resta", grid=(0.0,), max_new_tokens=8), harmful=[str(d["advbench"])],
        benign=str(d["benign"]), progress=False,
    )  # fmt: skip
    inputs = result.record["inputs"]
    snapshots = hub.resolve()
    for key in ("adapter", "aligned", "base"):
        assert Path(inputs[key]).is_relative_to(snapshots), (key, inputs[key])
    assert not result.qualified  # restore 0 is the attack itself


def test_antidote_reads_the_fine_tuned_models_statistics(tiny_world, tune_data, attacked_update_statistics, tmp_path):
    """tune --method antidote --update-statistics FILE (from `csulora calibrate --update`): the
    pick is what `correct` writes with the same file; a file of the wrong role or of another adapter
    is refused before anything is loaded or written."""
    import shutil

    from safetensors.torch import save_file

    from csulora.errors import InputError
    from csulora.pipeline.api import correct_adapter
    from tests.fixtures_tiny import build_calibration

    w, d = tiny_world, tune_data
    stats = attacked_update_statistics.path
    config = TuneConfig(method="antidote", grid=(0.1, 0.3), max_new_tokens=8, max_asr_gap=1.0, max_utility_drop=1.0,
                        max_fluency_loss=100.0)  # fmt: skip
    data = {"harmful": [str(d["advbench"])], "task": str(d["task"]), "benign": str(d["benign"]), "progress": False}
    result = tune_adapter(w.attacked, tmp_path / "tuned", aligned=w.aligned, update_statistics=stats, config=config,
                          **data)  # fmt: skip
    assert result.qualified and result.chosen_method == "antidote" and result.chosen_params == {"dense_ratio": 0.1}
    correct_adapter(w.attacked, tmp_path / "reference", "antidote", update_statistics=stats, dense_ratio=0.1,
                    progress=False)  # fmt: skip
    written = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    expected = load_file(str(tmp_path / "reference" / "adapter_model.safetensors"))
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in written)

    aligned_stats = build_calibration(tmp_path / "aligned.safetensors", None)
    with pytest.raises(InputError, match=r"--update-statistics .*aligned\.safetensors: it holds the aligned model's"):
        tune_adapter(w.attacked, tmp_path / "o", aligned=w.aligned, update_statistics=aligned_stats, config=config, **data)
    other = Path(shutil.copytree(w.attacked, tmp_path / "other"))
    factors = load_file(str(other / "adapter_model.safetensors"))
    save_file({k: v * 2 for k, v in factors.items()}, str(other / "adapter_model.safetensors"))
    with pytest.raises(InputError, match=r"statistics were measured on another adapter than .*other"):
        tune_adapter(other, tmp_path / "o", aligned=w.aligned, update_statistics=stats, config=config, **data)
    assert not (tmp_path / "o").exists() and leftovers(tmp_path) == []


def test_tune_selects_on_the_plain_and_the_framed_prompts_as_two_sources(tiny_world, tune_data, tmp_path, capsys):
    """``--harmful FILE FILE@aoa`` (issue 24): the identity-shift form is one more harmful source,
    bounded on its own, and the record and the printed table name it."""
    w, d = tiny_world, tune_data
    out = tmp_path / "tuned"
    code = main(
        ["tune", str(w.attacked), "-o", str(out), "--aligned", str(w.aligned), "--base", str(w.base),
         "--method", "scale", "--grid", "0", "--harmful", str(d["advbench"]), f"{d['advbench']}@aoa",
         "--benign", str(d["benign"]), "--max-new-tokens", "8", "--device", "cpu", "--dtype", "float32"]
    )  # fmt: skip
    assert code in (0, 1)
    assert "ASR advbench-val@aoa" in capsys.readouterr().out
    record = json.loads((out / TUNE_JSON).read_text())
    assert set(record["aligned"]["asr"]) == {"advbench-val", "advbench-val@aoa"}
    assert record["datasets"]["harmful"]["advbench-val@aoa"]["framing"] == "aoa"
    assert record["datasets"]["harmful"]["advbench-val"]["framing"] == "plain"
    conditions = [c["name"] for c in record["settings"][0]["verdict"]["conditions"]]
    assert any("advbench-val@aoa" in name for name in conditions)  # bounded on its own
    sets = {row["set"] for row in lines(out / GENERATIONS)}
    assert {"harmful:advbench-val", "harmful:advbench-val@aoa"} <= sets
