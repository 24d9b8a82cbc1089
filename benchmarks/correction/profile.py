"""Where a command's time went, from a py-spy profile: ``python -m benchmarks.correction.profile FILE``.

FILE is py-spy's raw (collapsed-stack) output of one command, for example::

    py-spy record -r 50 -f raw -o safelora.txt -- python -m csulora correct ADAPTER -o OUT \\
        --method safelora --base BASE --aligned ALIGNED

(``pip install py-spy``; it is a measuring tool, not a dependency.) py-spy samples only
threads that are running, so the shares are of CPU time, not of waiting. The table gives
each phase's inclusive share of the samples: imports (every frame under the import
machinery), then csulora's and torch's functions that matter at 7B shapes; a phase
nested in another counts in both.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

# (label, frame pattern): a sample counts for a phase when any frame of its stack matches.
# py-spy names a method Class.method, so patterns allow an optional class prefix.
_M = r"^(\w+\.)?"
PHASES: tuple[tuple[str, str], ...] = (
    ("imports (torch and the rest)", r"^_find_and_load "),
    ("read_displacement: D from the pair", _M + r"read_displacement "),
    ("  NaN/Inf checks of the inputs", _M + r"check_finite "),
    ("compute_subspace (all of it)", _M + r"compute_subspace "),
    ("  randomized SVD", _M + r"_randomized_svd "),
    ("  products D @ X", _M + r"dense_matmul "),
    ("  products D^T @ Y", _M + r"dense_t_matmul "),
    ("  ||D|| (row norms)", _M + r"dense_frobenius_norm "),
    ("  NaN/Inf check of D", _M + r"dense_is_finite "),
    ("method: per-module math", _M + r"(correct_module|_measure|_finish) "),
    ("  Safe LoRA C B = D (D^T B) / ||D||", _M + r"_compute_projected_B "),
    ("read_adapter", _M + r"read_adapter "),
    ("write_adapter", _M + r"write_adapter "),
    ("subspace cache (save/load)", _M + r"(save_subspace_cache|load_subspace_cache|get) \(csulora/io/subspace_cache"),
    ("calibration: plain forward (the reference)", _M + r"plain_forward "),
    ("calibration: statistics pass (all of it)", _M + r"(accumulate_sums|statistics_pass) "),
    ("  float64 sums allocated", _M + r"(__init__ \(csulora/calibration|take \(csulora/references/calibration)"),
    ("  Gram strips x^T x added to the sums", _M + r"add_upper_gram_ "),
    ("  upper triangle mirrored (unpacked)", _M + r"(mirror_upper_|unpack_symmetric) "),
    # native leaf frames (py-spy --native), every thread of the process: where a sample was
    # taken, not what called it ("leaf:" patterns match the innermost frame only)
    ("at a GEMM zeroing its output: first touch of fresh pages (sgemm_mscale)", r"leaf:sgemm_mscale"),
    ("in an OpenMP thread waiting for work or at a barrier (libgomp)", r"leaf:\(libgomp"),
)


def phase_shares(lines: list[str]) -> tuple[int, dict[str, float]]:
    """Total samples and each phase's inclusive share (0-1)."""
    patterns = [(label, re.compile(pattern.removeprefix("leaf:")), pattern.startswith("leaf:")) for label, pattern in PHASES]
    counts: Counter[str] = Counter()
    total = 0
    for line in lines:
        stack, _, number = line.rstrip().rpartition(" ")
        if not stack or not number.isdigit():
            continue
        samples = int(number)
        total += samples
        frames = stack.split(";")
        for label, pattern, leaf in patterns:
            if any(pattern.search(frame) for frame in (frames[-1:] if leaf else frames)):
                counts[label] += samples
    return total, {label: counts[label] / total if total else 0.0 for label, _ in PHASES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.correction.profile", description=__doc__.split("\n")[0])
    parser.add_argument("profiles", nargs="+", type=Path, help="py-spy raw outputs (-f raw)")
    args = parser.parse_args(argv)
    results = {path.stem: phase_shares(path.read_text().splitlines()) for path in args.profiles}
    names = list(results)
    print("| phase | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for label, _ in PHASES:
        cells = [f"{100 * results[name][1][label]:.0f} %" if results[name][1][label] else "-" for name in names]
        if any(cell != "-" for cell in cells):
            print(f"| {label} | " + " | ".join(cells) + " |")
    print("| samples | " + " | ".join(str(results[name][0]) for name in names) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
