from __future__ import annotations

import pytest
import torch

from csulora.salora import math as sm


def _orthonormal(m: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]


def _features(tokens: int, m: int, seed: int) -> torch.Tensor:
    """Features with a decaying spectrum, like real activations (distinct top values)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(1, -2, m, dtype=torch.float64)
    return torch.randn(tokens, m, generator=g, dtype=torch.float64) * scales


def test_safety_projector_is_symmetric_idempotent_with_rank_m_minus_rs():
    m, r_s = 24, 5
    V_s = _orthonormal(m, r_s, 0)
    C = sm.safety_projector(V_s)
    assert torch.allclose(C, C.T, atol=1e-12)
    assert torch.allclose(C @ C, C, atol=1e-12)
    assert torch.linalg.matrix_rank(C).item() == m - r_s
    assert torch.allclose(C @ V_s, torch.zeros(m, r_s, dtype=torch.float64), atol=1e-12)


def test_factored_safety_module_equals_dense_projector():
    V_s = _orthonormal(20, 4, 1)
    Y = torch.randn(20, 7, dtype=torch.float64)
    assert torch.allclose(sm.apply_safety_module(Y, V_s), sm.safety_projector(V_s) @ Y, atol=1e-12)


def _assert_same_subspace(V1: torch.Tensor, V2: torch.Tensor, atol: float) -> None:
    assert torch.allclose(V1 @ V1.T, V2 @ V2.T, atol=atol)


def test_top_right_singular_vectors_from_gram_match_svd_of_features():
    Z = _features(200, 30, 2)
    V, s = sm.top_right_singular_vectors(Z.T @ Z, 6)
    _, S_ref, Vh_ref = torch.linalg.svd(Z, full_matrices=False)
    assert torch.allclose(s, S_ref[:6], rtol=1e-8)
    _assert_same_subspace(V, Vh_ref[:6].T, 1e-8)
    assert torch.allclose(V.T @ V, torch.eye(6, dtype=torch.float64), atol=1e-10)


def test_randomized_path_agrees_with_exact_and_is_deterministic(monkeypatch):
    Z = _features(300, 40, 3)
    gram = Z.T @ Z
    V_exact, s_exact = sm.top_right_singular_vectors(gram, 5)
    monkeypatch.setattr(sm, "EXACT_DECOMPOSITION_LIMIT", 8)
    V1, s1 = sm.top_right_singular_vectors(gram, 5, seed=7)
    V2, s2 = sm.top_right_singular_vectors(gram, 5, seed=7)
    assert torch.equal(V1, V2) and torch.equal(s1, s2)
    assert torch.allclose(s1, s_exact, rtol=1e-6)
    _assert_same_subspace(V1, V_exact, 1e-6)


def test_top_right_singular_vectors_rejects_bad_rank():
    with pytest.raises(ValueError):
        sm.top_right_singular_vectors(torch.eye(4, dtype=torch.float64), 5)


def test_task_initialisation_matches_the_formula():
    m, n, r, r_t = 16, 12, 3, 5
    W = torch.randn(m, n, dtype=torch.float64)
    V_t = _orthonormal(m, r_t, 4)
    B0, A0 = sm.task_initialisation(W, V_t, r)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    root = torch.diag(S[:r].sqrt())
    assert B0.shape == (m, r) and A0.shape == (r, n)
    assert torch.allclose(B0, V_t @ V_t.T @ U[:, :r] @ root, atol=1e-12)
    assert torch.allclose(A0, root @ Vh[:r], atol=1e-12)


def test_task_initialisation_rejects_rank_above_the_layer():
    with pytest.raises(ValueError, match="exceeds"):
        sm.task_initialisation(torch.randn(6, 4, dtype=torch.float64), _orthonormal(6, 2, 0), 5)


def test_residual_keeps_the_layer_unchanged_at_step_zero():
    m, n, r = 16, 12, 3
    W = torch.randn(m, n, dtype=torch.float64)
    V_s, V_t = _orthonormal(m, 4, 5), _orthonormal(m, 5, 6)
    B0, A0 = sm.task_initialisation(W, V_t, r)
    W_res = sm.residual_weight(W, V_s, B0, A0)
    C = sm.safety_projector(V_s)
    assert torch.allclose(W_res + C @ B0 @ A0, W, atol=1e-12)
    assert not torch.allclose(W_res, W)  # the init really moved weight into the adapter


def test_export_is_the_trained_update_relative_to_the_original_weight():
    m, n, r = 16, 12, 3
    W = torch.randn(m, n, dtype=torch.float64)
    V_s, V_t = _orthonormal(m, 4, 7), _orthonormal(m, 5, 8)
    B0, A0 = sm.task_initialisation(W, V_t, r)
    W_res = sm.residual_weight(W, V_s, B0, A0)
    B, A = B0 + 0.1 * torch.randn(m, r, dtype=torch.float64), A0 + 0.1 * torch.randn(r, n, dtype=torch.float64)
    B_exp, A_exp = sm.export_factors(B, A, B0, A0, V_s)
    assert B_exp.shape == (m, 2 * r) and A_exp.shape == (2 * r, n)
    C = sm.safety_projector(V_s)
    assert torch.allclose(W + B_exp @ A_exp, W_res + C @ B @ A, atol=1e-12)
    # The exported update has no component along the safety directions.
    assert torch.allclose(V_s.T @ B_exp, torch.zeros(4, 2 * r, dtype=torch.float64), atol=1e-12)
