"""The cheap positive semi-definiteness checks of stored statistics (docs/design.md §5c)."""

from __future__ import annotations

import pytest
import torch

from csulora.linalg.psd import gram_problem, spiked_problem

F64 = torch.float64


def gram(n: int = 8, seed: int = 0) -> torch.Tensor:
    X = torch.randn(3 * n, n, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return X.T @ X / (3 * n)


def test_real_grams_pass_in_float32_and_float64_and_in_row_blocks(monkeypatch):
    import csulora.linalg.psd as psd

    assert gram_problem(gram()) is None
    assert gram_problem(gram().to(torch.float32)) is None
    X = torch.randn(5, 1, dtype=F64)
    assert gram_problem(X @ X.T) is None  # rank one: Cauchy-Schwarz holds with equality
    assert gram_problem(torch.zeros(4, 4)) is None
    monkeypatch.setattr(psd, "_ROW_BLOCK", 3)  # blocks that do not divide n
    assert gram_problem(gram(10)) is None


def test_a_sign_flipped_gram_is_named_by_its_diagonal():
    assert gram_problem(-gram()).startswith("negative diagonal entry")


def test_an_asymmetric_matrix_is_named_by_its_entry(monkeypatch):
    import csulora.linalg.psd as psd

    S = gram(10)
    S[7, 2] += 0.5
    monkeypatch.setattr(psd, "_ROW_BLOCK", 4)
    assert gram_problem(S) == f"not symmetric: [2,7] = {float(S[2, 7]):.4g} but [7,2] = {float(S[7, 2]):.4g}"


def test_an_entry_beyond_cauchy_schwarz_is_named():
    S = torch.eye(3, dtype=F64)
    S[0, 2] = S[2, 0] = 1.5  # symmetric, positive diagonal, yet indefinite
    assert "exceeds sqrt(S_ii S_jj)" in gram_problem(S)
    assert "[0,2]" in gram_problem(S)


def test_non_finite_and_non_square_matrices():
    S = gram()
    S[1, 1] = float("nan")
    assert gram_problem(S) == "contains NaN or Inf"
    assert "not square" in gram_problem(torch.zeros(3, 4))


@pytest.mark.parametrize("edit, reason", [
    (lambda U, L: (U, -L), "negative eigenvalue"),
    (lambda U, L: (2 * U, L), "has norm 2"),
    (lambda U, L: (U * float("inf"), L), "NaN or Inf"),
])
def test_spiked_storage_checks(edit, reason):
    U, _ = torch.linalg.qr(torch.randn(10, 3, generator=torch.Generator().manual_seed(1), dtype=F64))
    L = torch.tensor([3.0, 2.0, 1.0], dtype=F64)
    assert spiked_problem(U, L, 0.5) is None
    assert reason in spiked_problem(*edit(U, L), 0.5)
    assert "sigma2" in spiked_problem(U, L, -0.1)
