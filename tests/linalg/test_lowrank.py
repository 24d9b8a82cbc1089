"""Factored helpers agree with dense linear algebra."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from csulora.linalg.lowrank import (
    best_rank_approx,
    compute_dtype,
    dense_frobenius_norm,
    dense_is_finite,
    dense_matmul,
    dense_t_matmul,
    fix_signs,
    frobenius_inner,
    frobenius_norm_sq,
    project_columns,
    project_rows,
)
import csulora.linalg.lowrank as linalg

dims = st.integers(min_value=1, max_value=9)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@settings(max_examples=30, deadline=None)
@given(m=dims, n=dims, r1=dims, r2=dims, seed=st.integers(0, 10_000))
def test_frobenius_inner_and_norm_match_dense(m, n, r1, r2, seed):
    B1, A1 = randn(m, r1, seed=seed), randn(r1, n, seed=seed + 1)
    B2, A2 = randn(m, r2, seed=seed + 2), randn(r2, n, seed=seed + 3)
    dense_inner = ((B1 @ A1) * (B2 @ A2)).sum()
    assert torch.allclose(frobenius_inner(B1, A1, B2, A2), dense_inner, rtol=1e-10, atol=1e-10)
    assert torch.allclose(frobenius_norm_sq(B1, A1), (B1 @ A1).square().sum(), rtol=1e-10)


def test_projections_match_dense_projectors():
    U, _ = torch.linalg.qr(randn(7, 3, seed=1))
    V, _ = torch.linalg.qr(randn(5, 2, seed=2))
    B, A = randn(7, 4, seed=3), randn(4, 5, seed=4)
    assert torch.allclose(project_columns(U, B), U @ U.T @ B)
    assert torch.allclose(project_rows(A, V), A @ V @ V.T)


def test_dense_products_in_ds_precision_returned_as_float64(monkeypatch):
    monkeypatch.setattr(linalg, "_ROW_BLOCK", 3)  # force several blocks for half precision
    X, Y = randn(6, 2, seed=6), randn(10, 3, seed=7)
    D64 = randn(10, 6, seed=5)
    # float64 D: exact float64 products
    assert torch.allclose(dense_matmul(D64, X), D64 @ X, rtol=1e-14)
    assert torch.allclose(dense_t_matmul(D64, Y), D64.T @ Y, rtol=1e-14)
    assert abs(dense_frobenius_norm(D64) - float(D64.norm())) < 1e-12
    for D in (D64.float(), D64.bfloat16()):
        exact = D.double()
        assert compute_dtype(D) == torch.float32
        assert dense_matmul(D, X).dtype == dense_t_matmul(D, Y).dtype == torch.float64
        assert torch.allclose(dense_matmul(D, X), exact @ X, rtol=1e-5, atol=1e-5)
        assert torch.allclose(dense_t_matmul(D, Y), exact.T @ Y, rtol=1e-5, atol=1e-5)
        assert abs(dense_frobenius_norm(D) - float(exact.norm())) < 1e-5
    D = D64.float()
    assert dense_is_finite(D)
    D[7, 2] = float("nan")
    assert not dense_is_finite(D)


def test_fix_signs_makes_largest_entry_positive_and_keeps_product():
    U, _ = torch.linalg.qr(randn(6, 3, seed=8))
    V, _ = torch.linalg.qr(randn(4, 3, seed=9))
    U2, V2 = fix_signs(-U, -V)
    pivots = U2.abs().argmax(dim=0)
    assert (U2[pivots, torch.arange(3)] > 0).all()
    assert torch.allclose(U2 @ V2.T, U @ V.T)
    # A pair flipped on input comes out the same bytes.
    U3, V3 = fix_signs(U, V)
    assert torch.equal(U2, U3) and torch.equal(V2, V3)


@settings(max_examples=30, deadline=None)
@given(m=dims, n=dims, p=dims, q=st.integers(0, 9), seed=st.integers(0, 10_000))
def test_best_rank_approx_equals_svd_truncation(m, n, p, q, seed):
    B, A = randn(m, p, seed=seed), randn(p, n, seed=seed + 1)
    X = B @ A
    result = best_rank_approx(B, A, q)
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    keep = min(q, S.numel())
    truncated = U[:, :keep] @ torch.diag(S[:keep]) @ Vh[:keep]
    assert result.B.shape[1] == result.A.shape[0] <= q
    assert torch.allclose(result.B @ result.A, truncated, atol=1e-9)
    assert abs(result.energy_total - float(S.square().sum())) < 1e-8 * max(1.0, result.energy_total)
    assert abs(result.energy_dropped - float(S[keep:].square().sum())) < 1e-8 * max(1.0, result.energy_total)
    assert 0.0 <= result.fraction_dropped <= 1.0 + 1e-12


def test_best_rank_approx_of_zero_product_drops_nothing():
    result = best_rank_approx(torch.zeros(4, 3, dtype=torch.float64), randn(3, 5, seed=1), 2)
    assert result.fraction_dropped == 0.0
    assert torch.count_nonzero(result.B @ result.A) == 0


# -- dense updates (docs/design.md §5d) ----------------------------------------------------------
@settings(max_examples=25)
@given(m=dims, n=dims, q=st.integers(0, 4), seed=st.integers(0, 10_000))
def test_dense_block_helpers_match_dense_algebra(m, n, q, seed):
    X, Y = randn(m, n, seed=seed), randn(m, n, seed=seed + 1)
    L, R = randn(m, q, seed=seed + 2), randn(q, n, seed=seed + 3)
    assert abs(linalg.dense_inner(X, Y) - float((X * Y).sum())) <= 1e-10 * (1 + float(X.norm() * Y.norm()))
    assert abs(linalg.low_rank_residual_norm_sq(X, L, R) - float((X - L @ R).square().sum())) <= 1e-9 * (1 + float(X.norm() ** 2))
    Z = X.clone()
    assert linalg.add_low_rank_(Z, L, R) is Z
    torch.testing.assert_close(Z, X + L @ R)


def test_dense_helpers_work_block_by_block(monkeypatch):
    # one-element blocks: every row (and column) is its own block
    monkeypatch.setattr(linalg, "_BLOCK_ELEMENTS", 1)
    for m, n in ((5, 3), (3, 5)):
        X, D = randn(m, n, seed=m), randn(m, n, seed=n + 10)
        blocks = torch.zeros(m, n, dtype=torch.float64)
        count = 0
        for index, block in linalg.outer_gram_blocks(D, X):
            blocks[index] = block
            count += 1
        torch.testing.assert_close(blocks, D @ D.T @ X)
        assert count == (m if m > n else n)  # rows of D D^T X, or its columns
        assert abs(linalg.dense_inner(X, D) - float((X * D).sum())) < 1e-12
        Z = X.clone()
        linalg.add_low_rank_(Z, randn(m, 2, seed=1), randn(2, n, seed=2))
        torch.testing.assert_close(Z, X + randn(m, 2, seed=1) @ randn(2, n, seed=2))


def test_outer_gram_blocks_may_be_written_back_in_place():
    # the contract Safe LoRA's dense form relies on: each block depends only on what it covers
    for m, n in ((6, 4), (4, 6)):
        X, D = randn(m, n, seed=3), randn(m, n, seed=4)
        want = D @ D.T @ X
        for index, block in linalg.outer_gram_blocks(D, X):
            X[index] = block
        torch.testing.assert_close(X, want)


def test_small_math_runs_on_one_thread_and_restores_the_count_even_on_error():
    from csulora.linalg.lowrank import small_math

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with small_math():
            assert torch.get_num_threads() == 1
            with small_math():  # nested: still one thread, and the outer block restores
                assert torch.get_num_threads() == 1
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), small_math():
            raise RuntimeError("boom")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_products_with_the_whole_of_d_use_the_threads_configured_outside_small_math(monkeypatch):
    import csulora.linalg.lowrank as linalg

    seen = []
    original_mm = torch.Tensor.__matmul__

    def recording(self, other):
        seen.append(torch.get_num_threads())
        return original_mm(self, other)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        D = torch.randn(6, 5)
        monkeypatch.setattr(torch.Tensor, "__matmul__", recording)
        with linalg.small_math():
            linalg.dense_matmul(D, torch.randn(5, 2, dtype=torch.float64))
            linalg.dense_t_matmul(D, torch.randn(6, 2, dtype=torch.float64))
            assert torch.get_num_threads() == 1
        monkeypatch.undo()
        assert seen == [2, 2]
    finally:
        torch.set_num_threads(before)
