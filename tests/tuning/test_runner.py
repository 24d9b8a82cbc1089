"""tune_adapter: data loading, the sweep's mechanics, and what lands in OUTDIR."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from csulora.cli import main
from csulora.errors import OptionError
from csulora.tuning.config import TuneConfig
from csulora.tuning.runner import GENERATIONS, TUNE_JSON, TUNE_PNG, load_tune_data, tune_adapter


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_default_harmful_sources_are_the_two_validation_splits():
    from csulora.eval.splits import advbench_split, airt_split

    loaded = load_tune_data(None, None, None)
    assert list(loaded.data.harmful) == ["advbench-validation", "airt-val"]
    assert len(loaded.data.harmful["advbench-validation"]) == 100
    assert 15 <= len(loaded.data.harmful["airt-val"]) <= 20
    held_out = {p.text for p in advbench_split("test")} | {p.text for p in airt_split("airt-test")}
    tuned_on = {t for prompts in loaded.data.harmful.values() for t in prompts}
    assert not tuned_on & held_out
    assert loaded.description["harmful"]["airt-val"]["spec"] == "airt:val"


def test_user_sources_are_named_by_file_and_kept_apart(tmp_path):
    a = tmp_path / "a" / "goals.txt"
    b = tmp_path / "b" / "goals.txt"
    for path, text in ((a, "one\ntwo\n"), (b, "three\n")):
        path.parent.mkdir()
        path.write_text(text)
    loaded = load_tune_data([str(a), str(b)], "date:validation", "benign")
    assert {k: len(v) for k, v in loaded.data.harmful.items()} == {"goals": 2, "goals-2": 1}
    assert len(loaded.data.task) == 100 and set(loaded.data.task[0]) == {"prompt", "response"}
    assert len(loaded.data.benign) >= 100
    for spec in ("advbench", "airt:test", "ADVBENCH:test"):
        with pytest.raises(OptionError, match="test split"):
            load_tune_data([spec], None, None)


def test_identity_settings():
    assert TuneConfig().is_identity(0.0) and not TuneConfig().is_identity(0.5)
    assert TuneConfig(method="scale").is_identity(1.0) and not TuneConfig(method="scale").is_identity(0.9)
    assert TuneConfig(method="csulora").is_identity(0.0)
    assert not TuneConfig(method="csulora", method_options={"restore": 1.0}).is_identity(0.0)
    assert not TuneConfig(method="safelora").is_identity(0.1)


def test_tune_on_the_tiny_world_picks_the_weakest_safe_setting(tiny_world, tune_data, tmp_path, capsys):
    w, d = tiny_world, tune_data
    out = tmp_path / "tuned"
    # Factor 0 is the aligned model itself, so a safe setting exists whatever the world;
    # the utility bound is opened so the choice is made by the per-source ASR gap.
    code = main(
        ["tune", str(w.attacked), "-o", str(out), "--aligned", str(w.aligned), "--base", str(w.base),
         "--method", "scale", "--grid", "0.3,1,0,0.6", "--harmful", str(d["advbench"]), str(d["airt"]),
         "--task", str(d["task"]), "--benign", str(d["benign"]), "--max-utility-drop", "1", "--max-new-tokens", "16"]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "chose factor=" in printed and "ASR advbench-val" in printed
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "csulora_report.json", TUNE_JSON, TUNE_PNG, GENERATIONS} <= names
    assert (out / TUNE_PNG).read_bytes().startswith(b"\x89PNG")
    assert leftovers(tmp_path) == []

    record = json.loads((out / TUNE_JSON).read_text())
    aligned, adapter, rows = record["aligned"], record["adapter"], record["settings"]
    assert set(aligned["asr"]) == {"advbench-val", "airt-val"}
    assert [row["value"] for row in rows] == [1.0, 0.6, 0.3, 0.0]  # weakest first
    for source, rate in aligned["asr"].items():  # the world's premise: the attack broke safety
        assert adapter["asr"][source]["value"] > rate["value"] + 0.05
        assert rate["n"] == 12 and len(rate["ci"]) == 2
    # factor 1 is the adapter itself (not generated again); factor 0 the aligned model
    assert rows[0]["same_as_adapter"] and rows[0]["scores"] == adapter
    assert rows[-1]["scores"]["asr"] == aligned["asr"]
    assert rows[-1]["scores"]["margin"] == pytest.approx(aligned["margin"], abs=1e-4)
    assert aligned["margin"] > adapter["margin"]  # recorded for reference, never used to choose
    chosen = [i for i, row in enumerate(rows) if row["chosen"]]
    assert len(chosen) == 1 and record["choice"]["index"] == chosen[0]
    assert record["choice"]["params"] == {"factor": rows[chosen[0]]["value"]}
    for i, row in enumerate(rows):
        within = all(
            row["scores"]["asr"][s]["value"] <= aligned["asr"][s]["value"] + 0.05 + 1e-9 for s in aligned["asr"]
        )
        assert row["verdict"]["qualifies"] == within  # the utility bound is open
        assert within if i == chosen[0] else (not within or i > chosen[0])
        assert row["scores"]["utility"]["n"] == 12 and row["scores"]["over_refusal"]["n"] == 3
        assert row["verdict"]["utility_drop"] is not None
    assert record["datasets"]["task"]["n"] == 12 and record["warnings"] == []


def test_none_qualifies_exits_1_and_writes_the_sweep_without_an_adapter(tiny_world, tune_data, tmp_path, capsys):
    w, d = tiny_world, tune_data
    out = tmp_path / "tuned"
    # restore 0 is the uncorrected attack: it cannot be within the gap of the aligned model
    code = main(
        ["tune", str(w.attacked), "-o", str(out), "--aligned", str(w.aligned), "--base", str(w.base),
         "--grid", "0", "--harmful", str(d["advbench"]), str(d["airt"]), "--max-new-tokens", "16"]
    )  # fmt: skip
    assert code == 1
    assert "no setting qualifies" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted([TUNE_JSON, TUNE_PNG, GENERATIONS])
    record = json.loads((out / TUNE_JSON).read_text())
    assert record["choice"]["chosen"] is None and record["choice"]["qualified"] is False
    assert record["choice"]["params"] is None and not record["settings"][0]["chosen"]
    assert "restore=0, is still unsafe" in record["choice"]["summary"]
    assert "subspace" in record["timing_s"]  # --base: the subspace is built once for the sweep
    assert any("no task data" in note for note in record["choice"]["notes"])
    # aligned and uncorrected generated; restore=0 reuses the adapter's answers
    assert len((out / GENERATIONS).read_text().splitlines()) == 2 * 24
    assert leftovers(tmp_path) == []


def test_swapped_adapters_score_like_a_fresh_merged_load(tiny_world, tune_data, tmp_path):
    from csulora.api import build_subspace, correct_adapter
    from csulora.io.adapters import read_adapter
    from csulora.modeling import load_model
    from csulora.eval.margin import mean_response_logprob

    w, d = tiny_world, tune_data
    subspace = tmp_path / "subspace.safetensors"
    targets = read_adapter(w.attacked).module_names()
    build_subspace(w.base, w.aligned, subspace, targets=targets, progress=False)
    config = TuneConfig(
        grid=(2.0, 0.5, 1.0), max_asr_gap=1.0, max_utility_drop=1.0, max_new_tokens=8, stop_at_first=True
    )
    result = tune_adapter(
        w.attacked, tmp_path / "tuned", aligned=w.aligned, subspace=subspace, config=config,
        harmful=[str(d["advbench"])], task=str(d["task"]), progress=False,
    )  # fmt: skip
    # Bounds of 1 let every setting qualify, so the weakest (0.5: the grid is re-sorted) is
    # chosen, and stop_at_first leaves the stronger ones unscored.
    assert result.qualified and result.chosen_params == {"restore": 0.5}
    assert result.record["not_scored"] == [1.0, 2.0]
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
