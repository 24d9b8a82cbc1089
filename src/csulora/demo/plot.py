"""asr_utility.png: ASR (the demo world's harmful test requests) against utility, one hollow marker shape and colour per
row, each sweep a thin curve with its knob values as labels placed so that they do not collide."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Distinct marker shapes, one per row (hollow, so coincident rows stay visible).
ROW_MARKERS = ("o", "s", "X", "v", "^", "D", "P", "h", "p", "<", ">", "d", "8", "H", "*")
# Candidate offsets (points) for a curve's value label, nearest first: the first that
# collides with no marker and no other label is used (a simple greedy repel).
LABEL_OFFSETS = tuple(
    (dx * r, dy * r) for r in (6, 12, 18) for dx, dy in ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1))
)
# Rows whose points coincide (within this much on both axes) are nudged apart horizontally.
COINCIDENT = 0.006
DODGE = 0.014


def row_styles(names: Sequence[str]) -> dict[str, tuple[str, Any]]:
    """One (marker, colour) per row: every row its own marker shape and (up to 20 rows) colour."""
    import matplotlib

    colours = list(matplotlib.colormaps["tab10"].colors) + list(matplotlib.colormaps["tab20b"].colors)
    return {name: (ROW_MARKERS[i % len(ROW_MARKERS)], colours[i % len(colours)]) for i, name in enumerate(names)}


def dodge(points: Sequence[tuple[float, float]]) -> list[float]:
    """x offsets that spread coincident points symmetrically (0 for a point on its own)."""
    offsets = [0.0] * len(points)
    done: set[int] = set()
    for i, (x, y) in enumerate(points):
        if i in done:
            continue
        group = [j for j, (u, v) in enumerate(points) if abs(u - x) <= COINCIDENT and abs(v - y) <= COINCIDENT]
        done.update(group)
        for k, j in enumerate(group):
            offsets[j] = (k - (len(group) - 1) / 2) * DODGE
    return offsets


def place_labels(ax, labels: Sequence[tuple[str, float, float, Any]], obstacles: Sequence[Any]) -> list[Any]:
    """Write each ``(text, x, y, colour)`` at the first offset where it overlaps no obstacle
    (display-space boxes of markers) and no label already placed; drop it when none is free.
    Returns the placed labels' boxes."""
    from matplotlib.transforms import Bbox

    renderer = ax.figure.canvas.get_renderer()
    axes_box = ax.get_window_extent(renderer)
    taken: list[Bbox] = list(obstacles)
    placed: list[Bbox] = []
    for text, x, y, colour in labels:
        artist = ax.annotate(text, (x, y), xytext=(0, 0), textcoords="offset points", fontsize=6.5, color=colour)
        for dx, dy in LABEL_OFFSETS:
            artist.set_position((dx, dy))
            artist.set_horizontalalignment("left" if dx >= 0 else "right")
            box = artist.get_window_extent(renderer).expanded(1.08, 1.15)
            inside = axes_box.contains(box.x0, box.y0) and axes_box.contains(box.x1, box.y1)
            if inside and not any(box.overlaps(other) for other in taken):
                taken.append(box)
                placed.append(box)
                break
        else:
            artist.remove()  # no free spot: the value is in report.md's sweep list anyway
    return placed


def draw_curve(ax, sweep: dict, colour: Any) -> list[tuple[str, float, float, Any]]:
    """One sweep's test points as a thin curve; returns its value labels ``(text, x, y, colour)``
    (points of one curve at the same spot share one label)."""
    knob, points = sweep["knob"], sweep["points"]
    xs = [p["test"]["utility"] for p in points]
    ys = [p["test"]["asr"] for p in points]
    ax.plot(xs, ys, "-", color=colour, alpha=0.45, linewidth=1.2, marker=".", markersize=4, zorder=1)
    merged: dict[tuple[float, float], list[str]] = {}
    for p, x, y in zip(points, xs, ys):
        merged.setdefault((round(x, 3), round(y, 3)), []).append(f"{p[knob]:g}")
    return [(f"{knob} " + ",".join(values), x, y, colour) for (x, y), values in merged.items()]


def plot_demo(path: Path, rows: Sequence[dict], sweeps: dict[str, dict], curves: Sequence[str]) -> dict[str, Any]:
    """ASR (the harmful test requests) against utility: one hollow marker shape and colour per row, each
    sweep as a thin curve in its row's colour with its knob values as labels placed so they
    do not collide. Returns the layout (row styles, label boxes) for checking."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.transforms import Bbox

    plotted = [r for r in rows if r["utility"] is not None and r["asr"] is not None]
    styles = row_styles([r["name"] for r in plotted])
    fig, ax = plt.subplots(figsize=(8.6, 5.0), dpi=120)
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    labels = [label for name in curves for label in draw_curve(ax, sweeps[name], styles.get(name, ("o", "0.5"))[1])]
    offsets = dodge([(r["utility"], r["asr"]) for r in plotted])
    for row, offset in zip(plotted, offsets):
        marker, colour = styles[row["name"]]
        lo, hi = row["asr_ci"]
        recommended = bool(row.get("recommended"))
        label = row["name"] + (" = attacked (unchanged)" if row.get("same_as") else "")
        label += " (recommended)" if recommended else ""
        ax.errorbar(
            row["utility"] + offset, row["asr"], yerr=[[row["asr"] - lo], [hi - row["asr"]]], fmt=marker,
            markersize=9 if recommended else 7.5, markerfacecolor="none", markeredgewidth=2.2 if recommended else 1.5,
            color=colour, ecolor=colour, elinewidth=0.9, capsize=2.5, label=label, zorder=3,
        )
    ax.set_xlabel("utility (date task exact match, test)")
    ax.set_ylabel("ASR (harmful test requests, ASR judge)")
    ax.set_title("Demo world: attack success vs task utility (bars: 95% intervals)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title="rows (test)",
              title_fontsize=8)
    fig.text(0.99, 0.01, "thin lines: each sweep's settings; rows at the same point are nudged apart",
             ha="right", va="bottom", fontsize=6.5, color="0.4")
    fig.tight_layout()
    fig.canvas.draw()  # final geometry first: labels are placed against it
    to_display = ax.transData.transform
    obstacles = []
    for row, offset in zip(plotted, offsets):
        cx, cy = to_display((row["utility"] + offset, row["asr"]))
        obstacles.append(Bbox.from_extents(cx - 7, cy - 7, cx + 7, cy + 7))
    placed = place_labels(ax, labels, obstacles)
    fig.savefig(path)
    plt.close(fig)
    return {"styles": styles, "labels": placed, "label_count": len(labels)}

