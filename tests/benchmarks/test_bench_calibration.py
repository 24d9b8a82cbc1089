"""Smoke test of the calibration cost benchmark on the tiny world, so its code paths cannot rot.

The numbers themselves (SmolLM2, minutes of CPU) come from running the script, not from a test.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # `benchmarks` is a top-level folder, not installed
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import bench_calibration  # noqa: E402


def test_benchmark_times_every_stage_on_the_tiny_world(tiny_world, tmp_path, capsys):
    out = tmp_path / "calibration.json"
    args = ["--prompts", "4", "--task-examples", "4", "--max-new-tokens", "8", "--repeats", "1", "--json", str(out),
            "--budget-gb", "0.0003"]  # fmt: skip
    assert bench_calibration.main(args) == 0
    record = json.loads(out.read_text())
    assert record["threads"] == 1 and len(record["rows"]) == 1
    row = record["rows"][0]
    assert (row["groups"], row["modules"], row["harmful_prompts"], row["task_examples"]) == (8, 14, 4, 4)
    assert row["tokens"] <= row["tokens_with_padding"]
    assert set(row["cpu_seconds"]) == {
        "generation", "plain_forward", "decoder_forward", "statistics_pass", "statistics_pass_full_products", "build",
    }  # fmt: skip
    assert all(v > 0 for v in row["cpu_seconds"].values())
    assert row["ratio_statistics_to_plain_forward"] > 0
    several = row["several_passes"]
    assert several["passes"] == 4 and several["replay_exact"] is True
    assert set(several["cpu_seconds"]) == {"resumed", "recomputed"}
