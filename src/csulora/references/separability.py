"""Separability of a task from harm, from a calibration file alone (issue 24; docs/design.md §5c).

For every statistics group of a ``csulora calibrate`` file, the share of an isotropic update's
action the calibrated correction keeps on task inputs and on harmful inputs at one strength
(:func:`csulora.linalg.gram.isotropic_kept`); then the medians over groups and per decoder
layer. A world whose task sits next to harm keeps less of its task for the same harmful share
removed. The numbers are update-independent: they need no adapter. ``benchmarks.separability``
is its command line; ``csulora demo`` reports it for the demo world's own statistics.
"""

from __future__ import annotations

import os
import statistics
from typing import Any

from csulora.io.calibration_file import load_calibration
from csulora.io.checkpoints import layer_index
from csulora.linalg.gram import DEFAULT_MU, isotropic_kept
from csulora.methods.calibrated import CalibratedConfig


def separability(path: str | os.PathLike, strength: float | None = None, mu: float = DEFAULT_MU) -> dict[str, Any]:
    """Per group and per layer kept shares, and their medians (``strength``: the method's default)."""
    strength = CalibratedConfig().strength if strength is None else strength
    stats = load_calibration(path, groups_in_memory=1)
    try:
        groups = {}
        for group, modules in statistics_groups(stats.modules).items():
            task, harmful = isotropic_kept(stats.module(modules[0]), strength, mu)
            groups[group] = {"modules": modules, "task_kept": task, "harmful_kept": harmful,
                             "layer": layer_index(modules[0])}  # fmt: skip
    finally:
        stats.close()
    return {
        "calibration": str(path), "strength": strength, "mu": mu, "groups": groups,
        "median_task_kept": statistics.median(g["task_kept"] for g in groups.values()),
        "median_harmful_kept": statistics.median(g["harmful_kept"] for g in groups.values()),
        "per_layer": per_layer_medians(groups),
    }  # fmt: skip


def statistics_groups(module_groups: dict[str, str]) -> dict[str, list[str]]:
    """Group name -> its modules, from a file's module -> group map."""
    found: dict[str, list[str]] = {}
    for module, group in module_groups.items():
        found.setdefault(group, []).append(module)
    return found


def per_layer_medians(groups: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Decoder layer (as a string key, in layer order) -> the medians of its groups' kept shares."""
    layers: dict[int, dict[str, list[float]]] = {}
    for record in groups.values():
        if record["layer"] is not None:
            entry = layers.setdefault(record["layer"], {"task_kept": [], "harmful_kept": []})
            for key in ("task_kept", "harmful_kept"):
                entry[key].append(record[key])
    return {str(k): {key: statistics.median(v) for key, v in entry.items()} for k, entry in sorted(layers.items())}
