"""Cheap necessary conditions for a second moment to be positive semi-definite (docs/design.md §5c).

A Gram ``S = X^T X / N`` is finite, symmetric, has a non-negative diagonal, and every entry
obeys Cauchy-Schwarz, ``|S_ij| <= sqrt(S_ii S_jj)``. Checking these costs O(n^2) -- far
below the O(n^3) factorisation that would otherwise fail later, deep inside a solve -- and
catches the usual ways stored statistics go wrong: a sign flip, a mixed-up block, a matrix
that is no Gram at all. They are necessary, not sufficient; the solve's Cholesky stays the
last word (:class:`csulora.linalg.gram.CalibratedSolve`).

Pure tensor math: a reason (a short string naming the first offending entry) or None.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Relative to the largest diagonal entry: statistics are stored in float32 (about 7 digits),
# so honest files sit many orders of magnitude inside these bounds.
RELATIVE_TOLERANCE = 1e-4
# Rows compared at a time: bounded temporaries (a 7B group's n x n float64 copy is 134 MB).
_ROW_BLOCK = 1024


def gram_problem(S: Tensor, *, rtol: float = RELATIVE_TOLERANCE) -> str | None:
    """Why the square matrix ``S`` cannot be a Gram matrix, or None when the cheap checks pass."""
    if S.ndim != 2 or S.shape[0] != S.shape[1]:
        return f"shape {list(S.shape)} is not square"
    if not bool(torch.isfinite(S.sum(dtype=torch.float64))) and not bool(torch.isfinite(S).all()):
        return "contains NaN or Inf"
    diagonal = S.diagonal().to(torch.float64)
    scale = float(diagonal.abs().max()) if diagonal.numel() else 0.0
    tol = rtol * scale
    if diagonal.numel() and float(diagonal.min()) < -tol:
        i = int(diagonal.argmin())
        return f"negative diagonal entry [{i},{i}] = {float(diagonal[i]):.4g}"
    root = diagonal.clamp(min=0.0).sqrt()
    for start in range(0, S.shape[0], _ROW_BLOCK):
        rows = S[start : start + _ROW_BLOCK].to(torch.float64)
        problem = _symmetry_problem(rows, S[:, start : start + _ROW_BLOCK], start, tol)
        problem = problem or _bound_problem(rows, root, start, tol)
        if problem:
            return problem
    return None


def _symmetry_problem(rows: Tensor, columns: Tensor, start: int, tol: float) -> str | None:
    gap = (rows - columns.to(torch.float64).T).abs()
    if float(gap.max()) <= tol:
        return None
    i, j = divmod(int(gap.argmax()), gap.shape[1])
    return f"not symmetric: [{start + i},{j}] = {float(rows[i, j]):.4g} but [{j},{start + i}] = {float(columns[j, i]):.4g}"


def _bound_problem(rows: Tensor, root: Tensor, start: int, tol: float) -> str | None:
    excess = rows.abs() - root[start : start + rows.shape[0], None] * root[None, :]
    if float(excess.max()) <= tol:
        return None
    i, j = divmod(int(excess.argmax()), excess.shape[1])
    return (
        f"entry [{start + i},{j}] = {float(rows[i, j]):.4g} exceeds sqrt(S_ii S_jj) = "
        f"{float(root[start + i] * root[j]):.4g} (Cauchy-Schwarz)"
    )


def spiked_problem(U: Tensor, L: Tensor, sigma2: float, *, atol: float = 1e-3) -> str | None:
    """Why ``U diag(L) U^T + sigma2 (I - U U^T)`` is not positive semi-definite as stored, or None.

    It is when ``L >= 0``, ``sigma2 >= 0`` and ``U``'s columns are orthonormal; unit column
    norms are checked (O(n q)), orthogonality is left to the solve.
    """
    if not (bool(torch.isfinite(U).all()) and bool(torch.isfinite(L).all())):
        return "contains NaN or Inf"
    if L.numel() and float(L.min()) < 0.0:
        return f"negative eigenvalue L[{int(L.argmin())}] = {float(L.min()):.4g}"
    if not sigma2 >= 0.0:
        return f"negative residual eigenvalue sigma2 = {sigma2:.4g}"
    norms = U.to(torch.float64).square().sum(dim=0)
    if norms.numel() and float((norms - 1.0).abs().max()) > atol:
        k = int((norms - 1.0).abs().argmax())
        return f"eigenvector U[:, {k}] has norm {float(norms[k].sqrt()):.4g}, not 1"
    return None
