"""Low-rank linear algebra in factored form.

Every quantity csulora reports or writes is a function of small products: for an update
``X = B @ A`` (B: m x r, A: r x n) the Frobenius inner product and norm follow from the
r x r Gram matrices ``B^T B`` and ``A A^T``; projections onto a k-dimensional subspace
need ``U^T B`` (k x r). Nothing here builds an m x m or an m x n matrix from factors:
m and n reach 28672 on 70B models while r and k are 8-64.

The exact displacement ``D`` (m x n) is the one dense matrix that does appear. Products
with it (:func:`dense_matmul`, :func:`dense_t_matmul`, :func:`dense_frobenius_norm`) are
taken in D's own precision: float32 for a float32 D (as streamed by the API; float64
products would cost a full-size copy and ~8x the time at 7B shapes, for accuracy far
below what a bf16/fp16/fp32 adapter can hold), float64 for a float64 D (tests), and
float32, one block of rows at a time, for a bf16/fp16 D. Results are float64.

Threads: LoRA-sized work (m x r factors, r x r Grams, one cache-sized block of D at a time)
runs inside :func:`small_math`, on one torch thread; the products with the whole of D use
the threads configured outside it. Each small op split across threads gains nothing, and
on a busy machine every one of them waits for a descheduled thread while the other spins:
Safe LoRA on a 3-layer 7B-shaped pair took 63 s of CPU on two threads against 8 s on one
with the same code (docs/benchmarks.md).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

# Rows of a half-precision D converted to float32 at a time: bounded extra memory.
_ROW_BLOCK = 2048

# The torch thread count outside the outermost small_math() block (None: not inside one).
_threads_outside: int | None = None


@contextmanager
def small_math() -> Iterator[None]:
    """Run the block on one torch thread, then restore the count (nested blocks are no-ops).

    For LoRA-sized work; the whole-D products below still use the threads configured
    outside. The thread count is process-wide: do not run torch work in other Python
    threads meanwhile.
    """
    global _threads_outside
    if _threads_outside is not None:
        yield
        return
    _threads_outside = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(_threads_outside)
        _threads_outside = None


_F = TypeVar("_F", bound=Callable)


def _all_threads(function: _F) -> _F:
    """Run a product with the whole of D on the threads configured outside small_math()."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        outside = _threads_outside
        if outside is None or outside == 1:
            return function(*args, **kwargs)
        torch.set_num_threads(outside)
        try:
            return function(*args, **kwargs)
        finally:
            torch.set_num_threads(1)

    return wrapper  # type: ignore[return-value]


def frobenius_inner(B1: Tensor, A1: Tensor, B2: Tensor, A2: Tensor) -> Tensor:
    """``<B1 A1, B2 A2>`` from r1 x r2 products: ``sum((B1^T B2) * (A1 A2^T))``.

    Uses ``trace(A1^T B1^T B2 A2) = trace((B1^T B2)(A2 A1^T))`` and
    ``trace(X Y) = sum(X * Y^T)``.
    """
    return ((B1.T @ B2) * (A1 @ A2.T)).sum()


def frobenius_norm_sq(B: Tensor, A: Tensor) -> Tensor:
    """``||B A||_F^2`` from the Gram matrices; clamped at 0 against rounding."""
    return frobenius_inner(B, A, B, A).clamp_min(0.0)


def project_columns(U: Tensor, B: Tensor) -> Tensor:
    """``U U^T B``: the part of B's columns in span(U) (U orthonormal; m x r result)."""
    return U @ (U.T @ B)


def project_rows(A: Tensor, V: Tensor) -> Tensor:
    """``A V V^T``: the part of A's rows in span(V) (V orthonormal; r x n result)."""
    return (A @ V) @ V.T


def compute_dtype(D: Tensor) -> torch.dtype:
    """The precision of products with D: its own if float32/float64, else float32."""
    return D.dtype if D.dtype in (torch.float32, torch.float64) else torch.float32


@_all_threads
def dense_matmul(D: Tensor, X: Tensor) -> Tensor:
    """``D @ X`` (X: n x p) in D's compute precision, returned as float64."""
    dtype = compute_dtype(D)
    if D.dtype == dtype:
        return (D @ X.to(dtype)).to(torch.float64)
    X = X.to(dtype)
    out = torch.empty(D.shape[0], X.shape[1], dtype=torch.float64)
    for start in range(0, D.shape[0], _ROW_BLOCK):
        out[start : start + _ROW_BLOCK] = D[start : start + _ROW_BLOCK].to(dtype) @ X
    return out


@_all_threads
def dense_t_matmul(D: Tensor, Y: Tensor) -> Tensor:
    """``D^T @ Y`` (Y: m x p) in D's compute precision, returned as float64."""
    dtype = compute_dtype(D)
    if D.dtype == dtype:
        return (D.T @ Y.to(dtype)).to(torch.float64)
    Y = Y.to(dtype)
    out = torch.zeros(D.shape[1], Y.shape[1], dtype=torch.float64)
    for start in range(0, D.shape[0], _ROW_BLOCK):
        stop = start + _ROW_BLOCK
        out += (D[start:stop].to(dtype).T @ Y[start:stop]).to(torch.float64)
    return out


@_all_threads
def dense_frobenius_norm(D: Tensor) -> float:
    """``||D||_F``: per-block norms in D's compute precision, combined in float64."""
    dtype = compute_dtype(D)
    total = 0.0
    for start in range(0, D.shape[0], _ROW_BLOCK):
        # Row norms, squared and summed in float64: one fp32 vector_norm over millions of
        # entries drifts by ~1e-3 relative on CPU (measured, 7B shapes); per row it is ~1e-8.
        rows = torch.linalg.vector_norm(D[start : start + _ROW_BLOCK].to(dtype), dim=1)
        total += float(rows.to(torch.float64).square().sum())
    return total**0.5


def dense_is_finite(D: Tensor) -> bool:
    """Whether every entry of D is finite (checked without a full-size boolean copy)."""
    return all(
        bool(torch.isfinite(D[start : start + _ROW_BLOCK]).all())
        for start in range(0, D.shape[0], _ROW_BLOCK)
    )


def fix_signs(U: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    """Flip singular-vector pairs so each column of U has its largest-|.| entry positive.

    An SVD fixes each pair ``(u_i, v_i)`` only up to a common sign; pinning it makes the
    written subspace (and every factor derived from it) identical across runs and LAPACK
    builds that agree on the vectors up to sign.
    """
    if U.shape[1] == 0:
        return U, V
    pivot = U.abs().argmax(dim=0)
    signs = torch.sign(U[pivot, torch.arange(U.shape[1])])
    signs[signs == 0] = 1.0
    return U * signs, V * signs


@dataclass(frozen=True)
class LowRankApprox:
    """Best rank-q approximation ``B @ A`` of a factored product, and what it dropped."""

    B: Tensor  # m x q'
    A: Tensor  # q' x n   (q' = min(q, rank of the product's core))
    energy_total: float  # ||X||_F^2 of the input product
    energy_dropped: float  # ||X - B A||_F^2

    @property
    def fraction_dropped(self) -> float:
        """Share of ``||X||^2`` lost; 0 for a zero product."""
        return self.energy_dropped / self.energy_total if self.energy_total > 0 else 0.0


def best_rank_approx(B: Tensor, A: Tensor, q: int) -> LowRankApprox:
    """Best rank-q approximation (Eckart-Young) of ``X = B @ A`` without forming X.

    QR of both outer factors, ``B = Q_b R_b`` and ``A^T = Q_a R_a``, leaves the small core
    ``R_b R_a^T`` whose SVD ``W diag(sig) Z^T`` is that of X itself:
    ``X = (Q_b W) diag(sig) (Q_a Z)^T``. Keep the top q triplets and split each singular
    value evenly between the two factors (``sqrt(sig)`` on each side) so neither factor's
    scale dominates when written at reduced precision.
    """
    if q < 0:
        raise ValueError(f"rank must be >= 0, got {q}")
    Qb, Rb = torch.linalg.qr(B, mode="reduced")
    Qa, Ra = torch.linalg.qr(A.T, mode="reduced")
    W, sig, Zt = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)
    left, right = fix_signs(Qb @ W, Qa @ Zt.T)
    energy_total = float((sig * sig).sum())
    keep = min(q, int(sig.shape[0]))
    root = sig[:keep].sqrt()
    return LowRankApprox(
        B=left[:, :keep] * root,
        A=(right[:, :keep] * root).T,
        energy_total=energy_total,
        energy_dropped=float((sig[keep:] * sig[keep:]).sum()),
    )


# -- dense updates (full fine-tunes, docs/design.md §5d) ------------------------------------------
# A dense update dW is m x n like D, so nothing here builds a second m x n matrix beside it:
# products are taken a block at a time and either reduced (norms, inner products) or written
# back into the caller's buffer. Blocks hold about this many elements (1 MB in float32): small
# on purpose. glibc raises its mmap threshold to the size of each large block freed, so
# 16 MB blocks came from the heap and stayed resident after use (+96 MB RssAnon measured on a
# 7B MLP matrix); 1 MB blocks leave a few MB, at no measurable cost in speed.
_BLOCK_ELEMENTS = 1 << 18


def rows_per_block(n: int) -> int:
    """Rows of an ``? x n`` matrix per block so that a block holds ~``_BLOCK_ELEMENTS`` entries."""
    return max(1, _BLOCK_ELEMENTS // max(1, n))


def finite_by_blocks(X: Tensor) -> bool:
    """Whether every entry of X is finite, from float32 sums of small blocks (no boolean mask).

    Any NaN/Inf makes its block's sum non-finite; only such a block (or one whose large finite
    entries overflow the sum) pays the exact check.
    """
    flat = X.reshape(X.shape[0], -1) if X.dim() else X.reshape(1, 1)
    step = rows_per_block(flat.shape[1])
    for start in range(0, flat.shape[0], step):
        block = flat[start : start + step]
        if not bool(torch.isfinite(block.sum(dtype=torch.float32))) and not bool(torch.isfinite(block).all()):
            return False
    return True


def dense_inner(X: Tensor, Y: Tensor) -> float:
    """``<X, Y>`` of two m x n matrices: per row block in their compute precision, summed in float64."""
    if X.shape != Y.shape:
        raise ValueError(f"shapes differ: {tuple(X.shape)} vs {tuple(Y.shape)}")
    dtype = compute_dtype(X)
    step = rows_per_block(X.shape[1])
    total = 0.0
    for start in range(0, X.shape[0], step):
        x = X[start : start + step].to(dtype)
        y = Y[start : start + step].to(dtype)
        # row sums in the compute precision, the sum of rows in float64 (as dense_frobenius_norm)
        total += float((x * y).sum(dim=1).to(torch.float64).sum())
    return total


def add_low_rank_(X: Tensor, L: Tensor, R: Tensor) -> Tensor:
    """``X += L @ R`` in place (L: m x q, R: q x n), one block of rows at a time; returns X."""
    if L.shape[1] == 0:
        return X
    R = R.to(X.dtype)
    step = rows_per_block(X.shape[1])
    for start in range(0, X.shape[0], step):
        X[start : start + step] += L[start : start + step].to(X.dtype) @ R
    return X


def low_rank_residual_norm_sq(X: Tensor, L: Tensor, R: Tensor) -> float:
    """``||X - L @ R||^2`` without forming the m x n difference (one row block at a time).

    Used for energies that would otherwise be a difference of large, nearly equal numbers.
    """
    dtype = compute_dtype(X)
    R = R.to(dtype)
    step = rows_per_block(X.shape[1])
    total = 0.0
    for start in range(0, X.shape[0], step):
        block = X[start : start + step].to(dtype)
        if L.shape[1]:
            block = block - L[start : start + step].to(dtype) @ R
        total += float(torch.linalg.vector_norm(block, dim=1).to(torch.float64).square().sum())
    return total


def outer_gram_blocks(D: Tensor, X: Tensor) -> Iterator[tuple[tuple[slice, slice], Tensor]]:
    """Blocks of ``D D^T X`` (m x n), each with the index of X it covers.

    The cheaper way round, so that the one extra matrix is ``min(m, n)^2`` (never more than
    an m x n one): for m <= n, ``N = D D^T`` (m x m) and column blocks ``N X[:, c]``; for
    m > n, ``M = D^T X`` (n x n) and row blocks ``D[r] M``. Each block depends only on the
    part of X it covers (or on M, computed up front), so a caller may write a block back
    into X as soon as it has it. Cost ``2 m n min(m, n)`` flops, in D's compute precision.
    """
    if D.shape != X.shape:
        raise ValueError(f"shapes differ: {tuple(D.shape)} vs {tuple(X.shape)}")
    m, n = D.shape
    dtype = compute_dtype(D)
    Dc = D.to(dtype)
    if m <= n:
        N = Dc @ Dc.T
        step = rows_per_block(m)  # columns per block: the block is m x step
        for start in range(0, n, step):
            cols = slice(start, start + step)
            yield (slice(None), cols), N @ X[:, cols].to(dtype)
        return
    M = Dc.T @ X.to(dtype)
    step = rows_per_block(n)
    for start in range(0, m, step):
        rows = slice(start, start + step)
        yield (rows, slice(None)), Dc[rows] @ M
