"""What `tune` writes beside the chosen adapter: tune.json (every number) and tune.png.

tune.json is the record a reviewer reads to trust the choice: each setting's scores with
their intervals, the aligned model's and the uncorrected adapter's scores on the same
prompts, each setting's verdict with its reasons, and the choice. tune.png shows the
same sweep as ASR against utility, one curve per harmful source, the choice marked.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from csulora.tuning.config import TuneConfig
from csulora.tuning.selection import ScoredSetting, Selection, SettingScores

SCHEMA = "csulora.tune/1"


def tune_record(
    *,
    config: TuneConfig,
    settings: Sequence[ScoredSetting],
    aligned: SettingScores,
    adapter: SettingScores | None,
    selection: Selection,
    inputs: Mapping[str, Any],
    datasets: Mapping[str, Any],
    timing: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The JSON-ready record of one sweep (schema ``csulora.tune/1``)."""
    rows = []
    for setting, verdict in zip(settings, selection.verdicts, strict=True):
        rows.append(
            {
                "value": setting.value,
                "params": config.setting_options(setting.value),
                "scores": setting.scores.to_dict(),
                "verdict": verdict.to_dict(),
                "chosen": selection.chosen is not None and setting.value == selection.chosen,
            }
        )
    return {
        "schema": SCHEMA,
        "inputs": dict(inputs),
        "config": config.to_dict(),
        "datasets": dict(datasets),
        "aligned": aligned.to_dict(),
        "adapter": adapter.to_dict() if adapter is not None else None,
        "settings": rows,
        "choice": {
            **selection.to_dict(),
            "params": config.setting_options(selection.chosen) if selection.chosen is not None else None,
        },
        "timing_s": dict(timing or {}),
    }


def write_tune_json(path: str | Path, record: Mapping[str, Any]) -> Path:
    path = Path(path)
    path.write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
    return path


def plot_sweep(
    path: str | Path,
    *,
    config: TuneConfig,
    settings: Sequence[ScoredSetting],
    aligned: SettingScores,
    adapter: SettingScores | None,
    selection: Selection,
) -> Path:
    """ASR (one curve per harmful source) against utility per setting, the choice marked.

    Without task scores the x axis is the knob itself, so the plot still shows how the
    ASR falls along the sweep.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_label, xs, x_ref = _x_axis(config, settings, adapter)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, source in enumerate(aligned.asr):
        color = colors[i % len(colors)]
        ys = [s.scores.asr[source].value for s in settings]
        ax.plot(xs, ys, "o-", color=color, label=f"{source} (n={aligned.asr[source].n})")
        ax.axhline(aligned.asr[source].value, color=color, linestyle="--", linewidth=1, alpha=0.7)
        if adapter is not None and x_ref is not None and source in adapter.asr:
            ax.plot([x_ref], [adapter.asr[source].value], "x", color=color, markersize=9)
        if selection.index is not None:
            ax.plot([xs[selection.index]], [ys[selection.index]], "*", color=color, markersize=18,
                    markeredgecolor="black")
    for (x, top), values in _labels_by_point(xs, settings, aligned).items():
        ax.annotate(", ".join(values), (x, top), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    if selection.chosen is not None:
        chosen = f"chosen: {config.knob}={selection.chosen:g} (star)"
    else:
        chosen = "no setting qualifies"
    ax.set_title(f"csulora tune: {config.method} {config.knob} sweep; {chosen}", fontsize=10)
    ax.set_xlabel(x_label)
    ax.set_ylabel("keyword ASR (dashed: aligned model; x: uncorrected adapter)", fontsize=9)
    ax.set_ylim(-0.05, 1.1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _labels_by_point(
    xs: Sequence[float], settings: Sequence[ScoredSetting], aligned: SettingScores
) -> dict[tuple[float, float], list[str]]:
    """Knob values to write above each x; settings at the same x share one label."""
    groups: dict[float, tuple[float, list[str]]] = {}
    for x, s in zip(xs, settings):
        top = max(s.scores.asr[name].value for name in aligned.asr)
        old_top, values = groups.get(round(x, 6), (top, []))
        groups[round(x, 6)] = (max(old_top, top), values + [f"{s.value:g}"])
    return {(x, top): values for x, (top, values) in groups.items()}


def _x_axis(
    config: TuneConfig, settings: Sequence[ScoredSetting], adapter: SettingScores | None
) -> tuple[str, list[float], float | None]:
    exact_all_zero = all(s.scores.utility is not None and s.scores.utility.value == 0 for s in settings)
    if exact_all_zero and all(s.scores.task_loglik is not None for s in settings):
        # Exact match says nothing here; the log-likelihood is what the utility check used.
        xs = [s.scores.task_loglik for s in settings]
        ref = adapter.task_loglik if adapter is not None else None
        return "mean log-likelihood of the task answers", xs, ref
    if all(s.scores.utility is not None for s in settings):
        xs = [s.scores.utility.value for s in settings]
        ref = adapter.utility.value if adapter is not None and adapter.utility is not None else None
        return "task exact match (utility)", xs, ref
    return f"{config.method} {config.knob}", [s.value for s in settings], None
