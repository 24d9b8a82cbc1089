"""``python -m benchmarks.bad_inputs``: run the cases, print a summary, write the JSON record."""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from benchmarks.bad_inputs.cases import Case, all_cases, coverage

RESULTS = Path(__file__).resolve().parents[1] / "results" / "bad_inputs.json"


def select(cases: list[Case], *, fast: bool, only: str | None) -> list[Case]:
    """``fast``: the in-process subset (no interrupts, nothing that runs a model for long)."""
    chosen = [c for c in cases if c.fast and c.kind != "interrupt"] if fast else list(cases)
    if only:
        chosen = [c for c in chosen if re.search(only, c.id)]
    return chosen


def run_all(cases: list[Case], root: Path, *, in_process: bool, real_calibration: bool, log=print) -> dict:
    from transformers.utils import logging as hf_logging

    from benchmarks.bad_inputs.inputs import build_inputs
    from benchmarks.bad_inputs.run import run_case

    hf_logging.disable_progress_bar()  # building the inputs saves models: no bars in the record's log
    started = time.perf_counter()
    # the demo's interrupt cases run it into its world: that world must be in the inputs' cache
    demo_world = any(c.command == "demo" and c.kind == "interrupt" for c in cases)
    paths = build_inputs(root, real_calibration=real_calibration, demo_world=demo_world)
    setup_s = time.perf_counter() - started
    records = []
    for case in cases:
        record = run_case(case, paths, root, in_process=in_process)
        log(f"{record['status']:17s} {record['got']['seconds']:6.1f} s  {case.id}"
            + (f"  -- {'; '.join(record['problems'])}" if record["problems"] else ""))  # fmt: skip
        records.append(record)
    return {
        "mode": "in-process (csulora.cli.main)" if in_process else "processes (python -m csulora)",
        "summary": dict(Counter(r["status"] for r in records)),
        "seconds": {"setup": round(setup_s, 1), "cases": round(time.perf_counter() - started - setup_s, 1)},
        "coverage": coverage(cases),
        "cases": records,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bad_inputs", description=__doc__)
    parser.add_argument("--fast", action="store_true", help="the quick subset, in this process (make test)")
    parser.add_argument("--in-process", action="store_true", help="run cases through csulora.cli.main, not processes")
    parser.add_argument("--only", metavar="REGEX", help="cases whose id matches, e.g. '^correct/'")
    parser.add_argument("--json", type=Path, default=None, help=f"result file (default {RESULTS}; none with --fast)")
    parser.add_argument("--workdir", type=Path, help="where inputs and outputs go (default: a temporary folder)")
    args = parser.parse_args(argv)
    cases = select(all_cases(), fast=args.fast, only=args.only)
    root = Path(tempfile.mkdtemp(prefix="csulora-bad-inputs-", dir=args.workdir))
    try:
        result = run_all(cases, root, in_process=args.fast or args.in_process, real_calibration=not args.fast)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {"command": "python -m benchmarks.bad_inputs " + " ".join(argv if argv is not None else sys.argv[1:]),
              "python": platform.python_version(), **result}  # fmt: skip
    target = args.json or (None if args.fast else RESULTS)
    if target is not None:
        target.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{len(cases)} cases: " + ", ".join(f"{n} {s}" for s, n in sorted(result["summary"].items())))
    return 1 if result["summary"].get("fail") else 0


if __name__ == "__main__":
    sys.exit(main())
