"""A second ``csulora calibrate`` of the same aligned model with other task data (issue 21).

The aligned model's answers to the harmful prompts depend on the model, the prompts and the
generation settings only, so the second calibration reads them from the answer cache instead of
generating them. This runs ``python -m csulora calibrate`` twice as whole processes (imports,
fingerprint, model load included), as a user would, with one answer cache, empty before the
first run:

1. ``--task date:train`` (the answers are generated and cached);
2. ``--task`` the same 200 dates asked and answered in another format (YYYY-MM-DD instead of
   DD/MM/YYYY): other valid training data, so other task statistics.

It records each run's wall and CPU seconds (the child's, ``getrusage``), its run record
(``OUTPUT.run.json``: the stages' seconds, whether the answers were read back), the load average
before it, and checks that both files hold the same harmful statistics. Target: the second run
takes at most 30 % of the first's wall time.

    python -m benchmarks.bench_calibrate_twice                                  # the tiny world
    python -m benchmarks.bench_calibrate_twice --aligned .cache/smol/aligned \\
        --json benchmarks/results/calibrate_twice.json                          # SmolLM2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET = 0.30  # second wall time / first's
_DATE = re.compile(r"^Convert the date (.+) to DD/MM/YYYY format\. Reply with the date only\.$")


def iso_task(out: Path) -> Path:
    """``date:train`` asked and answered as YYYY-MM-DD: the same dates, another response format."""
    from csulora.eval.tasks import date_task

    lines = []
    for item in date_task("train"):
        match = _DATE.match(item["prompt"])
        if match is None:
            raise ValueError(f"unexpected date:train prompt: {item['prompt']!r}")
        day, month, year = item["response"].split("/")
        prompt = f"Convert the date {match.group(1)} to YYYY-MM-DD format. Reply with the date only."
        lines.append(json.dumps({"prompt": prompt, "response": f"{year}-{month}-{day}"}))
    out.write_text("\n".join(lines) + "\n")
    return out


def child_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_run(argv: list[str], output: Path) -> dict:
    """One ``csulora calibrate`` process: wall and CPU seconds, its summary line and run record."""
    load = [round(x, 2) for x in os.getloadavg()]
    cpu0, wall0 = child_seconds(), time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "csulora", *argv], capture_output=True, text=True, check=False)
    wall, cpu = time.perf_counter() - wall0, child_seconds() - cpu0
    if done.returncode != 0:
        raise SystemExit(f"calibrate failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    record = json.loads(Path(f"{output}.run.json").read_text())
    return {
        "argv": argv,
        "load_average_before": load,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "summary": done.stdout.strip(),
        "run_record": record,
    }


def same_harmful_statistics(first: Path, second: Path) -> bool:
    import torch

    from csulora.io.calibration_file import load_calibration

    a, b = load_calibration(first), load_calibration(second)
    return a.info["harmful"] == b.info["harmful"] and all(
        torch.equal(a.module(m).harmful.matrix if a.module(m).harmful.matrix is not None else a.module(m).harmful.U,
                    b.module(m).harmful.matrix if b.module(m).harmful.matrix is not None else b.module(m).harmful.U)
        for m in b.modules
    )  # fmt: skip


def measure(aligned: str, work: Path, extra: list[str]) -> dict:
    cache, other = work / "answer-cache", iso_task(work / "date-train-iso.jsonl")
    runs = {}
    for name, task in (("first", "date:train"), ("second", str(other))):
        out = work / f"{name}.safetensors"
        argv = ["calibrate", aligned, "-o", str(out), "--task", task, "--answer-cache", str(cache), *extra]
        runs[name] = timed_run(argv, out)
        print(f"[bench] {name}: {runs[name]['wall_s']} s wall, {runs[name]['cpu_s']} s CPU", flush=True)
    first, second = runs["first"], runs["second"]
    return {
        "aligned": aligned,
        "runs": runs,
        "answers_read_back": [first["run_record"]["answers"]["read_back"], second["run_record"]["answers"]["read_back"]],
        "harmful_statistics_identical": same_harmful_statistics(work / "first.safetensors", work / "second.safetensors"),
        "ratio_wall_second_to_first": round(second["wall_s"] / first["wall_s"], 3),
        "ratio_cpu_second_to_first": round(second["cpu_s"] / first["cpu_s"], 3),
        "target_ratio": TARGET,
        "met": second["wall_s"] <= TARGET * first["wall_s"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aligned", help="aligned checkpoint folder (default: the tiny world's)")
    parser.add_argument("--workdir", type=Path, help="where the outputs and the answer cache go (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="write the measurements here")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="more calibrate flags, after --")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    aligned = args.aligned
    if aligned is None:
        from csulora.worlds.tiny import shared_tiny_world

        aligned = str(shared_tiny_world().aligned)
    extra = [a for a in args.extra if a != "--"]
    with tempfile.TemporaryDirectory(prefix="calibrate-twice-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = measure(aligned, work, extra)
    record = {
        "command": "python -m benchmarks.bench_calibrate_twice " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        **result,
    }
    print(json.dumps({k: v for k, v in record.items() if k != "runs"}, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
