"""Smoke test of the correction benchmark at toy size, so its code paths cannot rot.

The real run (7B shape, minutes) is not a test; this runs the same generator, cases,
memory sampler and summary on 64-wide layers in a few seconds.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # `benchmarks` is a top-level folder, not installed
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.correction import cli as bench_correction  # noqa: E402
from benchmarks.correction.memory import MemorySampler, read_status_kib  # noqa: E402
from benchmarks.correction.process import run_case_subprocess  # noqa: E402
from benchmarks.correction.summary import summarize_floor  # noqa: E402
from benchmarks.correction.synth import (  # noqa: E402
    AdapterSpec,
    DisplacementSpec,
    ModelShape,
    StreamingSafetensorsWriter,
    build_workdir,
    target_weight_names,
)

TOY = ModelShape(hidden=32, intermediate=48, layers=3, vocab=16, heads=4)
TOY_ARGS = ["--hidden", "32", "--intermediate", "48", "--vocab", "16", "--heads", "4", "--rank", "4"]


def test_streaming_writer_round_trips_through_safetensors(tmp_path):
    from safetensors.torch import load_file

    tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(7, dtype=torch.float32)}
    path = tmp_path / "x.safetensors"
    with StreamingSafetensorsWriter(path, [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]) as out:
        for name, tensor in tensors.items():
            out.write(name, tensor)
    loaded = load_file(str(path))
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor)


def test_streaming_writer_refuses_out_of_order_tensor(tmp_path):
    writer = StreamingSafetensorsWriter(tmp_path / "x.safetensors", [("a", (2,), torch.float32)])
    with pytest.raises(ValueError, match="expected a"):
        writer.write("b", torch.zeros(2))


def test_synthetic_pair_is_a_loadable_checkpoint_with_low_rank_displacement(tmp_path):
    from safetensors import safe_open

    work = build_workdir(tmp_path, TOY, [2, 3], DisplacementSpec(rank=3), AdapterSpec(rank=4))
    for depth in (2, 3):
        base_dir, aligned_dir = work.model("base", depth), work.model("aligned", depth)
        index = json.loads((base_dir / "model.safetensors.index.json").read_text())["weight_map"]
        assert set(target_weight_names(depth)) <= set(index)
        assert not any(f"layers.{depth}." in name for name in index)  # the view stops at its depth
        name = "model.layers.1.mlp.gate_proj.weight"
        with safe_open(str(base_dir / index[name]), "pt") as b, safe_open(str(aligned_dir / index[name]), "pt") as a:
            base, aligned = b.get_tensor(name), a.get_tensor(name)
        assert base.dtype == torch.bfloat16 and base.shape == (48, 32)
        singular = torch.linalg.svdvals(aligned.float() - base.float())
        # three strong directions over a noise floor at least 5x weaker
        assert singular[2] > 5 * singular[3]
    adapter = json.loads((work.adapter(2) / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and len(adapter["target_modules"]) == 7
    with safe_open(str(work.adapter(2) / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    assert len(keys) == 2 * 7 * 2


def test_memory_sampler_sees_this_process():
    assert read_status_kib()["RssAnon"] > 0
    sampler = MemorySampler(os.getpid(), interval_s=0.001)
    sampler.sample_once()
    assert sampler.samples == 1 and sampler.peaks_kib["RssAnon"] > 0
    assert read_status_kib(2**31 - 1) == {}  # a pid that does not exist reads as gone


def test_case_runs_in_a_child_process_and_is_sampled_from_outside(tmp_path):
    """The real benchmark's path: one interpreter per case, RssAnon sampled by the parent."""
    work = build_workdir(tmp_path, TOY, [3], DisplacementSpec(), AdapterSpec(rank=4))
    spec = {"case": "read", "threads": 1, "base": str(work.model("base", 3)), "aligned": str(work.model("aligned", 3))}
    run = run_case_subprocess(spec, cwd=bench_correction.REPO_ROOT, interval_s=0.005)
    assert run.result["tensors_read"] == 2 * 7 * 3
    assert run.samples > 0 and run.peak_rss_anon_bytes > 10 * 2**20  # torch alone is tens of MiB
    assert run.process_wall_s >= run.result["wall_s"]


def _expected_safelora_b(work_root: Path, depth: int, num_proj_layers: int) -> dict[str, torch.Tensor]:
    """Safe LoRA's projected B in factored form, D (D^T B) / ||D||: an independent check."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    factors = load_file(str(work_root / f"adapter-L{depth}" / "adapter_model.safetensors"))
    base_dir = work_root / "full" / "base"
    index = json.loads((base_dir / "model.safetensors.index.json").read_text())["weight_map"]
    cos, proj = {}, {}
    for name in target_weight_names(depth):
        with safe_open(str(base_dir / index[name]), "pt") as b:
            base = b.get_tensor(name).double()
        with safe_open(str(work_root / "full" / "aligned" / index[name]), "pt") as a:
            d = a.get_tensor(name).double() - base
        key = "base_model.model." + name.removesuffix(".weight")
        a_, b_ = factors[f"{key}.lora_A.weight"].double(), factors[f"{key}.lora_B.weight"].double()
        proj[key] = d @ (d.T @ b_) / d.norm()
        dense_new, dense_old = proj[key] @ a_, b_ @ a_
        cos[key] = round(float((dense_new * dense_old).sum() / (dense_new.norm() * dense_old.norm())), 5)
    cut = sorted(cos.values())[num_proj_layers - 1]
    return {k: (proj[k] if cos[k] <= cut else factors[f"{k}.lora_B.weight"].double()) for k in cos}


def test_benchmark_runs_end_to_end_at_toy_size(tmp_path):
    workdir, out = tmp_path / "bench", tmp_path / "results" / "correction.json"
    argv = ["--suite", "api", "--layers", "2", "--ref-layers", "2", "--workdir", str(workdir), "--out", str(out),
            "--keep", "--num-proj-layers", "5", "--in-process", "--cache", "warm", "--threads", "1", *TOY_ARGS]
    threads = torch.get_num_threads()
    assert bench_correction.main(argv) == 0
    assert torch.get_num_threads() == threads  # in-process cases leave the suite's setting alone
    results = json.loads(out.read_text())
    cases = {run["case"] for run in results["runs"]}
    assert {"idle", "read", "dense_reference"} <= cases
    for run in results["runs"]:
        assert run["peak_rss_anon_bytes"] > 0 and run["wall_s"] >= 0 and run["cpu_s"] >= 0
    read = next(r for r in results["runs"] if r["case"] == "read")
    assert read["tensors_read"] == 2 * 7 * 2
    assert results["machine"]["cores"] >= 1 and results["machine"]["cpu_model"]
    slope = results["summary"]["dense_reference_slope"]
    assert set(slope["extrapolated"]) == {"2", "32"}

    # the dense reference computes what Safe LoRA defines
    from safetensors.torch import load_file

    written = load_file(str(workdir / "outputs" / "dense-L2" / "adapter_model.safetensors"))
    for key, b in _expected_safelora_b(workdir, 2, 5).items():
        torch.testing.assert_close(written[f"{key}.lora_B.weight"].double(), b, rtol=1e-4, atol=1e-7)

    if results["api_measured"]:
        assert {"safelora", "build_subspace", "csulora"} <= cases
        assert "csulora_time_over_read_L2" in results["summary"]["ratios"]
        # (b) made the same selection as (a) and wrote the same lora_B, in factored form
        same = results["reference_vs_ours"]
        assert same["common_keys"] == 2 * 7 * 2 and same["keys_only_in_one"] == 0
        assert same["max_rel_diff"] < 1e-4
        assert same["projected_lora_B"] == 5
        assert max(same["max_rel_error_vs_float64"].values()) < 1e-4


def test_benchmark_deletes_its_checkpoints_unless_kept(tmp_path):
    workdir, out = tmp_path / "bench", tmp_path / "correction.json"
    argv = ["--suite", "api", "--layers", "1", "--ref-layers", "1", "--workdir", str(workdir), "--out", str(out),
            "--skip-api", "--skip-reference", "--in-process", *TOY_ARGS]
    assert bench_correction.main(argv) == 0
    assert not workdir.exists()
    assert json.loads(out.read_text())["api_measured"] is False


def test_floor_suite_runs_the_cli_as_whole_processes_at_toy_size(tmp_path):
    """The default suite (issue 15): the read floor, the four CLI commands, the accuracy check."""
    workdir, out = tmp_path / "bench", tmp_path / "floor.json"
    argv = ["--layers", "1", "--ref-layers", "1", "--workdir", str(workdir), "--out", str(out),
            "--cache", "warm", "--threads", "1", *TOY_ARGS]
    assert bench_correction.main(argv) == 0
    results = json.loads(out.read_text())
    assert results["suite"] == "floor"
    runs = {run["case"]: run for run in results["runs"]}
    assert set(runs) == {"read", "cli_safelora", "cli_subspace", "cli_csulora", "cli_resta", "subspace_accuracy",
                         "calibration_pass"}
    for case in ("read", "cli_safelora", "cli_subspace", "cli_csulora", "cli_resta"):
        # whole processes: CPU of interpreter start and imports included (torch alone is ~1 s)
        assert runs[case]["process_cpu_s"] > 0.5 and runs[case]["peak_rss_anon_bytes"] > 10 * 2**20
    assert runs["cli_resta"]["command"].startswith("csulora correct") and "--restore 1" in runs["cli_resta"]["command"]
    accuracy = runs["subspace_accuracy"]
    assert len(accuracy["modules"]) == 7 and accuracy["max_abs_error"] < 1e-3
    calibration = runs["calibration_pass"]
    assert calibration["tokens"] == 8 * 64 and calibration["groups"] == 4  # q/k/v, o, gate/up, down
    assert calibration["plain_forward_cpu_s"] > 0 and calibration["statistics_cpu_s"] > 0
    ratios = results["summary"]["ratios"]
    assert {"cli_safelora_cpu_over_floor_L1", "cli_subspace_cpu_over_floor_L1", "max_abs_energy_error",
            "calibration_statistics_over_forward"} <= set(ratios)
    assert not workdir.exists()


def _record(case: str, layers: int, cpu: float, rss_gib: float, repeat: int = 0) -> dict:
    return {"case": case, "label": case, "layers": layers, "repeat": repeat, "process_cpu_s": cpu,
            "process_wall_s": 2 * cpu, "peak_rss_anon_bytes": int(rss_gib * 2**30), "load_before": [4.0, 4.0, 4.0]}


def test_floor_summary_takes_medians_and_judges_each_target():
    runs = [
        _record("read", 3, 3.0, 0.14), _record("read", 3, 3.4, 0.14, 1), _record("read", 3, 2.0, 0.14, 2),
        _record("read", 12, 9.0, 0.14),
        _record("cli_csulora", 3, 3.5, 0.26), _record("cli_csulora", 3, 30.0, 0.26, 1), _record("cli_csulora", 3, 3.6, 0.30, 2),
        _record("cli_csulora", 12, 10.0, 0.27),
        _record("cli_safelora", 3, 6.0, 0.30), _record("cli_safelora", 12, 18.0, 0.45),
        _record("cli_subspace", 3, 29.0, 0.5), _record("cli_subspace", 12, 95.0, 0.5),
        {**_record("subspace_accuracy", 3, 1.0, 0.1), "max_abs_error": 2e-3},
    ]
    summary = summarize_floor(runs, [3, 12])
    assert summary["stats"]["read"][3]["cpu_s"] == {"median": 3.0, "min": 2.0, "max": 3.4}
    ratios, met = summary["ratios"], summary["meets_target"]
    assert ratios["cli_csulora_cpu_over_floor_L3"] == 1.2 and met["cli_csulora_cpu_over_floor_L3"]  # an outlier run does not decide
    assert ratios["cli_safelora_cpu_over_floor_L3"] == 2.0 and not met["cli_safelora_cpu_over_floor_L3"]
    assert met["cli_subspace_cpu_over_floor_L3"] and not met["cli_subspace_cpu_over_floor_L12"]  # 9.67; 10.56 > 10
    assert met["cli_csulora_rss_growth_L12_over_L3"] and not met["cli_safelora_rss_growth_L12_over_L3"]
    assert "read_rss_growth_L12_over_L3" not in met  # the floor has no target of its own
    assert not met["max_abs_energy_error"]


def test_build_subspace_case_reruns_on_a_kept_workdir(tmp_path):
    """A second run with --keep finds the first run's subspace file: the benchmark owns it and
    writes it again (it refused the existing file before)."""
    from benchmarks.correction.cases import Clock, case_build_subspace

    work = build_workdir(tmp_path, TOY, [2], DisplacementSpec(rank=3), AdapterSpec(rank=4))
    spec = {"base": str(work.model("base", 2)), "aligned": str(work.model("aligned", 2)),
            "subspace": str(tmp_path / "outputs" / "subspace-L2.safetensors")}
    first = case_build_subspace(spec, Clock())
    assert case_build_subspace(spec, Clock()) == first


def test_profile_counts_a_sample_for_every_phase_on_its_stack():
    from benchmarks.correction.profile import phase_shares

    lines = [
        "<module> (x.py:1);accumulate_sums (csulora/calibration.py:400);add_upper_gram_ (csulora/calibration.py:318) 3",
        "<module> (x.py:1);accumulate_sums (csulora/calibration.py:402);mirror_upper_ (csulora/calibration.py:340) 1",
        "<module> (x.py:1);plain_forward (benchmarks/bench_calibration.py:90) 4",
        "not a sample line",
    ]
    total, shares = phase_shares(lines)
    assert total == 8
    assert shares["calibration: statistics pass (all of it)"] == 0.5
    assert shares["  Gram strips x^T x added to the sums"] == 3 / 8
    assert shares["  upper triangle mirrored (unpacked)"] == 1 / 8
    assert shares["calibration: plain forward (the reference)"] == 0.5


def test_spectra_benchmark_runs_at_toy_size(tmp_path):
    from benchmarks.correction import spectra

    out = tmp_path / "spectra.json"
    threads = torch.get_num_threads()
    try:
        assert spectra.main(["--shape", "40", "32", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)  # main() runs on one thread
    rows = json.loads(out.read_text())["rows"]
    assert [row["spectrum"] for row in rows] == ["benchmark world", "power law i^-1/2", "noise"]
    for row in rows:
        for which in ("now", "before"):
            assert row[which]["energy"] <= row[which]["energy_exact"] + 1e-6  # no subspace beats the SVD
            assert row[which]["columns x products"] > 0
