"""What the correction benchmark's runs mean: ratios, targets, agreement, tables.

Pure functions of the runs' JSON records (plus, for :func:`compare_reference_outputs`,
the adapters the cases wrote), so a results file can be re-summarised without re-running.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from benchmarks.correction.synth import SyntheticWorkdir

TARGETS = {
    "safelora_speedup_vs_dense": 10.0,  # (b) at least 10x faster than (a)
    "safelora_memory_reduction_vs_dense": 20.0,  # (b) at least 20x less peak RAM than (a)
    "csulora_time_over_read": 2.0,  # (c) within 2x of (d)
}
GIB = 1024**3


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


# --------------------------------------------------------------------------- floor suite

FLOOR_TARGETS = {
    "correct_cpu_over_floor": 1.3,  # every `csulora correct` within 1.3x the read floor's CPU
    "subspace_cpu_over_floor": 10.0,  # `csulora subspace` within 10x
    "rss_growth": 1.10,  # peak RssAnon at --layers within 10% of --ref-layers'
    "energy_error": 1e-3,  # captured energy within 1e-3 of the exact SVD's on every module
    "calibration_over_forward": 2.0,  # calibrate's statistics pass within 2x a plain forward
}
CORRECT_CASES = ("cli_safelora", "cli_csulora", "cli_resta")
FLOOR_CASE = "read"


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": _median(values), "min": min(values), "max": max(values)}


def _cpu(run: dict[str, Any]) -> float:
    """Whole-process CPU seconds; in-process runs (smoke tests) only have the case's own."""
    value = run.get("process_cpu_s")
    return float(run["cpu_s"] if value is None else value)


def case_stats(runs: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    """``stats[case][layers]``: runs, CPU / wall / peak RssAnon as median, min, max, and the load."""
    grouped: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for run in runs:
        grouped.setdefault((run["case"], run["layers"]), []).append(run)
    stats: dict[str, dict[int, dict[str, Any]]] = {}
    for (case, layers), group in grouped.items():
        loads = [r["load_before"][0] for r in group if r.get("load_before")]
        stats.setdefault(case, {})[layers] = {
            "label": group[0]["label"],
            "runs": len(group),
            "cpu_s": _spread([_cpu(r) for r in group]),
            "wall_s": _spread([float(r["process_wall_s"]) for r in group]),
            "peak_rss_anon_bytes": _spread([float(r["peak_rss_anon_bytes"]) for r in group]),
            "load_1min": [min(loads), max(loads)] if loads else None,
        }
    return stats


def summarize_floor(runs: list[dict[str, Any]], depths: list[int]) -> dict[str, Any]:
    """Ratios to the read floor (medians of the runs), memory growth with depth, accuracy, verdicts."""
    stats = case_stats(runs)
    ratios: dict[str, float | None] = {}
    verdicts: dict[str, bool] = {}
    floor = stats.get(FLOOR_CASE, {})
    for case, by_depth in stats.items():
        for depth, row in by_depth.items():
            if case == FLOOR_CASE or depth not in floor or case in ("subspace_accuracy", "calibration_pass"):
                continue
            ratio = _ratio(row["cpu_s"]["median"], floor[depth]["cpu_s"]["median"])
            key = f"{case}_cpu_over_floor_L{depth}"
            ratios[key] = ratio
            target = FLOOR_TARGETS["correct_cpu_over_floor"] if case in CORRECT_CASES else (
                FLOOR_TARGETS["subspace_cpu_over_floor"] if case == "cli_subspace" else None)
            if target is not None and ratio is not None:
                verdicts[key] = ratio <= target
    if len(depths) > 1:
        shallow, deep = depths[0], depths[-1]
        for case, by_depth in stats.items():
            if case in ("published_safelora", "subspace_accuracy", "calibration_pass") or not {shallow, deep} <= set(by_depth):
                continue
            key = f"{case}_rss_growth_L{deep}_over_L{shallow}"
            ratios[key] = _ratio(
                by_depth[deep]["peak_rss_anon_bytes"]["median"], by_depth[shallow]["peak_rss_anon_bytes"]["median"]
            )
            if case != FLOOR_CASE and ratios[key] is not None:
                verdicts[key] = ratios[key] <= FLOOR_TARGETS["rss_growth"]
    accuracy = next((r for r in runs if r["case"] == "subspace_accuracy"), None)
    if accuracy is not None:
        ratios["max_abs_energy_error"] = accuracy["max_abs_error"]
        verdicts["max_abs_energy_error"] = accuracy["max_abs_error"] <= FLOOR_TARGETS["energy_error"]
    calibration = next((r for r in runs if r["case"] == "calibration_pass"), None)
    if calibration is not None:
        ratios["calibration_statistics_over_forward"] = calibration["statistics_over_forward"]
        verdicts["calibration_statistics_over_forward"] = (
            calibration["statistics_over_forward"] <= FLOOR_TARGETS["calibration_over_forward"]
        )
    return {"targets": FLOOR_TARGETS, "stats": stats, "ratios": ratios, "meets_target": verdicts}


def compare_published_outputs(work: SyntheticWorkdir, depth: int) -> dict[str, Any] | None:
    """Did the published code and ``csulora correct --method safelora`` project the same
    modules and write the same ``lora_B`` (largest absolute and relative difference)?"""
    from safetensors.torch import load_file

    theirs_file = work.root / "outputs" / f"published-L{depth}" / "lora_B.safetensors"
    ours_file = work.root / "outputs" / f"safelora-L{depth}" / "adapter_model.safetensors"
    if not theirs_file.exists() or not ours_file.exists():
        return None
    original = load_file(str(work.adapter(depth) / "adapter_model.safetensors"))
    ours, theirs = load_file(str(ours_file)), load_file(str(theirs_file))
    keys = sorted(theirs)
    projected = {"ours": set(), "published": set()}
    max_abs = max_rel = 0.0
    for module in keys:
        key = f"{module}.lora_B.weight"
        a, b, before = ours[key].double(), theirs[module].double(), original[key].double()
        if not torch.equal(a, before):
            projected["ours"].add(module)
        if not torch.equal(b, before):
            projected["published"].add(module)
        max_abs = max(max_abs, float((a - b).abs().max()))
        max_rel = max(max_rel, float((a - b).norm() / b.norm().clamp_min(1e-30)))
    return {
        "modules": len(keys),
        "projected_ours": len(projected["ours"]),
        "projected_published": len(projected["published"]),
        "same_modules_projected": projected["ours"] == projected["published"],
        "max_abs_diff_lora_B": max_abs,
        "max_rel_diff_lora_B": max_rel,
    }


def floor_markdown(results: dict[str, Any]) -> str:
    """The floor suite's tables for docs/benchmarks.md, from a results JSON."""
    summary = results["summary"]
    stats, ratios = summary["stats"], summary["ratios"]
    lines = [
        "| run | layers | runs | CPU s, median (min-max) | x floor | wall s, median | peak RssAnon GiB, median (max) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for case, by_depth in stats.items():
        if case in ("subspace_accuracy", "calibration_pass"):
            continue
        for depth in sorted(by_depth):
            row = by_depth[depth]
            cpu, rss = row["cpu_s"], row["peak_rss_anon_bytes"]
            ratio = ratios.get(f"{case}_cpu_over_floor_L{depth}")
            lines.append(
                f"| {row['label']} | {depth} | {row['runs']} | {cpu['median']:.1f} ({cpu['min']:.1f}-{cpu['max']:.1f}) "
                f"| {'1.00' if case == FLOOR_CASE else ('-' if ratio is None else f'{ratio:.2f}')} "
                f"| {row['wall_s']['median']:.1f} | {rss['median'] / GIB:.2f} ({rss['max'] / GIB:.2f}) |"
            )
    lines += ["", "| target | measured | met |", "|---|---:|:---:|"]
    for key, value in ratios.items():
        met = summary["meets_target"].get(key)
        lines.append(f"| {key} | {value} | {'' if met is None else ('yes' if met else 'no')} |")
    published = results.get("published_vs_ours")
    if published:
        lines += ["", "Published vs ours (Safe LoRA, number mode): " + json.dumps(published)]
    return "\n".join(lines)
