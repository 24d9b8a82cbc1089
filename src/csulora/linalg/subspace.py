"""The safety subspace of one module: the top-k SVD of its alignment displacement.

``D = W_aligned - W_base ~= U_k diag(S_k) V_k^T`` (docs/design.md §3). k is either fixed
(``rank``) or the smallest k whose singular values hold a fraction ``energy`` of
``||D||_F^2``, capped at ``max_rank``. Pure math: the streaming from safetensors shards
and the cache file live in ``csulora.io``.

Two algorithms, one result shape:
- exact: LAPACK SVD of D in float64, for small matrices or when the k sought is not much
  smaller than ``min(m, n)``;
- randomized (Halko, Martinsson & Tropp 2011): a Gaussian sketch of ``k + oversample``
  columns drawn from a :class:`torch.Generator` seeded by ``config.seed`` (the global RNG
  is never touched), up to ``power_iterations`` rounds of subspace iteration
  re-orthonormalised by QR, then an exact SVD of the small projected matrix. This is the
  algorithm of ``torch.svd_lowrank``, written out so the sketch comes from our own
  generator, with two additions. Every round ends with ``Q^T D``, whose singular values
  are the current estimates (lower bounds that rise towards the exact ones), and the
  rounds stop once the captured-energy fractions of the k directions kept are done
  rising by more than ``power_tolerance`` (the last rise, or its geometric remainder;
  ``power_tolerance=0`` runs them all). And once the estimates show the energy rule keeps
  k directions, fewer than the most the config allows, the rounds go on with the
  leading ``k + oversample`` directions only. A product with D costs its width and is
  the whole cost at 7B shapes: a displacement whose few leading directions stand out
  (the 7B benchmark world: k = 8) takes two products 84 wide and two 28 wide instead of
  ten 74 wide (docs/benchmarks.md).

Both take products with D in D's precision (float32) with float64 results
(``csulora.linalg.lowrank``); orthonormalisation and the small SVD are float64. Both fix the sign
of each singular pair and drop directions whose singular value is below
the numerical-rank tolerance of D's dtype (``max(m, n) * eps * s_max``, as
``torch.linalg.matrix_rank``): such directions are rounding noise, and an arbitrary
direction must not enter the "aligned" space. Reruns are byte-identical.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch
from torch import Tensor

from csulora.errors import InputError, OptionError
from csulora.linalg.lowrank import (
    dense_frobenius_norm,
    dense_is_finite,
    dense_matmul,
    dense_t_matmul,
    fix_signs,
    small_math,
)
from csulora.types import ModuleSubspace

ALGORITHMS = ("auto", "exact", "randomized")

# "auto" uses the exact SVD below this min(m, n), or when the sketch would cover more than
# a third of min(m, n): there the randomized method saves little and loses accuracy.
_EXACT_MAX_DIM = 256
_EXACT_SKETCH_FRACTION = 3


@dataclass(frozen=True)
class SubspaceConfig:
    """How each module's subspace is chosen (validated before any tensor is read)."""

    rank: int | None = field(
        default=None,
        metadata={"help": "fixed number of singular directions per module (overrides --energy)"},
    )
    energy: float = field(
        default=0.9,
        metadata={"help": "keep the fewest directions holding this fraction of ||D||^2, in (0, 1]"},
    )
    max_rank: int = field(
        default=64, metadata={"help": "cap on the directions kept by the --energy rule"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the randomized SVD's sketch"})
    # Defaults sized by the accuracy check of docs/benchmarks.md: with 20 extra columns and
    # up to 8 rounds the captured energy is within 1e-3 of the exact SVD's even for slowly
    # decaying spectra (10 and a fixed 4 rounds left 1e-3 to 5e-3 there); the tolerance
    # stops the rounds early on spectra whose leading directions stand out.
    oversample: int = field(
        default=20, metadata={"help": "extra sketch columns of the randomized SVD"}
    )
    power_iterations: int = field(
        default=8, metadata={"help": "subspace iterations of the randomized SVD (at most)"}
    )
    power_tolerance: float = field(
        default=1e-4,
        metadata={
            "help": "stop the subspace iterations once no captured-energy fraction of the first "
            "k directions rose by more than this in the last one (0: run them all)"
        },
    )
    algorithm: str = field(
        default="auto",
        metadata={
            "help": "SVD algorithm: exact for small matrices, randomized when k << min(m, n)",
            "choices": list(ALGORITHMS),
        },
    )

    def __post_init__(self) -> None:
        if self.rank is not None and (not _is_int(self.rank) or self.rank < 1):
            raise OptionError(f"--rank must be an integer >= 1, got {self.rank!r}")
        if not _is_number(self.energy) or not 0.0 < self.energy <= 1.0:
            raise OptionError(f"--energy must be in (0, 1], got {self.energy!r}")
        if not _is_int(self.max_rank) or self.max_rank < 1:
            raise OptionError(f"--max-rank must be an integer >= 1, got {self.max_rank!r}")
        if not _is_int(self.seed):
            raise OptionError(f"--seed must be an integer, got {self.seed!r}")
        if not _is_int(self.oversample) or self.oversample < 0:
            raise OptionError(f"--oversample must be an integer >= 0, got {self.oversample!r}")
        if not _is_int(self.power_iterations) or self.power_iterations < 0:
            raise OptionError(
                f"--power-iterations must be an integer >= 0, got {self.power_iterations!r}"
            )
        if not _is_number(self.power_tolerance) or not 0.0 <= self.power_tolerance < 1.0:
            raise OptionError(f"--power-tolerance must be in [0, 1), got {self.power_tolerance!r}")
        if self.algorithm not in ALGORITHMS:
            raise OptionError(
                f"--algorithm must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}"
            )
        # Plain Python numbers (numpy scalars would leak into the cache's JSON metadata).
        if self.rank is not None:
            object.__setattr__(self, "rank", int(self.rank))
        object.__setattr__(self, "energy", float(self.energy))
        object.__setattr__(self, "power_tolerance", float(self.power_tolerance))
        for name in ("max_rank", "seed", "oversample", "power_iterations"):
            object.__setattr__(self, name, int(getattr(self, name)))

    @property
    def target_rank(self) -> int:
        """The most directions this config can keep (before the matrix's own limits)."""
        return self.rank if self.rank is not None else self.max_rank


def check_subspace_config(config: SubspaceConfig | None, *, cache: object | None = None) -> SubspaceConfig:
    """The options for subspaces computed on the fly; refused beside a cache (it fixes them)."""
    if config is None:
        return SubspaceConfig()
    if not isinstance(config, SubspaceConfig):
        raise OptionError(f"subspace config must be a SubspaceConfig, got {type(config).__name__}")
    if cache is not None:
        raise OptionError(
            f"subspace options (--rank, --energy, ...) do not apply with --subspace {cache}: the cache fixes them"
        )
    return config


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def empty_subspace(m: int, n: int) -> ModuleSubspace:
    """The defined subspace of a module alignment left untouched (D == 0)."""
    return ModuleSubspace(
        U=torch.zeros(m, 0, dtype=torch.float64),
        S=torch.zeros(0, dtype=torch.float64),
        V=torch.zeros(n, 0, dtype=torch.float64),
        energy=0.0,
        d_norm=0.0,
    )


def uses_exact_svd(shape: tuple[int, int], config: SubspaceConfig) -> bool:
    """Whether ``compute_subspace`` takes the exact SVD for a matrix of this shape."""
    if config.algorithm != "auto":
        return config.algorithm == "exact"
    small = min(shape)
    sketch = config.target_rank + config.oversample
    return small <= _EXACT_MAX_DIM or _EXACT_SKETCH_FRACTION * sketch >= small


# Only the products with D (dense_*) use several threads: the QRs, eigensolvers and SVDs of
# thin (sketch-wide) matrices cost more in thread hand-offs than they gain (csulora.linalg.lowrank).
@small_math()
def compute_subspace(
    D: Tensor, config: SubspaceConfig, *, name: str = "displacement"
) -> ModuleSubspace:
    """Top-k SVD of one module's displacement D (m x n, any float dtype).

    ``name`` only labels the error raised for non-finite input. Returns float64 factors:
    U (m x k), S (k, descending), V (n x k), the captured energy
    ``sum(S^2) / ||D||^2`` and the exact ``||D||_F``. D == 0 gives the empty subspace.
    """
    if D.dim() != 2:
        raise InputError(f"{name}: expected a 2-D weight, got shape {tuple(D.shape)}")
    m, n = int(D.shape[0]), int(D.shape[1])
    d_norm = dense_frobenius_norm(D)
    # A NaN or Inf entry makes the norm non-finite; only then is the entry-wise check (a
    # boolean mask per block, slower than the norm) worth its cost. A finite D with a norm
    # too large for float32 passes on, as before.
    if not math.isfinite(d_norm) and not dense_is_finite(D):
        raise InputError(f"{name}: the displacement has NaN or Inf entries")
    if d_norm == 0.0:
        return empty_subspace(m, n)

    if uses_exact_svd((m, n), config):
        U, S, V = _exact_svd(D)
    else:
        U, S, V = _randomized_svd(D, config, d_norm * d_norm)

    S, U, V = _drop_numerical_zeros(S, U, V, shape=(m, n), dtype=D.dtype)
    k = _choose_rank(S, d_norm * d_norm, config)
    U, V = fix_signs(U[:, :k].contiguous(), V[:, :k].contiguous())
    S = S[:k].contiguous()
    captured = float((S * S).sum()) / (d_norm * d_norm)
    return ModuleSubspace(U=U, S=S, V=V, energy=min(captured, 1.0), d_norm=d_norm)


def _exact_svd(D: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    U, S, Vh = torch.linalg.svd(D.to(torch.float64), full_matrices=False)
    return U, S, Vh.T


def _randomized_svd(D: Tensor, config: SubspaceConfig, total_energy: float) -> tuple[Tensor, Tensor, Tensor]:
    """Randomized range finder with power iterations; sketch from a seeded generator.

    Each round is ``Z = orth(D^T Q)``, ``Q = orth(D Z)``, then ``D^T Q`` again, whose
    singular values are those of ``Q^T D``: the estimates the result would have if the
    rounds stopped here. They stop after ``power_iterations`` rounds, or as soon as a
    round raised none of the captured-energy fractions of the first k directions by more
    than ``power_tolerance`` (k: what the config would keep from the current estimates).
    With ``power_tolerance == 0`` this is exactly the fixed number of rounds.

    The sketch is as wide as the most directions the config may keep, plus ``oversample``.
    Once the estimates show the energy rule keeps fewer (k), the rounds go on with the
    leading ``k + oversample`` directions of ``Q`` only: every product with D costs its
    width, and the estimates are lower bounds, so the k they give is never below the
    exact rule's. (The block convergence rate is then ``sigma_{k+oversample+1} / sigma_k``.)
    """
    m, n = D.shape
    sketch = min(config.target_rank + config.oversample, m, n)
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    omega = torch.randn(n, sketch, generator=generator, dtype=torch.float64)
    Q, _ = torch.linalg.qr(dense_matmul(D, omega))
    DtQ = dense_t_matmul(D, Q)  # (Q^T D)^T, n x sketch
    estimates, Q, DtQ = _narrowed(DtQ, Q, total_energy, config)
    for _ in range(config.power_iterations):
        Z, _ = torch.linalg.qr(DtQ)
        Q, _ = torch.linalg.qr(dense_matmul(D, Z))
        DtQ = dense_t_matmul(D, Q)
        previous = estimates
        estimates, Q, DtQ = _narrowed(DtQ, Q, total_energy, config)
        if config.power_tolerance > 0 and _converged(previous, estimates, total_energy, config):
            break
    Ub, S, Vh = torch.linalg.svd(DtQ.T, full_matrices=False)
    return Q @ Ub, S, Vh.T


def _narrowed(DtQ: Tensor, Q: Tensor, total_energy: float, config: SubspaceConfig) -> tuple[Tensor, Tensor, Tensor]:
    """The squared singular values of ``Q^T D`` (descending), and ``Q``, ``D^T Q`` cut to the
    leading ``k + oversample`` singular directions when the energy rule keeps k < width.

    From the eigenpairs of the small Gram ``(D^T Q)^T (D^T Q)`` (width x width): its
    eigenvalues are the squared singular values, accurate to float64 rounding of the
    largest, which is all an energy fraction needs; its eigenvectors rotate ``Q`` onto the
    singular directions, so the cut keeps exactly the leading ones.
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(DtQ.T @ DtQ)
    squared = eigenvalues.flip(0).clamp_min(0.0)
    width = min(Q.shape[1], _choose_rank(squared.sqrt(), total_energy, config) + config.oversample)
    if width < Q.shape[1]:
        leading = eigenvectors.flip(1)[:, :width]
        return squared[:width], Q @ leading, DtQ @ leading
    return squared, Q, DtQ


def _converged(previous: Tensor, current: Tensor, total_energy: float, config: SubspaceConfig) -> bool:
    """Whether the captured-energy fractions of the first k directions (k: what the config
    keeps from the current estimates) are done rising by more than ``power_tolerance``.

    Each estimate is a lower bound that rises towards the exact one, by a factor of about
    ``rho = (sigma_{w+1} / sigma_k)^2`` per round for a block of w directions (Halko et al.
    2011, section 9), so after a round that rose by ``r`` what is left is about
    ``r rho / (1 - rho)``. Done when the last rise, or that geometric remainder with
    ``sigma_{w+1}`` taken as the smallest estimate of the block, is within the tolerance:
    a spectrum whose leading directions stand out stops after one round, a slowly decaying
    one (rho near 1) only once a round rose by no more than the tolerance itself.
    """
    k = max(1, _choose_rank(current.sqrt(), total_energy, config))
    rise = float((torch.cumsum(current[:k], dim=0) - torch.cumsum(previous[:k], dim=0)).max())
    tolerance = config.power_tolerance * total_energy
    if rise <= tolerance:
        return True
    rho = float(current[-1] / current[k - 1]) if current[k - 1] > 0 else 1.0
    return rho < 1.0 and rise * rho / (1.0 - rho) <= tolerance


def _drop_numerical_zeros(
    S: Tensor, U: Tensor, V: Tensor, *, shape: tuple[int, int], dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float32).eps
    tolerance = max(shape) * eps * float(S[0]) if S.numel() else 0.0
    keep = int((S > tolerance).sum())
    return S[:keep], U[:, :keep], V[:, :keep]


def _choose_rank(S: Tensor, total_energy: float, config: SubspaceConfig) -> int:
    """Fixed rank, or the smallest k holding ``energy`` of ||D||^2, capped at max_rank."""
    available = int(S.shape[0])
    if config.rank is not None:
        return min(config.rank, available)
    cumulative = torch.cumsum(S * S, dim=0) / total_energy
    # A relative slack of 1e-12 lets energy = 1.0 be met despite rounding in the sum.
    reached = (cumulative >= config.energy - 1e-12).nonzero()
    k = int(reached[0]) + 1 if reached.numel() else available
    return min(k, config.max_rank, available)
