"""The audit's per-layer plot: how each decoder layer's update splits against the safety subspace."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from csulora.io.atomic import atomic_output_file
from csulora.io.checkpoints import layer_index


def plot_audit(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Stacked bars of rho_F/rho_P/rho_O per decoder layer (energy-weighted over its modules)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_layer: dict[int, list[float]] = {}
    for row in rows:
        layer = layer_index(row["module"])
        if layer is None or row.get("rho_F") is None:
            continue
        weight = (row.get("dw_norm") or 0.0) ** 2
        sums = per_layer.setdefault(layer, [0.0, 0.0, 0.0, 0.0])
        for i, key in enumerate(("rho_F", "rho_P", "rho_O")):
            sums[i] += weight * row[key]
        sums[3] += weight
    layers = sorted(per_layer)
    fractions = [[per_layer[layer][i] / per_layer[layer][3] if per_layer[layer][3] else 0.0 for layer in layers]
                 for i in range(3)]
    fig, ax = plt.subplots(figsize=(max(4.5, 0.3 * len(layers) + 2.0), 3.4))
    bottom = [0.0] * len(layers)
    for values, label, color in zip(fractions, ("rho_F (aligned)", "rho_P (partial)", "rho_O (off)"),
                                    ("#2b8cbe", "#a6bddb", "#e34a33")):
        ax.bar(layers, values, bottom=bottom, label=label, color=color)
        bottom = [b + v for b, v in zip(bottom, values)]
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("share of ||dW||^2")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=3, frameon=False)
    ax.set_title("adapter update vs safety subspace")
    fig.tight_layout()
    with atomic_output_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return Path(path)
