"""What the randomized SVD's defaults cost and how exact they are, by spectrum (docs/benchmarks.md).

    python -m benchmarks.correction.spectra --shape 4096 4096 --out benchmarks/results/correction-spectra.json

For one 7B-shaped matrix per spectrum, the subspace of ``csulora subspace``'s defaults and of
the algorithm before issue 15 (10 extra columns, 4 rounds, no early stop, the whole sketch
in every round) are computed with :func:`csulora.linalg.subspace.compute_subspace`, and each is
compared with the exact SVD (the
eigenvalues of the float64 Gram): the captured energy's error, the rank kept, the CPU
seconds (one thread) and the work, counted as columns times products with D (a product's
cost is its width). Spectra:

- ``benchmark world``: the correction benchmark's displacement (rank 8 plus dense noise at
  a tenth of its entry size; :mod:`benchmarks.correction.synth`);
- ``power law i^-1/2``: a slowly decaying spectrum, k at the cap;
- ``noise``: a Gaussian matrix (Marchenko-Pastur spectrum), the slowest to converge.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.correction.cases import exact_squared_singular_values
from benchmarks.correction.synth import DisplacementSpec, displacement

BEFORE = {"oversample": 10, "power_iterations": 4, "power_tolerance": 0.0}  # the defaults until issue 15


def _whole_sketch(DtQ: torch.Tensor, Q: torch.Tensor, total_energy: float, config) -> tuple:
    """``subspace._narrowed`` as it was before issue 15: every round on the whole sketch."""
    return torch.linalg.eigvalsh(DtQ.T @ DtQ).flip(0).clamp_min(0.0), Q, DtQ


def spectrum_matrix(kind: str, m: int, n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if kind == "benchmark world":
        return displacement((m, n), DisplacementSpec(), generator)
    if kind == "noise":
        return torch.randn(m, n, generator=generator)
    if kind == "power law i^-1/2":
        r = min(m, n)
        U, _ = torch.linalg.qr(torch.randn(m, r, generator=generator))
        V, _ = torch.linalg.qr(torch.randn(n, r, generator=generator))
        sigma = torch.arange(1, r + 1, dtype=torch.float32) ** -0.5
        return (U * sigma) @ V.T
    raise ValueError(kind)


def measure(D: torch.Tensor, options: dict, squared_exact: torch.Tensor, *, before: bool = False) -> dict:
    import csulora.linalg.subspace as subspace

    work = {"columns x products": 0}
    originals = subspace.dense_matmul, subspace.dense_t_matmul, subspace._narrowed

    def counted(product):
        def wrapper(matrix, other):
            work["columns x products"] += int(other.shape[1])
            return product(matrix, other)

        return wrapper

    subspace.dense_matmul, subspace.dense_t_matmul = (counted(p) for p in originals[:2])
    if before:
        subspace._narrowed = _whole_sketch
    try:
        start = time.process_time()
        sub = subspace.compute_subspace(D, subspace.SubspaceConfig(algorithm="randomized", **options))
        cpu = time.process_time() - start
    finally:
        subspace.dense_matmul, subspace.dense_t_matmul, subspace._narrowed = originals
    exact = float(squared_exact[: sub.rank].sum() / squared_exact.sum())
    return {"rank": sub.rank, "energy": sub.energy, "energy_exact": exact, "error": exact - sub.energy,
            "cpu_s": round(cpu, 3), **work}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.correction.spectra", description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=int, nargs=2, default=[4096, 4096], metavar=("M", "N"))
    parser.add_argument("--spectra", default="benchmark world,power law i^-1/2,noise")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for kind in args.spectra.split(","):
        D = spectrum_matrix(kind, *args.shape, seed=args.seed)
        squared = exact_squared_singular_values(D)
        row = {"spectrum": kind, "now": measure(D, {}, squared), "before": measure(D, BEFORE, squared, before=True)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("| spectrum | defaults | k | captured energy | error vs exact | columns x products | CPU s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        for which in ("before", "now"):
            r = row[which]
            print(f"| {row['spectrum']} | {which} | {r['rank']} | {r['energy']:.4f} | {r['error']:.1e} "
                  f"| {r['columns x products']} | {r['cpu_s']:.1f} |")
    if args.out is not None:
        args.out.write_text(json.dumps({"shape": args.shape, "seed": args.seed, "threads": 1,
                                        "before": BEFORE, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
