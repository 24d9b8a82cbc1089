"""Smoke test of the calibrate-twice benchmark on the tiny world (the SmolLM2 numbers come from
running the script, not from a test)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # `benchmarks` is a top-level folder, not installed
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import bench_calibrate_twice  # noqa: E402
from csulora.eval.splits import advbench_split  # noqa: E402
from csulora.eval.tasks import date_task  # noqa: E402
from csulora.references.calibration.data import task_pairs  # noqa: E402


def test_the_other_task_is_valid_training_data_in_another_format(tmp_path):
    pairs = task_pairs(bench_calibrate_twice.iso_task(tmp_path / "iso.jsonl"))  # refused if held out
    originals = date_task("train")
    assert len(pairs) == len(originals) == 200
    assert pairs[0]["response"] == "-".join(reversed(originals[0]["response"].split("/")))
    assert "YYYY-MM-DD" in pairs[0]["prompt"] and originals[0]["prompt"].split(" to ")[0] in pairs[0]["prompt"]


def test_the_second_run_reads_the_answers_back(tiny_world, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", f"{REPO_ROOT / 'src'}:{REPO_ROOT}")
    harmful = tmp_path / "harmful.txt"
    harmful.write_text("\n".join(p.text for p in advbench_split("align")[:6]) + "\n")
    out = tmp_path / "twice.json"
    args = ["--workdir", str(tmp_path / "work"), "--json", str(out), "--", "--harmful", str(harmful),
            "--max-new-tokens", "8", "--targets", "o_proj", "--device", "cpu"]  # fmt: skip
    assert bench_calibrate_twice.main(args) == 0
    record = json.loads(out.read_text())
    assert record["answers_read_back"] == [False, True]
    assert record["harmful_statistics_identical"] is True
    assert record["runs"]["second"]["run_record"]["seconds"]["generation"] < 1.0
    assert record["ratio_wall_second_to_first"] > 0 and record["target_ratio"] == 0.3
