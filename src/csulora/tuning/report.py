"""What `tune` writes beside the chosen adapter: tune.json (every number) and tune.png.

tune.json is the record a reviewer reads to trust the choice: each setting's scores with
their intervals, the aligned model's and the uncorrected adapter's scores on the same
prompts, each setting's verdict with every condition (its number, the reference, the
bound, whether it held), and the choice. With ``--method all`` the settings of every
method are listed, each row naming its method. tune.png shows the sweep as ASR against
utility: one curve per harmful source for one method, one curve per method (worst-source
ASR) for ``all``; the choice is starred.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from csulora.io.jsonl import write_jsonl
from csulora.tuning.config import TuneConfig
from csulora.tuning.scores import ScoredSetting, SettingScores
from csulora.tuning.selection import MethodSweep, Selection

# /3: settings scored lazily (issue 21) carry "early"/"reached" and their verdicts "not_reached" and
# "decided_early"; timings moved to the run record (run.json), so tune.json is the same on a rerun.
SCHEMA = "csulora.tune/3"
# The plot's x axis: the measure the utility check used.
LOGLIK_AXIS = "mean log-likelihood of the task answers"
EXACT_MATCH_AXIS = "task exact match (utility)"


def tune_record(
    *,
    config: TuneConfig,
    sweeps: Sequence[MethodSweep],
    aligned: SettingScores,
    adapter: SettingScores | None,
    selection: Selection,
    inputs: Mapping[str, Any],
    datasets: Mapping[str, Any],
) -> dict[str, Any]:
    """The JSON-ready record of one run (schema ``csulora.tune/2``).

    ``settings`` lists every scored setting, method by method and weakest first, in the
    order of ``selection.verdicts``; ``choice.index`` points into it.
    """
    pairs = [(sweep.config, setting) for sweep in sweeps for setting in sweep.settings]
    rows = []
    for i, ((method_config, setting), verdict) in enumerate(zip(pairs, selection.verdicts, strict=True)):
        rows.append(
            {
                "method": method_config.method,
                "knob": method_config.knob,
                "value": setting.value,
                "params": method_config.setting_options(setting.value),
                "scores": setting.scores.to_dict(),
                "verdict": verdict.to_dict(),
                "chosen": i == selection.index,
            }
        )
    chosen_config = pairs[selection.index][0] if selection.index is not None else None
    return {
        "schema": SCHEMA,
        "inputs": dict(inputs),
        "config": config.to_dict(),
        "methods": {sweep.config.method: sweep.config.to_dict() for sweep in sweeps},
        "datasets": dict(datasets),
        "aligned": aligned.to_dict(),
        "adapter": adapter.to_dict() if adapter is not None else None,
        "settings": rows,
        "choice": {
            **selection.to_dict(),
            "knob": chosen_config.knob if chosen_config is not None else None,
            "params": chosen_config.setting_options(selection.chosen) if chosen_config is not None else None,
        },
    }


def write_tune_json(path: str | Path, record: Mapping[str, Any]) -> Path:
    path = Path(path)
    path.write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
    return path


def write_answers(path: str | Path, answers: Sequence[Mapping[str, Any]]) -> Path:
    """Every answer a state's scoring read, one JSON object a line (``truncated``: a harmful answer
    stopped once its verdict was fixed, docs/design.md §10)."""
    return write_jsonl(path, (dict(a) for a in answers))


def plot_sweep(
    path: str | Path,
    *,
    config: TuneConfig,
    sweeps: Sequence[MethodSweep],
    aligned: SettingScores,
    adapter: SettingScores | None,
    selection: Selection,
) -> Path:
    """ASR against utility per setting, the choice starred.

    One method: one curve per harmful source, each setting labelled with its knob value.
    Several (``--method all``): one curve per method, of the worst source's ASR. Without
    task scores the x axis is the knob itself (one method) or the setting's position.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    flat = [s for sweep in sweeps for s in sweep.settings]
    chosen = flat[selection.index] if selection.index is not None else None
    # Only settings scored completely are points: one stopped at its first failed condition has
    # no full ASR or utility (tune.json lists it with what decided it).
    drawn = [MethodSweep(s.config, tuple(x for x in s.settings if x.scores.complete)) for s in sweeps]
    if len(sweeps) == 1:
        _plot_one_method(ax, colors, drawn[0], aligned, adapter, selection, chosen)
    else:
        _plot_methods(ax, colors, [s for s in drawn if s.settings], aligned, adapter, selection, chosen)
    ax.set_ylim(-0.05, 1.1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_one_method(ax, colors: Sequence[str], sweep: MethodSweep, aligned: SettingScores,
                     adapter: SettingScores | None, selection: Selection,
                     chosen: ScoredSetting | None) -> None:  # fmt: skip
    config, settings = sweep.config, sweep.settings
    x_label, xs, x_ref = _x_axis(config, settings, adapter)
    for i, source in enumerate(aligned.asr):
        color = colors[i % len(colors)]
        ys = [s.scores.asr[source].value for s in settings]
        ax.plot(xs, ys, "o-", color=color, label=f"{source} (n={aligned.asr[source].n})")
        ax.axhline(aligned.asr[source].value, color=color, linestyle="--", linewidth=1, alpha=0.7)
        if adapter is not None and x_ref is not None and source in adapter.asr:
            ax.plot([x_ref], [adapter.asr[source].value], "x", color=color, markersize=9)
        if chosen is not None and chosen in settings:
            k = settings.index(chosen)
            ax.plot([xs[k]], [ys[k]], "*", color=color, markersize=18, markeredgecolor="black")
    for (x, top), values in _labels_by_point(xs, settings, aligned).items():
        ax.annotate(", ".join(values), (x, top), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    chosen = f"chosen: {config.knob}={selection.chosen:g} (star)" if selection.chosen is not None else "no setting qualifies"
    ax.set_title(f"csulora tune: {config.method} {config.knob} sweep; {chosen}", fontsize=10)
    ax.set_xlabel(x_label)
    ax.set_ylabel("ASR (dashed: aligned model; x: uncorrected adapter)", fontsize=9)


def _plot_methods(ax, colors: Sequence[str], sweeps: Sequence[MethodSweep], aligned: SettingScores,
                  adapter: SettingScores | None, selection: Selection,
                  chosen: ScoredSetting | None) -> None:  # fmt: skip
    def worst(scores: SettingScores) -> float:
        return max(scores.asr[name].value for name in aligned.asr)

    every = [s for sweep in sweeps for s in sweep.settings]
    x_label, _, x_ref = _x_axis(None, every, adapter)
    for i, sweep in enumerate(sweeps):
        color = colors[i % len(colors)]
        _, xs, _ = _x_axis(None, sweep.settings, adapter, like=x_label)
        ys = [worst(s.scores) for s in sweep.settings]
        ax.plot(xs, ys, "o-", color=color, label=f"{sweep.config.method} ({sweep.config.knob})")
        if chosen is not None and chosen in sweep.settings:
            k = sweep.settings.index(chosen)
            ax.plot([xs[k]], [ys[k]], "*", color=color, markersize=18, markeredgecolor="black")
    ax.axhline(worst(aligned), color="black", linestyle="--", linewidth=1, alpha=0.7)
    if adapter is not None and x_ref is not None:
        ax.plot([x_ref], [worst(adapter)], "x", color="black", markersize=9)
    if selection.index is not None:
        chosen = f"chosen: {selection.verdicts[selection.index].label} (star)"
    else:
        chosen = "no setting qualifies"
    ax.set_title(f"csulora tune: every method; {chosen}", fontsize=10)
    ax.set_xlabel(x_label)
    ax.set_ylabel("worst-source ASR (dashed: aligned; x: adapter)", fontsize=9)


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
    config: TuneConfig | None,
    settings: Sequence[ScoredSetting],
    adapter: SettingScores | None,
    *,
    like: str | None = None,
) -> tuple[str, list[float], float | None]:
    """(label, x per setting, the adapter's x): the utility measure the check used, else the knob.

    ``like``: the label chosen for all settings together (``--method all``), so every
    method's curve uses the same axis. ``config`` None: no knob axis (its position instead).
    """
    exact_all_zero = all(s.scores.utility is not None and s.scores.utility.value == 0 for s in settings)
    if like == LOGLIK_AXIS or (like is None and exact_all_zero and all(s.scores.task_loglik is not None for s in settings)):
        # Exact match says nothing here; the log-likelihood is what the utility check used.
        xs = [s.scores.task_loglik for s in settings]
        ref = adapter.task_loglik if adapter is not None else None
        return LOGLIK_AXIS, xs, ref  # type: ignore[return-value]
    if like == EXACT_MATCH_AXIS or (like is None and all(s.scores.utility is not None for s in settings)):
        xs = [s.scores.utility.value for s in settings]  # type: ignore[union-attr]
        ref = adapter.utility.value if adapter is not None and adapter.utility is not None else None
        return EXACT_MATCH_AXIS, xs, ref
    if config is None:
        return "setting (weakest first)", [float(k) for k in range(len(settings))], None
    return f"{config.method} {config.knob}", [s.value for s in settings], None

