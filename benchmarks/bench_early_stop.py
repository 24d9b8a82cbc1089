"""What stopping harmful answers once the ASR verdict is fixed saves in generation (issue 21).

For each model, the same harmful prompts (AdvBench validation) are answered twice with
:func:`csulora.eval.generation.generate_answers`: once to the end (``--max-new-tokens``)
and once with the ASR judge's stop rule on every prompt (``csulora.eval.judges.asr_judge``:
an answer stops once a refusal string is complete in its text, or an opening refusal in its
first 100 characters; benchmarks/results/early_stop.json was measured with the keyword
judge's rule, before the judge changed -- docs/judge.md). Reported per model:

- **time**: process CPU seconds of each run, the best of ``--repeats`` (runs alternate
  full / early so drifting load hits both alike), and the wall seconds of that run;
- **tokens**: tokens the model generated for the answers (``new_tokens``, end-of-turn
  included) and the decoding work done (``row_steps``: steps x rows, since a cut row keeps
  its place until its whole batch ends, so one uncut answer -- ``longest_answer_tokens``
  -- keeps its batch running);
- **overhead**: CPU seconds spent inside the stop criterion (decoding the watched rows and
  running the rules), of the early run's best repeat;
- **exactness**: every answer's ASR verdict is the same in both runs, uncut answers
  are identical strings, and each cut answer is the start of its full one.

    PYTHONPATH=src .venv/bin/python -m benchmarks.bench_early_stop --smol .cache/smol/aligned \\
        --json benchmarks/results/early_stop.json

Without ``--smol`` only the tiny world (its aligned model and its attacked adapter) is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path


class CriterionClock:
    """Adds up the CPU seconds spent in :class:`StopRuleCriteria` calls while installed."""

    def __init__(self):
        from csulora.eval import generation

        self.cls = generation.StopRuleCriteria
        self.original = self.cls.__call__
        self.seconds = 0.0

    def __enter__(self):
        original, clock = self.original, self

        def timed_call(criteria, *args, **kwargs):
            start = time.process_time()
            try:
                return original(criteria, *args, **kwargs)
            finally:
                clock.seconds += time.process_time() - start

        self.cls.__call__ = timed_call
        return self

    def __exit__(self, *exc):
        self.cls.__call__ = self.original


def timed_run(fn) -> dict:
    """One run of ``fn``: its result, process CPU and wall seconds, and the criterion's CPU seconds."""
    with CriterionClock() as clock:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        out = fn()
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return {"out": out, "cpu_s": cpu, "wall_s": wall, "criterion_cpu_s": clock.seconds}


def exactness(prompts, full, early) -> dict:
    from csulora.eval.judges import asr_judge

    judge = asr_judge()
    pairs = list(zip(early.truncated, early.answers, full.answers))
    return {
        "same_verdicts": judge.judge(prompts, early.answers) == judge.judge(prompts, full.answers),
        "uncut_identical": all(short == whole for cut, short, whole in pairs if not cut),
        "cut_are_prefixes": all(whole.startswith(short) for cut, short, whole in pairs if cut),
    }


def measure(name: str, model, tokenizer, prompts: list[str], args) -> dict:
    from csulora.eval.generation import generate_answers
    from csulora.eval.judges import asr_judge, stop_rule

    rules = [stop_rule(asr_judge(), p) for p in prompts]
    kw = {"batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "progress": False}
    generate_answers(model, tokenizer, prompts[:2], **{**kw, "max_new_tokens": 2})  # warm-up, not timed
    runs: dict[str, dict] = {}
    for _ in range(args.repeats):  # alternate, so a change of load hits both runs
        for label, extra in (("full", {}), ("early_stop", {"stop_rules": rules})):
            run = timed_run(lambda: generate_answers(model, tokenizer, prompts, **kw, **extra))
            if label not in runs or run["cpu_s"] < runs[label]["cpu_s"]:
                runs[label] = run
    full, early = runs["full"]["out"], runs["early_stop"]["out"]
    row = {"model": name, "prompts": len(prompts), "truncated_answers": sum(early.truncated)}
    for label, run in runs.items():
        out = run["out"]
        row[label] = {
            "cpu_s": round(run["cpu_s"], 4),
            "wall_s": round(run["wall_s"], 4),
            "generated_tokens": sum(out.new_tokens),
            "row_steps": out.row_steps,
            "longest_answer_tokens": max(out.new_tokens),
            "criterion_cpu_s": round(run["criterion_cpu_s"], 4),
        }
    row["ratio_early_to_full"] = {
        key: round(row["early_stop"][key] / row["full"][key], 3) for key in ("cpu_s", "wall_s", "generated_tokens", "row_steps")
    }
    row["exactness"] = exactness(prompts, full, early)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smol", type=Path, metavar="DIR", help="also measure this SmolLM2 model folder (.cache/smol/aligned)")
    parser.add_argument("--prompts", type=int, default=64, help="AdvBench validation prompts")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (best CPU time kept)")
    parser.add_argument("--json", type=Path, help="write the measurements here")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from csulora.eval.splits import advbench_split
    from csulora.io.modeling import load_model
    from csulora.worlds.tiny import shared_tiny_world

    prompts = [p.text for p in advbench_split("validation")][: args.prompts]
    world = shared_tiny_world()
    rows = []
    for name, adapter in (("tiny world aligned", None), ("tiny world attacked", world.attacked)):
        model, tokenizer = load_model(world.aligned, adapter, device="cpu")
        rows.append(measure(name, model, tokenizer, prompts, args))
    if args.smol is not None:
        model, tokenizer = load_model(args.smol, device="cpu")
        rows.append(measure(f"SmolLM2 {args.smol}", model, tokenizer, prompts, args))
    record = {
        "command": " ".join(["python -m benchmarks.bench_early_stop", *(sys.argv[1:] if argv is None else argv)]),
        "threads": args.threads,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs visible",
        "load_average_1m": round(os.getloadavg()[0], 2),
        "rows": rows,
    }
    print(json.dumps(record, indent=2))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
