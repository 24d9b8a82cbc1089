"""Separability of a world's task from harm, from its calibration file alone (issue 24).

For every statistics group of a ``csulora calibrate`` file, the share of an isotropic update's
action the calibrated correction keeps on task inputs and on harmful inputs at the default
strength (:func:`csulora.linalg.gram.isotropic_kept`); then the medians over groups and per
decoder layer. A world whose task sits next to harm keeps less of its task for the same harmful
share removed. The numbers are update-independent: they need no adapter.

    python -m benchmarks.separability --calibration .cache/smol/calibration/calibration.safetensors \
        --name date --json benchmarks/results/separability.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from csulora.io.calibration_file import load_calibration
from csulora.io.checkpoints import layer_index
from csulora.linalg.gram import DEFAULT_MU, isotropic_kept
from csulora.methods.calibrated import CalibratedConfig


def separability(path: Path, strength: float | None = None, mu: float = DEFAULT_MU) -> dict[str, Any]:
    """Per group and per layer kept shares, and their medians (``strength``: the method's default)."""
    strength = CalibratedConfig().strength if strength is None else strength
    stats = load_calibration(path, groups_in_memory=1)
    try:
        groups = {}
        for group, modules in _groups(stats).items():
            task, harmful = isotropic_kept(stats.module(modules[0]), strength, mu)
            groups[group] = {"modules": modules, "task_kept": task, "harmful_kept": harmful,
                             "layer": layer_index(modules[0])}  # fmt: skip
    finally:
        stats.close()
    layers: dict[int, dict[str, list[float]]] = {}
    for record in groups.values():
        if record["layer"] is not None:
            entry = layers.setdefault(record["layer"], {"task_kept": [], "harmful_kept": []})
            for key in ("task_kept", "harmful_kept"):
                entry[key].append(record[key])
    return {
        "calibration": str(path), "strength": strength, "mu": mu, "groups": groups,
        "median_task_kept": statistics.median(g["task_kept"] for g in groups.values()),
        "median_harmful_kept": statistics.median(g["harmful_kept"] for g in groups.values()),
        "per_layer": {str(k): {key: statistics.median(v) for key, v in entry.items()} for k, entry in sorted(layers.items())},
    }  # fmt: skip


def _groups(stats: Any) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for module, group in stats.modules.items():
        found.setdefault(group, []).append(module)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.separability", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calibration", type=Path, action="append", required=True, help="a calibration file (repeat)")
    parser.add_argument("--name", action="append", help="a name per --calibration (default: the file's stem)")
    parser.add_argument("--strength", type=float, help="lambda (default: the calibrated method's default)")
    parser.add_argument("--json", type=Path, help="write (or update) the results here")
    args = parser.parse_args(argv)
    names = args.name or [p.stem for p in args.calibration]
    if len(names) != len(args.calibration):
        parser.error("give one --name per --calibration")
    results = json.loads(args.json.read_text()) if args.json is not None and args.json.exists() else {}
    for name, path in zip(names, args.calibration):
        results[name] = separability(path, args.strength)
        print(f"{name}: median task kept {results[name]['median_task_kept']:.3f}, "
              f"harmful kept {results[name]['median_harmful_kept']:.4f} (lambda {results[name]['strength']:g})")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
