"""asr_utility.png: a marker and colour per row, labels that never collide (issue 13)."""

from __future__ import annotations

from csulora.demo.plot import dodge, plot_demo


def _plot_row(name, utility, asr, **extra):
    return {"name": name, "utility": utility, "asr": asr, "asr_ci": [max(0.0, asr - 0.05), min(1.0, asr + 0.05)], **extra}


def test_plot_gives_every_row_its_own_marker_and_labels_never_collide(tmp_path):
    """issue 13: row markers reused the curves' colours, overlapping points and labels hid each other."""
    # Crowded on purpose: rows on top of each other (an unchanged row on the attacked one,
    # several at 0/0) and sweep points on the rows and on each other.
    rows = [
        _plot_row("base", 0.0, 0.9), _plot_row("aligned", 0.0, 0.0), _plot_row("attacked", 0.93, 0.95),
        _plot_row("safelora-default", 0.93, 0.95), _plot_row("safelora", 0.1, 0.05),
        _plot_row("csulora", 0.0, 0.0), _plot_row("scale", 0.93, 0.95, same_as="attacked"),
        _plot_row("resta", 0.5, 0.0, recommended=True), _plot_row("csulora+restore", 0.0, 0.01),
    ]

    def sweep(knob, points):
        return {"knob": knob, "points": [{knob: v, "test": {"utility": u, "asr": a}} for v, u, a in points]}

    sweeps = {
        "safelora": sweep("threshold", [(0.1, 0.93, 0.95), (0.2, 0.9, 0.9), (0.3, 0.1, 0.05), (0.4, 0.0, 0.0)]),
        "csulora": sweep("gamma", [(0.5, 0.92, 0.95), (1, 0.9, 0.93), (2, 0.85, 0.9), (4, 0.5, 0.6), (8, 0.0, 0.0)]),
        "scale": sweep("factor", [(1.0, 0.93, 0.95), (0.7, 0.9, 0.9), (0.5, 0.6, 0.5), (0.3, 0.1, 0.05)]),
        "resta": sweep("restore", [(0, 0.93, 0.95), (0.5, 0.9, 0.6), (1, 0.7, 0.2), (1.5, 0.5, 0.0), (2, 0.3, 0.0)]),
        "csulora+restore": sweep("gamma", [(0, 0.5, 0.0), (1, 0.3, 0.0), (4, 0.0, 0.01), (16, 0.0, 0.0)]),
    }
    layout = plot_demo(tmp_path / "p.png", rows, sweeps, list(sweeps))
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    styles = layout["styles"]
    assert list(styles) == [r["name"] for r in rows]
    assert len({marker for marker, _ in styles.values()}) == len(rows)  # a shape per row
    assert len({tuple(colour) for _, colour in styles.values()}) == len(rows)  # and a colour per row
    boxes = layout["labels"]
    assert len(boxes) >= layout["label_count"] // 2  # most values still get a label
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), (a, b)


def test_coincident_rows_are_spread_apart():
    offsets = dodge([(0.93, 0.95), (0.5, 0.5), (0.93, 0.95), (0.931, 0.951)])
    assert offsets[1] == 0.0
    spread = sorted(offsets[i] for i in (0, 2, 3))
    assert spread[0] < 0 < spread[2] and spread[1] == 0.0
