"""Smoke test of the early-stop benchmark on the tiny world, so its code paths cannot rot.

The SmolLM2 numbers come from running the script (benchmarks/results/early_stop.json), not from a test.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # `benchmarks` is a top-level folder, not installed
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import bench_early_stop  # noqa: E402


def test_benchmark_measures_both_runs_on_the_tiny_world(tiny_world, tmp_path, capsys):
    out = tmp_path / "early_stop.json"
    assert bench_early_stop.main(["--prompts", "6", "--batch-size", "4", "--max-new-tokens", "24", "--repeats", "1", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    aligned, attacked = record["rows"]
    for row in (aligned, attacked):
        assert row["exactness"] == {"same_verdicts": True, "uncut_identical": True, "cut_are_prefixes": True}
        assert set(row["full"]) == set(row["early_stop"]) == {"cpu_s", "wall_s", "generated_tokens", "row_steps", "longest_answer_tokens", "criterion_cpu_s"}
    # The aligned model refuses every prompt, so every answer is cut; the attacked one complies.
    assert aligned["truncated_answers"] == 6 and attacked["truncated_answers"] == 0
    assert aligned["early_stop"]["generated_tokens"] < aligned["full"]["generated_tokens"]
    assert aligned["early_stop"]["row_steps"] < aligned["full"]["row_steps"]
    assert attacked["early_stop"]["generated_tokens"] == attacked["full"]["generated_tokens"]
