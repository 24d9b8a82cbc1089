"""The full fine-tune memory benchmark (issue 14) end to end at toy shapes: the world is written,
every case runs in its own process and is sampled from outside, rows and bound are recorded."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # `benchmarks` is a top-level folder, not installed
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.correction import full  # noqa: E402
from benchmarks.correction.synth import ModelShape  # noqa: E402

TOY = ["--hidden", "32", "--intermediate", "48", "--vocab", "64", "--heads", "4"]


def test_finetuned_checkpoint_moves_every_tensor_and_keeps_the_layout(tmp_path):
    from safetensors.torch import load_file

    shape = ModelShape(hidden=32, intermediate=48, layers=2, vocab=64, heads=4)
    work = full.build_world(tmp_path / "w", shape, [1, 2], progress=False)
    aligned, ft = work.model("aligned", 2), work.model(full.FINETUNED, 2)
    assert (ft / "model.safetensors.index.json").read_text() == (aligned / "model.safetensors.index.json").read_text()
    for shard in sorted(aligned.glob("*.safetensors")):
        a, f = load_file(str(shard)), load_file(str(ft / shard.name))
        assert a.keys() == f.keys() and all(f[k].dtype == torch.bfloat16 and not torch.equal(a[k], f[k]) for k in a)
    assert (work.model(full.FINETUNED, 1) / "config.json").exists()  # the depth view
    assert full.bound_bytes(ModelShape()) == int(1.3 * 3 * 4 * 11008 * 4096)


def test_cases_run_in_child_processes_and_record_the_bound(tmp_path):
    out = tmp_path / "full.json"
    argv = ["--layers", "1,2", "--methods", "scale,safelora", "--workdir", str(tmp_path / "w"), "--out", str(out), *TOY]
    assert full.main(argv) == 0
    results = json.loads(out.read_text())
    runs = {(r["case"], r["layers"]): r for r in results["runs"]}
    assert set(runs) == {("scale", 1), ("safelora", 1), ("scale", 2), ("safelora", 2)}
    for row in runs.values():
        assert row["baseline_rss_anon_bytes"] > 0 and row["peak_rss_anon_bytes"] >= row["baseline_rss_anon_bytes"]
        assert row["peak_above_baseline_bytes"] == row["peak_rss_anon_bytes"] - row["baseline_rss_anon_bytes"]
        assert row["within_bound"] == (row["peak_above_baseline_bytes"] <= row["bound_bytes"])
        assert row["modules"] == 7 * row["layers"]
    assert runs[("safelora", 2)]["sources"] == "aligned + base" and runs[("scale", 2)]["sources"] == "aligned"
    assert not (tmp_path / "w").exists()  # the world is removed without --keep
    assert "| scale | 1 |" in full.summary_markdown(results)


def test_calibrated_case_reads_a_calibration_file_of_the_aligned_model(tmp_path):
    from csulora.io.calibration_file import load_calibration

    out = tmp_path / "full.json"
    argv = ["--layers", "1", "--methods", "calibrated", "--workdir", str(tmp_path / "w"), "--out", str(out), "--keep", *TOY]
    assert full.main(argv) == 0
    (row,) = json.loads(out.read_text())["runs"]
    assert row["case"] == "calibrated" and row["sources"] == "aligned + calibration" and row["modules"] == 7
    assert row["statistics_bytes"] == 2 * 8 * 48 * 48  # the widest group (toy shapes: every group dense)
    assert row["bound_bytes"] == full.bound_bytes(ModelShape(32, 48, 1, 64, 4)) + row["statistics_bytes"]
    assert row["summary"]["modules"] == 7
    calibration = load_calibration(tmp_path / "w" / "calibration-1.safetensors")
    assert calibration.modules["model.layers.0.self_attn.k_proj"] == "model.layers.0.self_attn.q_proj+k_proj+v_proj"
    assert calibration.module("model.layers.0.mlp.down_proj").harmful.n == 48


def test_statistics_bytes_at_7b_shape_are_one_dense_4096_group():
    # down_proj's 11008-wide group is stored spiked at rank 512: smaller than two dense 4096^2 Grams
    assert full.statistics_bytes(ModelShape()) == 2 * 8 * 4096 * 4096


def test_an_update_keeps_the_earlier_commands_records(tmp_path):
    out = tmp_path / "full.json"
    common = ["--workdir", str(tmp_path / "w"), "--out", str(out), "--keep", *TOY]
    assert full.main(["--layers", "1", "--methods", "scale", *common]) == 0
    first = json.loads(out.read_text())
    assert first["earlier_commands"] == []
    assert full.main(["--layers", "1", "--methods", "resta", "--reuse", "--update", *common]) == 0
    second = json.loads(out.read_text())
    (earlier,) = second["earlier_commands"]
    assert earlier["started"] == first["started"] and earlier["load_average_before"] == first["load_average_before"]
    assert earlier["command"] == first["commands"][0] and len(second["commands"]) == 2
    assert {(r["case"], r["layers"]) for r in second["runs"]} == {("scale", 1), ("resta", 1)}
