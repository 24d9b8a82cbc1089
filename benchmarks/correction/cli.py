"""Correction speed and peak private memory on a synthetic 7B-shaped pair.

Two suites on the same files (docs/benchmarks.md):

``--suite floor`` (the default; issue 15): whole processes, imports included, as a user
runs them, against the floor of reading every base and aligned target tensor once:
  read                 the floor: each target tensor of both checkpoints read once,
  cli_safelora         ``csulora correct --method safelora --base --aligned`` (exact D),
  cli_subspace         ``csulora subspace BASE ALIGNED``,
  cli_csulora          ``csulora correct --method csulora --subspace`` (that cache),
  cli_resta            ``csulora correct --method resta --restore 1 --subspace``,
  published_safelora   the published Safe LoRA code itself (``--published DIR``, a
                       checkout of github.com/IBM/SafeLoRA; at ``--ref-layers`` only),
  subspace_accuracy    the cache's captured energies against the exact SVD's
                       (at ``--ref-layers``; minutes of CPU),
  calibration_pass     ``csulora calibrate``'s statistics pass against a plain forward over
                       the same random tokens, on the ``--ref-layers`` model (random weights).
CPU seconds are the child's own (``getrusage``), RssAnon its peak sampled from /proc.

``--suite api`` (the earlier comparison): in-process timings after imports of
  (a) a dense in-memory Safe LoRA reference written the way the published code works,
  (b) csulora's Safe LoRA streamed from base/aligned,
  (c) csulora's CSULoRA from a cached subspace (building the cache is timed separately),
  (d) only reading the base and aligned target tensors once.

References run at ``--ref-layers`` (they hold the models in RAM); ours run there and at
``--layers`` to show their memory does not grow with depth.

    python -m benchmarks.correction --layers 12 --ref-layers 3 --published /tmp/SafeLoRA \\
        --repeat 3 --workdir /tmp/csulora-bench --out benchmarks/results/correction-floor.json

The synthetic checkpoints (about 0.8 GB per layer for the pair) are deleted at the end
unless ``--keep``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT / "src") not in sys.path:  # run from a checkout without `pip install -e`
    sys.path.insert(0, str(REPO_ROOT / "src"))

from benchmarks.correction.process import (  # noqa: E402
    CaseRun,
    child_env,
    run_case_in_process,
    run_case_subprocess,
    run_child,
)
from benchmarks.correction.summary import (  # noqa: E402
    GIB,
    compare_published_outputs,
    compare_reference_outputs,
    floor_markdown,
    summarize,
    summarize_floor,
    summary_markdown,
)
from benchmarks.correction.synth import (  # noqa: E402
    AdapterSpec,
    DisplacementSpec,
    ModelShape,
    SyntheticWorkdir,
    build_workdir,
    drop_from_page_cache,
)


# --------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    """Cores, RAM and CPU model, so every number can be read against its machine."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_total = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024
    except OSError:
        pass
    import torch

    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "ram_bytes": mem_total,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def api_available() -> bool:
    """Whether csulora's public correction API exists yet (it is built in parallel)."""
    try:
        import csulora as api
    except ImportError:
        return False
    return callable(getattr(api, "correct_adapter", None)) and callable(getattr(api, "build_subspace", None))


# --------------------------------------------------------------------------- running cases


class Runner:
    """Runs cases in child processes with the shared settings and collects their results."""

    def __init__(self, work: SyntheticWorkdir, args: argparse.Namespace, chosen: set[str]):
        self.work = work
        self.args = args
        self.chosen = chosen  # cases left out of --cases are skipped
        self.runs: list[dict[str, Any]] = []
        self.repeat = 0  # which round of --repeat is running

    def _before(self, case: str, depth: int, label: str) -> bool:
        if case not in self.chosen:
            return False
        if self.args.cache == "cold":
            drop_from_page_cache(self.work.root)
        print(f"[bench] {label} (layers={depth}) ...", flush=True)
        return True

    def _record(self, run: CaseRun, depth: int, label: str, load: list[float]) -> dict[str, Any]:
        record = {"label": label, "layers": depth, "repeat": self.repeat, "load_before": load, **run.to_dict()}
        cpu = record.get("process_cpu_s") or record.get("cpu_s")
        print(
            f"[bench] {label} (layers={depth}): {record['process_wall_s']:.2f} s wall, {cpu:.2f} s CPU, "
            f"peak RssAnon {record['peak_rss_anon_bytes'] / GIB:.2f} GiB",
            flush=True,
        )
        self.runs.append(record)
        return record

    def run(self, case: str, depth: int, label: str, **extra: Any) -> dict[str, Any] | None:
        """A case of :mod:`benchmarks.correction.cases` in its own interpreter."""
        if not self._before(case, depth, label):
            return None
        load = load_average()
        spec = {
            "case": case,
            "threads": self.args.threads,
            "base": str(self.work.model("base", depth)),
            "aligned": str(self.work.model("aligned", depth)),
            "adapter": str(self.work.adapter(depth)),
            **extra,
        }
        if self.args.in_process:
            run: CaseRun = run_case_in_process(spec, interval_s=self.args.sample_interval)
        else:
            run = run_case_subprocess(spec, cwd=REPO_ROOT, interval_s=self.args.sample_interval)
        return self._record(run, depth, label, load)

    def command(self, case: str, depth: int, label: str, arguments: list[str]) -> dict[str, Any] | None:
        """``python -m csulora ARGUMENTS`` as one process, on ``--threads`` torch threads."""
        if not self._before(case, depth, label):
            return None
        load = load_average()
        env = child_env(REPO_ROOT, self.args.threads)
        if self.args.csulora_src is not None:  # another version of csulora, e.g. before a change
            env["PYTHONPATH"] = os.pathsep.join([str(self.args.csulora_src), env["PYTHONPATH"]])
        argv = [sys.executable, "-m", "csulora", *arguments]
        run = run_child(case, argv, cwd=REPO_ROOT, env=env, interval_s=self.args.sample_interval, echo=False)
        run.result["command"] = "csulora " + " ".join(arguments)
        return self._record(run, depth, label, load)


SUITES = {
    "floor": ("read", "cli_safelora", "cli_subspace", "cli_csulora", "cli_resta", "published_safelora",
              "subspace_accuracy", "calibration_pass"),
    "api": ("idle", "read", "dense_reference", "safelora", "build_subspace", "csulora"),
}
ALL_CASES = tuple(dict.fromkeys(case for cases in SUITES.values() for case in cases))


def run_floor(work: SyntheticWorkdir, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The floor suite: every case ``--repeat`` times, rounds interleaved so load drifts
    spread over all cases alike."""
    chosen = set(args.cases.split(",")) if args.cases else set(SUITES["floor"])
    if args.published is None:
        chosen.discard("published_safelora")
    runner = Runner(work, args, chosen)
    out = work.root / "outputs"
    depths = sorted({args.ref_layers, args.layers})
    for repeat in range(args.repeat):
        runner.repeat = repeat
        for depth in depths:
            model = {which: str(work.model(which, depth)) for which in ("base", "aligned")}
            adapter = str(work.adapter(depth))
            subspace = str(out / f"subspace-L{depth}.safetensors")
            runner.run("read", depth, "read base+aligned targets once (floor)")
            if depth == args.ref_layers:
                runner.run("published_safelora", depth, "published Safe LoRA code (fp32 patch), number mode",
                           published=str(args.published), out=str(out / f"published-L{depth}"),
                           num_proj_layers=args.num_proj_layers)
            runner.command("cli_safelora", depth, "csulora correct --method safelora --base --aligned",
                           ["correct", adapter, "-o", str(out / f"safelora-L{depth}"), "--force",
                            "--method", "safelora", "--num-layers", str(args.num_proj_layers),
                            "--base", model["base"], "--aligned", model["aligned"]])
            runner.command("cli_subspace", depth, "csulora subspace BASE ALIGNED",
                           ["subspace", model["base"], model["aligned"], "-o", subspace, "--force"])
            runner.command("cli_csulora", depth, "csulora correct --method csulora --subspace",
                           ["correct", adapter, "-o", str(out / f"csulora-L{depth}"), "--force",
                            "--method", "csulora", "--subspace", subspace])
            runner.command("cli_resta", depth, "csulora correct --method resta --restore 1 --subspace",
                           ["correct", adapter, "-o", str(out / f"resta-L{depth}"), "--force",
                            "--method", "resta", "--restore", "1", "--subspace", subspace])
            if depth == args.ref_layers and repeat == 0:
                runner.run("subspace_accuracy", depth, "captured energy vs the exact SVD", subspace=subspace)
                runner.run("calibration_pass", depth, "calibrate's statistics pass vs a plain forward",
                           sequences=args.calibration_sequences, tokens_per_sequence=args.calibration_tokens)
    return runner.runs


def run_all(work: SyntheticWorkdir, args: argparse.Namespace, with_api: bool) -> list[dict[str, Any]]:
    chosen = set(args.cases.split(",")) if args.cases else set(SUITES["api"])
    runner = Runner(work, args, chosen)
    out = work.root / "outputs"
    # (b) makes the same selection as (a), so their outputs can be compared module by module.
    safelora_opts = {
        "select": args.reference_mode,
        "num_layers": args.num_proj_layers,
        "threshold": args.threshold,
        **json.loads(args.safelora_options),
    }
    csulora_opts = json.loads(args.csulora_options)
    runner.run("idle", args.ref_layers, "idle: imports only", import_api=with_api)
    for depth in sorted({args.ref_layers, args.layers}):
        runner.run("read", depth, "(d) read base+aligned targets once")
        if depth == args.ref_layers and not args.skip_reference:
            runner.run(
                "dense_reference",
                depth,
                "(a) dense reference (published-code style)",
                out=str(out / f"dense-L{depth}"),
                mode=args.reference_mode,
                num_proj_layers=args.num_proj_layers,
                threshold=args.threshold,
            )
        if not with_api:
            continue
        runner.run(
            "safelora", depth, "(b) csulora safelora", out=str(out / f"safelora-L{depth}"), options=safelora_opts
        )
        subspace = str(out / f"subspace-L{depth}.safetensors")
        runner.run("build_subspace", depth, "(c0) csulora build_subspace", subspace=subspace)
        runner.run(
            "csulora",
            depth,
            "(c) csulora from cached subspace",
            out=str(out / f"csulora-L{depth}"),
            subspace=subspace,
            options=csulora_opts,
        )
    return runner.runs


def merge_runs(previous: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Previous runs with each (case, layers, repeat) measured again replaced in place by the new one."""
    fresh = {(r["case"], r["layers"], r.get("repeat", 0)): r for r in new}
    merged = [fresh.pop((r["case"], r["layers"], r.get("repeat", 0)), r) for r in previous]
    return merged + list(fresh.values())


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.correction", description=__doc__.split("\n")[0])
    p.add_argument("--suite", choices=list(SUITES), default="floor",
                   help="floor: whole CLI processes against the read floor (issue 15); api: the in-process "
                   "comparison with the dense reference")
    p.add_argument("--layers", type=int, default=12, help="depth of the synthetic pair (ours run here)")
    p.add_argument("--ref-layers", type=int, default=3,
                   help="depth for the references (the published code, the dense reference, the accuracy check)")
    p.add_argument("--published", type=Path, default=None,
                   help="a checkout of github.com/IBM/SafeLoRA (floor suite; never downloaded by the benchmark)")
    p.add_argument("--repeat", type=int, default=1, help="rounds of every case (floor suite)")
    p.add_argument("--csulora-src", type=Path, default=None,
                   help="run the CLI cases with the csulora package found in this folder (e.g. the src/ of an "
                   "older commit, from `git archive COMMIT src`) instead of this checkout's")
    p.add_argument("--calibration-sequences", type=int, default=8, help="random-token sequences of calibration_pass")
    p.add_argument("--calibration-tokens", type=int, default=64, help="tokens per calibration_pass sequence")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/csulora-bench"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/correction.json"))
    p.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints and outputs")
    p.add_argument("--reuse", action="store_true", help="reuse checkpoints already in --workdir")
    p.add_argument("--threads", type=int, default=2, help="torch threads in every case")
    p.add_argument("--cache", choices=("cold", "warm"), default="cold",
                   help="cold: evict the workdir from the page cache before each case (reads hit the disk)")
    p.add_argument("--sample-interval", type=float, default=0.01, help="seconds between /proc samples")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--cases", default="", help=f"comma list of cases to run (default: the suite's; known: {','.join(ALL_CASES)})")
    p.add_argument("--update", action="store_true",
                   help="merge into an existing --out: re-measured (case, layers, repeat) replace the old rows")
    p.add_argument("--in-process", action="store_true",
                   help="run cases in this interpreter (smoke tests only: memory then includes the caller)")
    p.add_argument("--skip-api", action="store_true", help="measure only (a) and (d)")
    p.add_argument("--reference-mode", choices=("number", "threshold"), default="number")
    p.add_argument("--num-proj-layers", type=int, default=10, help="Safe LoRA's number mode N (ours and the published)")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--safelora-options", default="{}", help="JSON of method options for (b)")
    p.add_argument("--csulora-options", default="{}", help="JSON of method options for (c)")
    # Shape knobs: the defaults are Llama-2-7B's; the smoke test shrinks them.
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank of the adapter")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 1 <= args.ref_layers <= args.layers:
        raise SystemExit("--ref-layers must be between 1 and --layers")
    if args.repeat < 1:
        raise SystemExit("--repeat must be at least 1")
    unknown = set(filter(None, args.cases.split(","))) - set(ALL_CASES)
    if unknown:
        raise SystemExit(f"--cases: unknown {', '.join(sorted(unknown))} (known: {', '.join(ALL_CASES)})")
    if args.published is not None and not (args.published / "model.py").is_file():
        raise SystemExit(f"--published {args.published}: no model.py (expected a checkout of github.com/IBM/SafeLoRA)")
    shape = ModelShape(args.hidden, args.intermediate, args.layers, args.vocab, args.heads)
    with_api = not args.skip_api and api_available()
    if args.suite == "api" and not with_api and not args.skip_api:
        print("[bench] csulora.pipeline.api not available: measuring (a) and (d) only", flush=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    load_before = load_average()
    command = "python -m benchmarks.correction " + " ".join(argv if argv is not None else sys.argv[1:])

    t0 = time.perf_counter()
    generate_s: float | None = None  # stays None with --reuse: nothing was generated
    if args.reuse and (args.workdir / "full" / "base" / "config.json").exists():
        work = SyntheticWorkdir(args.workdir, shape)
    else:
        if args.workdir.exists():
            shutil.rmtree(args.workdir)
        print(f"[bench] writing the synthetic pair to {args.workdir} ...", flush=True)
        work = build_workdir(
            args.workdir, shape, [args.ref_layers, args.layers],
            DisplacementSpec(), AdapterSpec(rank=args.rank), progress=True,
        )
        generate_s = time.perf_counter() - t0
    previous: dict[str, Any] = {}
    if args.update and args.out.exists():
        previous = json.loads(args.out.read_text())
        generate_s = previous.get("generate_s", generate_s)
    try:
        if args.suite == "floor":
            runs = merge_runs(previous.get("runs", []), run_floor(work, args))
            analysis = {
                "summary": summarize_floor(runs, sorted({args.ref_layers, args.layers})),
                "published_vs_ours": compare_published_outputs(work, args.ref_layers)
                or previous.get("published_vs_ours"),
            }
        else:
            runs = merge_runs(previous.get("runs", []), run_all(work, args, with_api))
            analysis = {
                "summary": summarize(runs, args.ref_layers, args.layers),
                "reference_vs_ours": compare_reference_outputs(work, args.ref_layers)
                or previous.get("reference_vs_ours"),
            }
        results = {
            "suite": args.suite,
            "command": command,
            "earlier_commands": previous.get("earlier_commands", []) + ([previous["command"]] if previous else []),
            "started": started,
            "machine": machine_info(),
            "load_average_before": load_before,
            "load_average_after": load_average(),
            "shape": asdict(shape),
            "adapter_rank": args.rank,
            "displacement": asdict(DisplacementSpec()),
            "cache": args.cache,
            "threads": args.threads,
            "csulora_src": None if args.csulora_src is None else str(args.csulora_src),
            "api_measured": with_api,
            "generate_s": None if generate_s is None else round(generate_s, 2),
            "disk_bytes_pair": sum(f.stat().st_size for f in (args.workdir / "full").rglob("*.safetensors")),
            "runs": runs,
            **analysis,
        }
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(floor_markdown(results) if args.suite == "floor" else summary_markdown(results))
    print(f"[bench] results written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
