"""Correction speed and peak private memory on a synthetic 7B-shaped pair.

Compares, on the same files and the same thread count:
  (a) a dense in-memory Safe LoRA reference written the way the published code works,
  (b) csulora's Safe LoRA streamed from base/aligned,
  (c) csulora's CSULoRA from a cached subspace (building the cache is timed separately),
  (d) only reading the base and aligned target tensors once.
(a) runs at the depth that fits in RAM (``--ref-layers``); ours run there and at
``--layers`` to show their memory does not grow with depth.

    python -m benchmarks.bench_correction --layers 12 --ref-layers 4 \\
        --workdir /tmp/csulora-bench --out benchmarks/results/correction.json

The synthetic checkpoints (about 0.8 GB per layer for the pair) are deleted at the end
unless ``--keep``. Memory is ``RssAnon`` of each case's own process, sampled from /proc.
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

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT / "src") not in sys.path:  # run from a checkout without `pip install -e`
    sys.path.insert(0, str(REPO_ROOT / "src"))

from benchmarks.bench_correction_memory import CaseRun, run_case_in_process, run_case_subprocess  # noqa: E402
from benchmarks.bench_correction_synth import (  # noqa: E402
    AdapterSpec,
    DisplacementSpec,
    ModelShape,
    SyntheticWorkdir,
    build_workdir,
    drop_from_page_cache,
)

TARGETS = {
    "safelora_speedup_vs_dense": 10.0,  # (b) at least 10x faster than (a)
    "safelora_memory_reduction_vs_dense": 20.0,  # (b) at least 20x less peak RAM than (a)
    "csulora_time_over_read": 2.0,  # (c) within 2x of (d)
}
GIB = 1024**3


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
        from csulora import api
    except ImportError:
        return False
    return callable(getattr(api, "correct_adapter", None)) and callable(getattr(api, "build_subspace", None))


# --------------------------------------------------------------------------- running cases


class Runner:
    """Runs cases in subprocesses with the shared settings and collects their results."""

    def __init__(self, work: SyntheticWorkdir, args: argparse.Namespace, chosen: set[str]):
        self.work = work
        self.args = args
        self.chosen = chosen  # cases left out of --cases are skipped
        self.runs: list[dict[str, Any]] = []

    def run(self, case: str, depth: int, label: str, **extra: Any) -> dict[str, Any] | None:
        if case not in self.chosen:
            return None
        if self.args.cache == "cold":
            drop_from_page_cache(self.work.root)
        spec = {
            "case": case,
            "threads": self.args.threads,
            "base": str(self.work.model("base", depth)),
            "aligned": str(self.work.model("aligned", depth)),
            "adapter": str(self.work.adapter(depth)),
            **extra,
        }
        print(f"[bench] {label} (layers={depth}) ...", flush=True)
        if self.args.in_process:
            run: CaseRun = run_case_in_process(spec, interval_s=self.args.sample_interval)
        else:
            run = run_case_subprocess(spec, cwd=REPO_ROOT, interval_s=self.args.sample_interval)
        record = {"label": label, "layers": depth, "load_before": load_average(), **run.to_dict()}
        print(
            f"[bench] {label} (layers={depth}): {record['wall_s']:.2f} s, "
            f"peak RssAnon {record['peak_rss_anon_bytes'] / GIB:.2f} GiB",
            flush=True,
        )
        self.runs.append(record)
        return record


ALL_CASES = ("idle", "read", "dense_reference", "safelora", "build_subspace", "csulora")


def run_all(work: SyntheticWorkdir, args: argparse.Namespace, with_api: bool) -> list[dict[str, Any]]:
    chosen = set(args.cases.split(",")) if args.cases else set(ALL_CASES)
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
    """Previous runs with each (case, layers) measured again replaced in place by the new one."""
    fresh = {(r["case"], r["layers"]): r for r in new}
    merged = [fresh.pop((r["case"], r["layers"]), r) for r in previous]
    return merged + list(fresh.values())


# --------------------------------------------------------------------------- analysis


def _find(runs: list[dict[str, Any]], case: str, layers: int) -> dict[str, Any] | None:
    for run in runs:
        if run["case"] == case and run["layers"] == layers:
            return run
    return None


def _linear_slope(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else None


def reference_slope(ref: dict[str, Any], full_layers: int) -> dict[str, Any]:
    """Per-layer time and memory of the dense reference, and what that means at full depth.

    Memory: the reference only grows (it keeps weights and C for every layer), so the
    per-layer slope is the fitted growth of RssAnon over the load checkpoints plus over
    the C checkpoints. Time: its whole wall time divided by its depth (all phases are
    linear in the layer count).
    """
    cps = ref["checkpoints"]
    slopes = []
    for phase in ("load", "projection_matrices"):
        points = [(cp["layer"], cp["rss_anon_bytes"]) for cp in cps if cp["phase"] == phase]
        slope = _linear_slope([p[0] for p in points], [p[1] for p in points])
        if slope is not None:
            slopes.append(slope)
    depth = ref["layers"]
    mem_slope = sum(slopes) if len(slopes) == 2 else (ref["peak_rss_anon_bytes"] - ref["rss_anon_after_imports_bytes"]) / depth
    time_slope = ref["wall_s"] / depth
    floor = ref["rss_anon_after_imports_bytes"]
    return {
        "layers": depth,
        "seconds_per_layer": round(time_slope, 3),
        "rss_anon_bytes_per_layer": int(mem_slope),
        "extrapolated": {
            str(n): {"wall_s": round(time_slope * n, 1), "peak_rss_anon_bytes": int(floor + mem_slope * n)}
            for n in sorted({full_layers, 32})
        },
    }


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator:
        return None
    return round(numerator / denominator, 2)


def summarize(runs: list[dict[str, Any]], ref_layers: int, layers: int) -> dict[str, Any]:
    summary: dict[str, Any] = {"targets": TARGETS}
    ref = _find(runs, "dense_reference", ref_layers)
    if ref is not None:
        summary["dense_reference_slope"] = reference_slope(ref, layers)
    ratios: dict[str, Any] = {}
    safelora = _find(runs, "safelora", ref_layers)
    if ref and safelora:
        ratios["safelora_speedup_vs_dense"] = _ratio(ref["wall_s"], safelora["wall_s"])
        ratios["safelora_speedup_vs_dense_cpu_time"] = _ratio(ref.get("cpu_s"), safelora.get("cpu_s"))
        ratios["safelora_memory_reduction_vs_dense"] = _ratio(
            ref["peak_rss_anon_bytes"], safelora["peak_rss_anon_bytes"]
        )
        ratios["safelora_memory_reduction_vs_dense_above_imports"] = _ratio(
            ref["peak_rss_anon_bytes"] - ref["rss_anon_after_imports_bytes"],
            safelora["peak_rss_anon_bytes"] - safelora["rss_anon_after_imports_bytes"],
        )
    for depth in sorted({ref_layers, layers}):
        read, cs, build = (_find(runs, c, depth) for c in ("read", "csulora", "build_subspace"))
        if read and cs:
            ratios[f"csulora_time_over_read_L{depth}"] = _ratio(cs["wall_s"], read["wall_s"])
        if read and build:
            ratios[f"build_subspace_time_over_read_L{depth}"] = _ratio(build["wall_s"], read["wall_s"])
        sl = _find(runs, "safelora", depth)
        if read and sl:
            ratios[f"safelora_time_over_read_L{depth}"] = _ratio(sl["wall_s"], read["wall_s"])
    for case in ("safelora", "csulora", "build_subspace", "read"):
        shallow, deep = _find(runs, case, ref_layers), _find(runs, case, layers)
        if shallow and deep and layers != ref_layers:
            ratios[f"{case}_peak_rss_growth_L{layers}_over_L{ref_layers}"] = _ratio(
                deep["peak_rss_anon_bytes"], shallow["peak_rss_anon_bytes"]
            )
    summary["ratios"] = ratios
    verdicts = {}
    if "safelora_speedup_vs_dense" in ratios and ratios["safelora_speedup_vs_dense"] is not None:
        verdicts["safelora_speedup_vs_dense"] = ratios["safelora_speedup_vs_dense"] >= TARGETS["safelora_speedup_vs_dense"]
    key = "safelora_memory_reduction_vs_dense"
    if ratios.get(key) is not None:
        verdicts[key] = ratios[key] >= TARGETS[key]
    for depth in sorted({ref_layers, layers}):
        key = f"csulora_time_over_read_L{depth}"
        if ratios.get(key) is not None:
            verdicts[key] = ratios[key] <= TARGETS["csulora_time_over_read"]
    summary["meets_target"] = verdicts
    return summary


def compare_reference_outputs(work: SyntheticWorkdir, depth: int) -> dict[str, Any] | None:
    """Do (a) and (b) write the same corrected adapter, and how close is each to exact?

    Same modules and keys; then, for every lora_B that either changed, the error of each
    against ``D (D^T B) / ||D||`` computed in float64 (relative to that tensor's max).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    dense = work.root / "outputs" / f"dense-L{depth}" / "adapter_model.safetensors"
    ours = work.root / "outputs" / f"safelora-L{depth}" / "adapter_model.safetensors"
    if not dense.exists() or not ours.exists():
        return None
    a, b = load_file(str(dense)), load_file(str(ours))
    original = load_file(str(work.adapter(depth) / "adapter_model.safetensors"))
    keys = sorted(set(a) & set(b))
    worst = 0.0
    changed = []
    for key in keys:
        if a[key].shape != b[key].shape:
            worst = float("inf")
            break
        diff = (a[key].double() - b[key].double()).abs().max().item()
        worst = max(worst, diff / max(a[key].double().abs().max().item(), 1e-30))
        if not (torch.equal(a[key], original[key]) and torch.equal(b[key], original[key])):
            changed.append(key)
    models = {which: work.model(which, depth) for which in ("base", "aligned")}
    index = json.loads((models["base"] / "model.safetensors.index.json").read_text())["weight_map"]
    error = {"dense_reference": 0.0, "ours": 0.0}
    for key in changed:
        weight = key.removeprefix("base_model.model.").removesuffix(".lora_B.weight") + ".weight"
        pair = {}
        for which, folder in models.items():
            with safe_open(str(folder / index[weight]), "pt") as handle:
                pair[which] = handle.get_tensor(weight).double()
        d = pair["aligned"] - pair["base"]
        del pair
        exact = d @ (d.T @ original[key].double()) / d.norm()
        scale = exact.abs().max().item()
        for label, written in (("dense_reference", a), ("ours", b)):
            err = (written[key].double() - exact).abs().max().item() / scale
            error[label] = max(error[label], err)
        del d, exact
    return {
        "common_keys": len(keys),
        "keys_only_in_one": len(set(a) ^ set(b)),
        "max_rel_diff": worst,
        "projected_lora_B": len(changed),
        "max_rel_error_vs_float64": error,
    }


# --------------------------------------------------------------------------- report


def _fmt_gib(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / GIB:.2f}"


def summary_markdown(results: dict[str, Any]) -> str:
    """The tables for docs/benchmarks.md, from a results JSON."""
    lines = [
        "| case | layers | wall time (s) | CPU time (s) | peak RssAnon (GiB) | RssAnon after imports (GiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for run in results["runs"]:
        lines.append(
            f"| {run['label']} | {run['layers']} | {run['wall_s']:.2f} | {run.get('cpu_s', float('nan')):.2f} "
            f"| {_fmt_gib(run['peak_rss_anon_bytes'])} "
            f"| {_fmt_gib(run['rss_anon_after_imports_bytes'])} |"
        )
    summary = results["summary"]
    lines += ["", "| ratio | measured | target | met |", "|---|---:|---:|:---:|"]
    goal = {
        "safelora_speedup_vs_dense": ">= 10",
        "safelora_memory_reduction_vs_dense": ">= 20",
    }
    for key, value in summary["ratios"].items():
        target = goal.get(key, "<= 2" if key.startswith("csulora_time_over_read") else "")
        met = summary["meets_target"].get(key)
        lines.append(f"| {key} | {value} | {target} | {'' if met is None else ('yes' if met else 'no')} |")
    slope = summary.get("dense_reference_slope")
    if slope:
        lines += [
            "",
            f"Dense reference slope: {slope['seconds_per_layer']} s and "
            f"{_fmt_gib(slope['rss_anon_bytes_per_layer'])} GiB private memory per layer; extrapolated: "
            + ", ".join(
                f"{n} layers ~ {v['wall_s']} s / {_fmt_gib(v['peak_rss_anon_bytes'])} GiB"
                for n, v in slope["extrapolated"].items()
            ),
        ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_correction", description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=12, help="depth of the synthetic pair (ours run here)")
    p.add_argument("--ref-layers", type=int, default=4, help="depth for the dense reference (must fit in RAM)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/csulora-bench"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/correction.json"))
    p.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints and outputs")
    p.add_argument("--reuse", action="store_true", help="reuse checkpoints already in --workdir")
    p.add_argument("--threads", type=int, default=2, help="torch threads in every case")
    p.add_argument("--cache", choices=("cold", "warm"), default="cold",
                   help="cold: evict the workdir from the page cache before each case (reads hit the disk)")
    p.add_argument("--sample-interval", type=float, default=0.01, help="seconds between /proc samples")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--cases", default="", help=f"comma list of cases to run (default all: {','.join(ALL_CASES)})")
    p.add_argument("--update", action="store_true",
                   help="merge into an existing --out: re-measured (case, layers) replace the old rows")
    p.add_argument("--in-process", action="store_true",
                   help="run cases in this interpreter (smoke tests only: memory then includes the caller)")
    p.add_argument("--skip-api", action="store_true", help="measure only (a) and (d)")
    p.add_argument("--reference-mode", choices=("number", "threshold"), default="number")
    p.add_argument("--num-proj-layers", type=int, default=10)
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
    unknown = set(filter(None, args.cases.split(","))) - set(ALL_CASES)
    if unknown:
        raise SystemExit(f"--cases: unknown {', '.join(sorted(unknown))} (known: {', '.join(ALL_CASES)})")
    shape = ModelShape(args.hidden, args.intermediate, args.layers, args.vocab, args.heads)
    with_api = not args.skip_api and api_available()
    if not with_api and not args.skip_api:
        print("[bench] csulora.api not available: measuring (a) and (d) only", flush=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    load_before = load_average()
    command = "python -m benchmarks.bench_correction " + " ".join(argv if argv is not None else sys.argv[1:])

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
        runs = merge_runs(previous.get("runs", []), run_all(work, args, with_api))
        results = {
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
            "api_measured": with_api,
            "generate_s": None if generate_s is None else round(generate_s, 2),
            "disk_bytes_pair": sum(f.stat().st_size for f in (args.workdir / "full").rglob("*.safetensors")),
            "runs": runs,
            "summary": summarize(runs, args.ref_layers, args.layers),
            "reference_vs_ours": compare_reference_outputs(work, args.ref_layers)
            or previous.get("reference_vs_ours"),
        }
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(summary_markdown(results))
    print(f"[bench] results written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
