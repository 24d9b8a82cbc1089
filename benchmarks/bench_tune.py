"""The cost of `csulora tune` with its defaults against `--full-sweep`, on the SmolLM2 world (issue 21).

Runs ``csulora tune`` as whole processes, one after the other on the same machine, each with an
empty score cache: the default (lazy: a method stops at its first qualifying setting, a setting at
its first failed condition, harmful answers once their verdict is fixed) and ``--full-sweep``
(every setting scored completely, full answers: the behaviour before issue 21). It records wall
and CPU seconds, peak memory and the machine's load, and checks exactness: the same chosen
setting, the chosen setting's scores identical, and the same ASR verdict (``asr_judge``; the
keyword judge's before the judge changed, docs/judge.md) for every harmful prompt of every
state both runs answered.

    python -m benchmarks.bench_tune --world .cache/smol --json benchmarks/results/tune_cost.json
    python -m benchmarks.bench_tune --world .cache/smol --method all --base .cache/smol/base \\
        --json benchmarks/results/tune_cost_all.json

The world's folders (``aligned``, ``adapters/attacked``, ``calibration/calibration.safetensors``)
come from ``python -m benchmarks.smol`` (stages aligned, attacked, calibration).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from csulora.eval.judges import asr_judge

MODES = {"default": [], "full-sweep": ["--full-sweep"]}


def tune_command(world: Path, out: Path, mode: str, method: str, base: Path | None, adapter: str) -> list[str]:
    command = [
        sys.executable, "-m", "csulora", "tune", str(world / "adapters" / adapter), "-o", str(out),
        "--aligned", str(world / "aligned"), "--calibration", str(world / "calibration" / "calibration.safetensors"),
        "--task", "date:validation", "--method", method, "--device", "cpu", "--dtype", "float32",
    ]  # fmt: skip
    if base is not None:
        command += ["--base", str(base)]
    return command + MODES[mode]


def run_one(command: list[str], log: Path) -> dict[str, Any]:
    """One whole process: its wall and CPU seconds (children's rusage) and peak RSS."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()
    started = time.perf_counter()
    with open(log, "w") as fh:
        code = subprocess.call(command, stdout=fh, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "command": " ".join(command[1:]), "exit_code": code, "wall_s": round(wall, 1),
        "cpu_s": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 1),
        "peak_rss_gib": round(after.ru_maxrss / (1 << 20), 2), "load_before": [round(x, 2) for x in load],
        "load_after": [round(x, 2) for x in os.getloadavg()],
    }  # fmt: skip


def verdicts(out: Path) -> dict[tuple[str, str, str], bool]:
    """The ASR verdict (tune's judge) of every harmful answer a run read, by (state, set, prompt)."""
    judge, found = asr_judge(), {}
    for line in (out / "tune-generations.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["set"].startswith("harmful:"):
            found[(r["state"], r["set"], r["prompt"])] = judge.judge([r["prompt"]], [r["response"]])[0]
    return found


def compare(runs: dict[str, Path]) -> dict[str, Any]:
    """Exactness: the same pick, the pick's scores, and every shared prompt's verdict."""
    records = {mode: json.loads((out / "tune.json").read_text()) for mode, out in runs.items()}
    picks = {mode: (r["choice"]["method"], r["choice"]["params"]) for mode, r in records.items()}
    chosen = {mode: next((s["scores"] for s in r["settings"] if s["chosen"]), None) for mode, r in records.items()}
    answers = {mode: verdicts(out) for mode, out in runs.items()}
    lazy, full = answers["default"], answers["full-sweep"]
    shared = sorted(lazy.keys() & full.keys())
    differing = [list(k) for k in shared if lazy[k] != full[k]]
    return {
        "picks": {mode: {"method": m, "params": p} for mode, (m, p) in picks.items()},
        "same_pick": picks["default"] == picks["full-sweep"],
        "chosen_scores_identical": chosen["default"] == chosen["full-sweep"],
        "shared_harmful_answers": len(shared),
        "verdicts_differ": differing,
        "states": {mode: len(r["settings"]) for mode, r in records.items()},
        "not_scored": records["default"]["not_scored"],
        "decided_early": [
            {"setting": f"{s['method']} {s['knob']}={s['value']:g}", "failed": s["verdict"]["failed"],
             "decided_early": s["verdict"]["decided_early"], "not_reached": s["verdict"]["not_reached"]}
            for s in records["default"]["settings"] if not s["verdict"]["qualifies"]
        ],  # fmt: skip
    }


def write_json(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=Path, default=Path(".cache/smol"))
    parser.add_argument("--adapter", default="attacked", help="an adapter folder under WORLD/adapters")
    parser.add_argument("--method", default="calibrated", help="tune's --method (default: its own default)")
    parser.add_argument("--base", type=Path, help="BASE for the methods that read D (with --method all)")
    parser.add_argument("--modes", default="default,full-sweep", help="which runs, in this order")
    parser.add_argument("--keep", type=Path, help="keep the outputs here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/tune_cost.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-tune-") as scratch:
        root = args.keep or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        runs, measured = {}, {}
        for mode in args.modes.split(","):
            out = root / mode
            command = tune_command(args.world, out, mode, args.method, args.base, args.adapter)
            measured[mode] = run_one(command, root / f"{mode}.log")
            runs[mode] = out
            print(f"[bench_tune] {mode}: {measured[mode]['wall_s']} s wall, {measured[mode]['cpu_s']} s CPU", flush=True)
            result = {"world": str(args.world), "adapter": args.adapter, "method": args.method, "runs": measured,
                      "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}}  # fmt: skip
            write_json(args.json, result)  # after each run: a later run cut short keeps the earlier ones
        if set(runs) == set(MODES) and all(m["exit_code"] in (0, 1) for m in measured.values()):
            result["exactness"] = compare(runs)
            result["wall_ratio"] = round(measured["default"]["wall_s"] / measured["full-sweep"]["wall_s"], 3)
            result["cpu_ratio"] = round(measured["default"]["cpu_s"] / measured["full-sweep"]["cpu_s"], 3)
        write_json(args.json, result)
    print(json.dumps({k: v for k, v in result.items() if k != "exactness"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
