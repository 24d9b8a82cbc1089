"""Separability of a world's task from harm, from its calibration file alone (issue 24).

The command line of :func:`csulora.references.separability.separability`: for every statistics
group of a ``csulora calibrate`` file, the share of an isotropic update's action the calibrated
correction keeps on task inputs and on harmful inputs at the default strength; then the medians
over groups and per decoder layer, written under a name into a JSON file.

    python -m benchmarks.separability --calibration .cache/smol/calibration/calibration.safetensors \
        --name date --json benchmarks/results/separability.json
    make demo && python -m benchmarks.separability --calibration demo-out/calibration.safetensors \
        --name demo --json benchmarks/results/separability.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from csulora.references.separability import separability


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
