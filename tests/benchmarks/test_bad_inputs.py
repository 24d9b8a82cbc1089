"""The bad-input runner's quick subset (issue 23), in this process: every case passes or is an
expected failure owned by another package; and the case table covers every command x error class.

The whole run (processes, interrupts, tune's sweeps) is ``python -m benchmarks.bad_inputs``;
its record is benchmarks/results/bad_inputs.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # `benchmarks` is a top-level folder, not installed
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bad_inputs import cases as case_table  # noqa: E402
from benchmarks.bad_inputs.__main__ import run_all, select  # noqa: E402


def test_every_command_has_a_case_for_every_error_class():
    table = case_table.coverage(case_table.all_cases())
    gaps = [(command, error_class) for command, row in table.items() for error_class, ids in row.items() if not ids]
    assert gaps == []
    assert set(table) == set(case_table.COMMANDS)


def test_the_quick_subset_runs_no_interrupts_and_no_long_runs():
    chosen = select(case_table.all_cases(), fast=True, only=None)
    assert chosen and all(c.fast and c.kind != "interrupt" for c in chosen)
    assert {c.command for c in chosen} >= set(case_table.COMMANDS)


def test_the_quick_subset_passes(tiny_world, tmp_path):
    """Exit code 2, one line, inputs byte-identical, nothing written -- for every quick case."""
    from csulora.worlds.builder import one_thread

    lines: list[str] = []
    with one_thread():
        result = run_all(select(case_table.all_cases(), fast=True, only=None), tmp_path, in_process=True,
                         real_calibration=False, log=lines.append)  # fmt: skip
    failed = [f"{r['id']}: {r['problems']}" for r in result["cases"] if r["status"] in ("fail", "unexpected pass")]
    assert failed == [], "\n".join(failed)
    expected = [r for r in result["cases"] if r["status"] == "expected failure"]
    assert all(r["owner"] and r["reason"] for r in expected)


@pytest.mark.parametrize("status, owner, passed, want", [
    ("fail", None, False, "fail"), ("pass", None, True, "pass"),
    ("x", "tuning", False, "expected failure"), ("x", "tuning", True, "unexpected pass"),
])
def test_an_owned_case_is_an_expected_failure_until_it_passes(status, owner, passed, want):
    from benchmarks.bad_inputs.run import Outcome, _record

    case = case_table.Case(id="c", command="correct", error_class="missing", argv=(), owner=owner, reason="r")
    record = _record(case, [], Outcome(2, "", "", 0.0), [] if passed else ["wrong"], "/root")
    assert record["status"] == want
