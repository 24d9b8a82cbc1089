"""The tensor algebra of SaLoRA (docs/design.md §6), pure: tensors in, tensors out, no I/O.

Per target layer with weight ``W`` (m x n, out x in):
- safety module ``C = I - V_s V_s^T`` (m x m), never built densely on the hot path:
  ``C @ Y = Y - V_s (V_s^T Y)`` costs m x r_s x cols instead of m^2;
- task-specific init from the top-r SVD ``W ~= U2 S2 V2^T``:
  ``B0 = V_t V_t^T U2 sqrt(S2)`` (m x r), ``A0 = sqrt(S2) V2^T`` (r x n);
- frozen residual ``W_res = W - C B0 A0`` so that ``W_res + C B0 A0 = W`` (unchanged at step 0);
- export relative to the original ``W``: ``C (B A - B0 A0) = B' A'`` with
  ``B' = C [B | -B0]`` (m x 2r) and ``A' = [A ; A0]`` (2r x n).

Callers pass float64 for the init so the step-0 identity holds to float32 round-off.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Above this size a dense eigen/singular decomposition costs minutes on a CPU; the
# randomized one (Halko et al.) costs a few products with the matrix.
EXACT_DECOMPOSITION_LIMIT = 4096
# Oversampling and power iterations of the randomized decompositions: enough that the top
# directions agree with the exact ones to ~1e-6 on spectra as flat as those of LLM features.
OVERSAMPLE = 16
POWER_ITERATIONS = 6


def _fix_signs(vectors: Tensor) -> Tensor:
    """Flip each column so its largest-magnitude entry is positive (deterministic output)."""
    if vectors.numel() == 0:
        return vectors
    rows = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors[rows, torch.arange(vectors.shape[1])])
    signs[signs == 0] = 1
    return vectors * signs


def top_right_singular_vectors(gram: Tensor, k: int, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Top-k right singular vectors and values of ``Z`` given its Gram matrix ``Z^T Z`` (m x m).

    The right singular vectors of Z are the eigenvectors of Z^T Z and its singular values
    the square roots of the eigenvalues. Accumulating the m x m Gram over batches keeps the
    feature pass's memory independent of the number of tokens. Small Grams use an exact
    symmetric eigendecomposition; large ones ``torch.svd_lowrank`` under a fixed seed.
    Returns ``(V, s)``: V m x k with orthonormal columns, s of length k, descending.
    """
    m = gram.shape[0]
    if gram.shape != (m, m):
        raise ValueError(f"Gram matrix must be square, got {tuple(gram.shape)}")
    if not 0 <= k <= m:
        raise ValueError(f"k={k} out of range for a Gram matrix of size {m}")
    gram = 0.5 * (gram + gram.T)  # symmetrize away accumulated round-off
    if m <= EXACT_DECOMPOSITION_LIMIT:
        eigenvalues, eigenvectors = torch.linalg.eigh(gram)
        values = eigenvalues.flip(0)[:k]
        vectors = eigenvectors.flip(1)[:, :k]
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            left, values, _ = torch.svd_lowrank(gram, q=min(m, k + OVERSAMPLE), niter=POWER_ITERATIONS)
        values, vectors = values[:k], left[:, :k]
    singular_values = values.clamp_min(0).sqrt()
    return _fix_signs(vectors), singular_values


def apply_safety_module(Y: Tensor, V_s: Tensor) -> Tensor:
    """``C @ Y`` with ``C = I - V_s V_s^T``, in factored form (Y: m x cols)."""
    return Y - V_s @ (V_s.T @ Y)


def safety_projector(V_s: Tensor) -> Tensor:
    """The dense m x m ``C = I - V_s V_s^T``. For tests and small reports only."""
    m = V_s.shape[0]
    return torch.eye(m, dtype=V_s.dtype, device=V_s.device) - V_s @ V_s.T


def top_singular_triplets(W: Tensor, r: int, *, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Top-r SVD of the weight, ``W ~= U2 diag(S2) V2^T`` (U2: m x r, S2: r, V2: n x r)."""
    m, n = W.shape
    if not 1 <= r <= min(m, n):
        raise ValueError(f"rank {r} exceeds the weight's smaller side {min(m, n)}")
    if min(m, n) <= EXACT_DECOMPOSITION_LIMIT:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return U[:, :r], S[:r], Vh[:r].T
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(W, q=min(m, n, r + OVERSAMPLE), niter=POWER_ITERATIONS)
    return U[:, :r], S[:r], V[:, :r]


def task_initialisation(W: Tensor, V_t: Tensor, r: int, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """SaLoRA's task-specific init: ``B0 = V_t V_t^T U2 sqrt(S2)``, ``A0 = sqrt(S2) V2^T``.

    The weight's top-r directions, with the output side restricted to the task's feature
    subspace, so training starts where the task's activations live.
    """
    U2, S2, V2 = top_singular_triplets(W, r, seed=seed)
    root = S2.sqrt()
    B0 = (V_t @ (V_t.T @ U2)) * root  # scales column j by sqrt(S2[j])
    A0 = root[:, None] * V2.T
    return B0, A0


def residual_weight(W: Tensor, V_s: Tensor, B0: Tensor, A0: Tensor) -> Tensor:
    """``W_res = W - C B0 A0``: the frozen weight that keeps the model unchanged at step 0."""
    return W - apply_safety_module(B0, V_s) @ A0


def export_factors(B: Tensor, A: Tensor, B0: Tensor, A0: Tensor, V_s: Tensor) -> tuple[Tensor, Tensor]:
    """Plain LoRA factors of the trained update relative to the original weight.

    ``W_res + C B A = W + C (B A - B0 A0) = W + B' A'`` with ``B' = C [B | -B0]`` and
    ``A' = [A ; A0]``: rank 2r, to be written with ``lora_alpha = 2r`` (scaling 1).
    """
    B_export = apply_safety_module(torch.cat([B, -B0], dim=1), V_s)
    A_export = torch.cat([A, A0], dim=0)
    return B_export, A_export
