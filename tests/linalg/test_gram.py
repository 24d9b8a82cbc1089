"""The calibrated closed form and its statistics (docs/design.md §5c), checked against
definitions computed here densely: the argmin solved as a linear system over vec(A'),
explicit inverses, and the spiked storage against the dense solve on activations."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

from csulora.linalg import gram
from csulora.linalg.gram import (
    PROBE_STRENGTHS,
    CalibratedSolve,
    Eigen,
    action_kept,
    action_norm_sq,
    calibrated_dense_update,
    calibrated_factor,
    calibration_moments,
    choose_spiked_rank,
    dense_moment,
    moment_diagonal,
    moment_matrix,
    normalised_gram,
    relative_error,
    row_gram,
    update_moment,
)
from csulora.types import ModuleCalibration, SecondMoment

F64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_calibration(n: int, seed: int = 0, tokens: int | None = None) -> ModuleCalibration:
    """Two dense, normalised Grams from random activations with different strong directions."""
    g = gen(seed)
    tokens = tokens or 3 * n

    def gram_sum() -> torch.Tensor:
        X = torch.randn(tokens, 3, generator=g, dtype=F64) @ torch.randn(3, n, generator=g, dtype=F64) * 2.0
        X = X + torch.randn(tokens, n, generator=g, dtype=F64)
        return X.T @ X

    return calibration_moments("g", gram_sum(), tokens, gram_sum(), tokens)


def spiked_structure_sum(n: int, spikes: int, g: torch.Generator) -> torch.Tensor:
    """A Gram that is exactly spiked: a few strong directions over a flat floor."""
    Q, _ = torch.linalg.qr(torch.randn(n, spikes, generator=g, dtype=F64))
    L = 40.0 * 0.6 ** torch.arange(spikes, dtype=F64)
    return (Q * L) @ Q.T + 0.5 * torch.eye(n, dtype=F64)


def geometric_sum(n: int, g: torch.Generator, decay: float = 0.9) -> torch.Tensor:
    """A Gram whose eigenvalues decay geometrically: no flat tail for sigma^2 to stand for."""
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return (Q * decay ** torch.arange(n, dtype=F64)) @ Q.T


def task_metric(cal: ModuleCalibration, mu: float) -> torch.Tensor:
    """``S_t + mu I``, dense."""
    S_t = moment_matrix(cal.task)
    return S_t + mu * torch.eye(S_t.shape[0], dtype=F64)


def by_explicit_inverse(X: torch.Tensor, cal: ModuleCalibration, lam: float, mu: float) -> torch.Tensor:
    """The closed form by its definition: ``X (S_t + mu I)(S_t + mu I + lam S_h)^-1``, inverse formed."""
    T = task_metric(cal, mu)
    return X @ T @ torch.linalg.inv(T + lam * moment_matrix(cal.harmful))


def objective(A_new, A, B, cal: ModuleCalibration, lam: float, mu: float) -> float:
    """``||B (A' - A)||^2_{S_t + mu I} + lam ||B A'||^2_{S_h}`` computed densely."""
    T = task_metric(cal, mu)
    S_h = moment_matrix(cal.harmful)
    E = B @ (A_new - A)
    X = B @ A_new
    return float(torch.trace(E @ T @ E.T) + lam * torch.trace(X @ S_h @ X.T))


def argmin_by_vectorisation(A, B, cal: ModuleCalibration, lam: float, mu: float) -> torch.Tensor:
    """Minimise the quadratic over x = vec(A') (row-major): tr(B X S X^T B^T) = x^T (B^T B kron S) x."""
    r, n = A.shape
    G = B.T @ B
    T = task_metric(cal, mu)
    S_h = moment_matrix(cal.harmful)
    H = torch.kron(G, T) + lam * torch.kron(G, S_h)  # Hessian / 2
    rhs = torch.kron(G, T) @ A.reshape(-1)
    # B may be rank-deficient, so H is singular: a pseudo-inverse with an explicit cut-off gives a
    # minimiser on every LAPACK (lstsq's default rank rule picked a non-minimiser under torch 2.11).
    x = torch.linalg.pinv(H, hermitian=True, rtol=1e-10) @ rhs
    return x.reshape(r, n)


# -- the closed form ------------------------------------------------------------------------------
@pytest.mark.parametrize("lam", [0.5, 30.0, 300.0])
def test_closed_form_is_the_argmin_of_the_objective(lam):
    n, r, m = 12, 3, 9
    cal = random_calibration(n, seed=1)
    g = gen(2)
    A, B = torch.randn(r, n, generator=g, dtype=F64), torch.randn(m, r, generator=g, dtype=F64)
    closed = calibrated_factor(A, cal, lam, mu=0.01)
    direct = argmin_by_vectorisation(A, B, cal, lam, 0.01)
    assert torch.allclose(closed, direct, rtol=0, atol=1e-9 * float(A.abs().max()))
    # and it is a minimum: no random step lowers the objective
    best = objective(closed, A, B, cal, lam, 0.01)
    for _ in range(5):
        step = 1e-3 * torch.randn(r, n, generator=g, dtype=F64)
        assert objective(closed + step, A, B, cal, lam, 0.01) > best


def test_closed_form_is_a_minimiser_when_B_is_rank_deficient():
    n, r, m = 10, 3, 6
    cal = random_calibration(n, seed=3)
    g = gen(4)
    A = torch.randn(r, n, generator=g, dtype=F64)
    B = torch.randn(m, 1, generator=g, dtype=F64) @ torch.randn(1, r, generator=g, dtype=F64)  # rank 1
    closed = calibrated_factor(A, cal, 10.0)
    direct = argmin_by_vectorisation(A, B, cal, 10.0, 0.01)
    assert objective(closed, A, B, cal, 10.0, 0.01) == pytest.approx(objective(direct, A, B, cal, 10.0, 0.01), rel=1e-9)
    # minimisers differ only in null(B): the products agree
    assert torch.allclose(B @ closed, B @ direct, atol=1e-9)


def test_closed_form_matches_the_explicit_inverse_and_keeps_shapes():
    n, r = 16, 4
    cal = random_calibration(n, seed=5)
    A = torch.randn(r, n, generator=gen(6), dtype=F64)
    expected = by_explicit_inverse(A, cal, 7.0, 0.05)
    got = CalibratedSolve(cal, 7.0, 0.05).apply(A)
    assert got.shape == A.shape and got.dtype == F64
    assert torch.allclose(got, expected, atol=1e-10)


def test_zero_strength_returns_the_input_factor_itself():
    cal = random_calibration(8)
    A = torch.randn(2, 8, generator=gen(), dtype=torch.float32)
    assert calibrated_factor(A, cal, 0.0) is A
    dW = torch.randn(5, 8, generator=gen(), dtype=F64)
    assert calibrated_dense_update(dW, cal, 0.0) is dW
    # the limit agrees: a tiny strength changes almost nothing
    assert torch.allclose(calibrated_factor(A.double(), cal, 1e-9), A.double(), atol=1e-7)


def test_large_strength_deletes_the_update_on_full_rank_harmful_inputs():
    cal = random_calibration(10, seed=7, tokens=200)
    A = torch.randn(3, 10, generator=gen(8), dtype=F64)
    assert float(calibrated_factor(A, cal, 1e9).norm()) < 1e-5 * float(A.norm())


def test_bad_strength_or_mu_is_refused_by_the_solve():
    cal = random_calibration(6)
    for lam, mu in ((-1.0, 0.01), (1.0, 0.0), (1.0, -0.5), (float("nan"), 0.01)):
        with pytest.raises(ValueError):
            CalibratedSolve(cal, lam, mu)


def test_statistics_that_are_not_psd_fail_the_solve_in_one_line_naming_the_group():
    """A sign-flipped harmful Gram makes the system indefinite at a large strength: an InputError
    (the statistics came from a file), never a ValueError traceback (issue 23)."""
    from csulora.errors import InputError

    cal = random_calibration(6)
    flipped = ModuleCalibration("model.layers.0.mlp.down_proj", SecondMoment(n=6, matrix=-moment_matrix(cal.harmful),
                                tokens=18), cal.task)  # fmt: skip
    with pytest.raises(InputError, match=r"group model\.layers\.0\.mlp\.down_proj: .*not positive definite") as info:
        CalibratedSolve(flipped, 100.0, 0.01)
    assert "\n" not in str(info.value)


def test_factor_of_the_wrong_width_is_refused():
    with pytest.raises(ValueError, match="n = 6"):
        CalibratedSolve(random_calibration(6), 1.0, 0.01).apply(torch.zeros(2, 7, dtype=F64))


# -- dense full fine-tune form --------------------------------------------------------------------
def test_dense_update_form_matches_the_formula_in_row_blocks():
    n, m = 14, 11
    cal = random_calibration(n, seed=9)
    dW = torch.randn(m, n, generator=gen(10), dtype=F64)
    expected = by_explicit_inverse(dW, cal, 30.0, 0.01)
    whole = calibrated_dense_update(dW, cal, 30.0)
    blocked = calibrated_dense_update(dW, cal, 30.0, block_rows=4)
    assert torch.allclose(whole, expected, atol=1e-10)
    assert torch.allclose(blocked, whole, atol=1e-13)
    shared = CalibratedSolve(cal, 30.0, 0.01)
    assert torch.equal(calibrated_dense_update(dW, cal, 30.0, solve=shared), whole)


def test_dense_solve_and_norms_read_the_stored_matrices_without_symmetrised_copies():
    """The dense factorisation and the per-block norms use the stored matrices as they are
    (no (S + S^T)/2 copies beside them): the same values as moment_matrix's symmetrised form,
    for a float32 matrix that is not exactly symmetric too, and the statistics unchanged."""
    from csulora.linalg.gram import rows_action_norm_sq

    n = 12
    cal = random_calibration(n, seed=31)
    skew = 1e-3 * torch.randn(n, n, generator=gen(32), dtype=F64)
    lopsided = {
        which: SecondMoment(n=n, matrix=(getattr(cal, which).matrix + skew).float(), tokens=36)
        for which in ("harmful", "task")
    }
    stored = {which: m.matrix.clone() for which, m in lopsided.items()}
    raw = ModuleCalibration("g", harmful=lopsided["harmful"], task=lopsided["task"])
    symmetrised = ModuleCalibration(
        "g", *(SecondMoment(n=n, matrix=moment_matrix(lopsided[w]), tokens=36) for w in ("harmful", "task"))
    )
    dW = torch.randn(7, n, generator=gen(33), dtype=F64)
    torch.testing.assert_close(
        CalibratedSolve(raw, 30.0, 0.01).apply(dW), CalibratedSolve(symmetrised, 30.0, 0.01).apply(dW), atol=1e-12, rtol=1e-10
    )
    for which in ("harmful", "task"):
        assert rows_action_norm_sq(dW, lopsided[which]) == pytest.approx(
            rows_action_norm_sq(dW, getattr(symmetrised, which)), rel=1e-12
        )
        assert torch.equal(lopsided[which].matrix, stored[which])  # the statistics are not touched


# -- shares of the action kept --------------------------------------------------------------------
@pytest.mark.parametrize("spiked", [False, True])
def test_action_kept_is_the_ratio_of_weighted_norms(spiked):
    n, r, m = 12, 3, 7
    cal = random_calibration(n, seed=11)
    if spiked:
        eh, et = Eigen.of(moment_matrix(cal.harmful)), Eigen.of(moment_matrix(cal.task))
        cal = ModuleCalibration("g", eh.spiked(5, 1), et.spiked(4, 1))
    g = gen(12)
    A, B = torch.randn(r, n, generator=g, dtype=F64), torch.randn(m, r, generator=g, dtype=F64)
    A_new = CalibratedSolve(cal, 30.0, 0.01).apply(A)
    for moment in (cal.harmful, cal.task):
        S = moment_matrix(moment)
        assert torch.allclose(row_gram(A, moment), A @ S @ A.T, atol=1e-10)

        def weighted(X):
            return float(torch.trace(B @ X @ S @ X.T @ B.T))

        assert action_norm_sq(B, A, moment) == pytest.approx(weighted(A), rel=1e-10)
        assert action_kept(B, A, A_new, moment) == pytest.approx(weighted(A_new) / weighted(A), rel=1e-9)
    kept_h, kept_t = action_kept(B, A, A_new, cal.harmful), action_kept(B, A, A_new, cal.task)
    assert 0.0 <= kept_h < kept_t <= 1.0  # harmful action goes first
    assert action_kept(torch.zeros(m, r, dtype=F64), A, A_new, cal.task) is None  # dW == 0


# -- building the statistics ----------------------------------------------------------------------
def test_normalised_gram_has_mean_eigenvalue_one_and_is_symmetric():
    X = torch.randn(40, 9, generator=gen(13), dtype=F64) * 7.0
    S = normalised_gram(X.T @ X, 40)
    assert float(torch.trace(S)) / 9 == pytest.approx(1.0, rel=1e-12)
    assert torch.equal(S, S.T)
    moment = dense_moment(X.T @ X, 40)
    assert moment.is_dense and moment.n == 9 and moment.tokens == 40


@pytest.mark.parametrize("gram_sum, tokens, match", [
    (torch.eye(4, dtype=F64), 0, "tokens"),
    (torch.zeros(4, 4, dtype=F64), 10, "no signal"),
    (torch.full((4, 4), float("nan"), dtype=F64), 10, "NaN"),
    (torch.ones(4, 3, dtype=F64), 10, "square"),
])
def test_unusable_gram_sums_are_refused(gram_sum, tokens, match):
    with pytest.raises(ValueError, match=match):
        normalised_gram(gram_sum, tokens)


def test_spiked_form_keeps_the_trace_through_sigma2():
    X = torch.randn(30, 20, generator=gen(14), dtype=F64)
    moment = gram.spiked_moment(X.T @ X, 30, 6)
    assert moment.rank == 6 and not moment.is_dense
    assert torch.allclose(moment.U.T @ moment.U, torch.eye(6, dtype=F64), atol=1e-12)
    assert float(moment.L.sum()) + moment.sigma2 * (20 - 6) == pytest.approx(20.0, rel=1e-12)
    assert float(moment.L.min()) >= moment.sigma2 > 0.0


def test_spiked_at_full_rank_is_the_dense_solve():
    n = 18
    cal = random_calibration(n, seed=15)
    full = ModuleCalibration(
        "g", Eigen.of(moment_matrix(cal.harmful)).spiked(n - 1, 1), Eigen.of(moment_matrix(cal.task)).spiked(n - 1, 1)
    )
    A = torch.randn(4, n, generator=gen(16), dtype=F64)
    for lam in (1.0, 300.0):
        dense = CalibratedSolve(cal, lam, 0.01)
        spiked = CalibratedSolve(full, lam, 0.01)
        assert spiked.is_spiked and not dense.is_spiked
        assert torch.allclose(spiked.apply(A), dense.apply(A), atol=1e-9)


def test_dense_when_it_fits():
    g = gen(17)
    sums = [spiked_structure_sum(24, 3, g) for _ in range(2)]
    cal = calibration_moments("g", sums[0], 5, sums[1], 7, dense_max_n=24)
    assert cal.harmful.is_dense and cal.task.is_dense
    assert (cal.harmful.tokens, cal.task.tokens) == (5, 7)


@pytest.mark.parametrize("n", [64, 150])
def test_spiked_rank_rule_matches_the_dense_solve_within_tolerance_on_activations(n):
    """Grams that are truly spiked (5 and 7 strong directions over a flat floor): the rule
    picks a small rank and the spiked solve then matches the dense one within 1e-3 on
    activations for every strength of tune's grid, checked here on a fresh random adapter
    (B included) that the rule never saw."""
    g = gen(18)
    h_sum, t_sum = spiked_structure_sum(n, 5, g) * 3.0, spiked_structure_sum(n, 7, g)
    cal = calibration_moments("g", h_sum, 11, t_sum, 13, dense_max_n=n // 4)
    assert not cal.harmful.is_dense and not cal.task.is_dense
    assert 7 <= cal.harmful.rank <= 8 and cal.task.rank == cal.harmful.rank
    dense = calibration_moments("g", h_sum, 11, t_sum, 13, dense_max_n=n)
    pooled = moment_matrix(dense.harmful) + moment_matrix(dense.task)
    A = torch.randn(6, n, generator=gen(19), dtype=F64)
    B = torch.randn(20, 6, generator=gen(20), dtype=F64)
    for lam in PROBE_STRENGTHS:
        exact = B @ CalibratedSolve(dense, lam, 0.01).apply(A)
        approx = B @ CalibratedSolve(cal, lam, 0.01).apply(A)
        assert relative_error(approx, exact, pooled) <= 1e-3, lam


def test_a_tail_the_spiked_form_cannot_stand_for_stays_dense():
    """Geometrically decaying spectra: no rank up to n/2 meets the tolerance, so the rule keeps
    the exact dense form rather than a poor approximation."""
    g = gen(21)
    n = 48
    h_sum, t_sum = geometric_sum(n, g), geometric_sum(n, g, 0.93)
    cal = calibration_moments("g", h_sum, 3, t_sum, 3, dense_max_n=8)
    assert cal.harmful.is_dense and cal.task.is_dense
    dense = calibration_moments("g", h_sum, 3, t_sum, 3)
    assert choose_spiked_rank(dense) is None
    # a loose tolerance admits a spiked form: the rule is the tolerance, not a fixed rank
    loose = choose_spiked_rank(dense, tolerance=0.7)
    assert loose is not None and loose <= n // 2


def test_woodbury_never_builds_an_n_by_n_matrix():
    """n = 200,000: one n x n float64 matrix would take 320 GB, so any dense step would fail.
    The result is checked against the defining equation A' (S_t + mu I + lam S_h) = A (S_t + mu I),
    with both sides applied in factored form."""
    n, q, r = 200_000, 6, 3
    g = gen(22)

    def spiked(scale: float) -> SecondMoment:
        U, _ = torch.linalg.qr(torch.randn(n, q, generator=g, dtype=F64))
        L = scale * torch.linspace(50.0, 5.0, q, dtype=F64)
        return SecondMoment(n=n, U=U, L=L, sigma2=0.7, tokens=100)

    cal = ModuleCalibration("big", harmful=spiked(2.0), task=spiked(1.0))
    A = torch.randn(r, n, generator=g, dtype=F64)
    lam, mu = 30.0, 0.01
    A_new = CalibratedSolve(cal, lam, mu).apply(A)

    def times(X: torch.Tensor, m: SecondMoment) -> torch.Tensor:  # X S, factored
        return ((X @ m.U) * (m.L - m.sigma2)) @ m.U.T + m.sigma2 * X

    left = times(A_new, cal.task) + mu * A_new + lam * times(A_new, cal.harmful)
    right = times(A, cal.task) + mu * A
    assert float((left - right).norm()) <= 1e-9 * float(right.norm())
    kept = action_kept(torch.eye(r, dtype=F64), A, A_new, cal.harmful)
    assert kept is not None and 0.0 < kept < 1.0


def test_solves_at_several_strengths_share_one_w_gram_and_agree():
    n = 30
    dense = random_calibration(n, seed=23)
    cal = ModuleCalibration(
        "g", Eigen.of(moment_matrix(dense.harmful)).spiked(8, 1), Eigen.of(moment_matrix(dense.task)).spiked(8, 1)
    )
    A = torch.randn(2, n, generator=gen(24), dtype=F64)
    many = CalibratedSolve.at_strengths(cal, (1.0, 30.0), 0.01)
    for lam, solve in many.items():
        assert torch.allclose(solve.apply(A), CalibratedSolve(cal, lam, 0.01).apply(A), atol=1e-12)


def test_gram_imports_only_torch_types_and_errors():
    source = Path(gram.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    ours = {"csulora.types", "csulora.errors"}
    assert {m for m in imported if m.startswith("csulora")} == ours
    assert imported - ours <= {"__future__", "collections.abc", "dataclasses", "torch"}


def test_relative_error_edge_cases():
    S = torch.eye(3, dtype=F64)
    zero = torch.zeros(1, 3, dtype=F64)
    assert relative_error(zero, zero, S) == 0.0
    assert math.isinf(relative_error(torch.ones(1, 3, dtype=F64), zero, S))


def test_a_sampled_gram_keeps_the_dense_form():
    """docs/design.md §5c's figure: four spikes over isotropic noise, n = 200, 40,000 tokens
    (200 per dimension). Sampling alone spreads the floor's eigenvalues by about +-14%, more
    than sigma^2 can stand for at 1e-3, so no rank up to n/2 passes and the group stays dense."""
    g = gen(25)
    n, tokens = 200, 40_000
    sums = []
    for _ in range(2):
        X = torch.randn(tokens, 4, generator=g, dtype=F64) @ torch.randn(4, n, generator=g, dtype=F64) * 3.0
        X = X + torch.randn(tokens, n, generator=g, dtype=F64)
        sums.append(X.T @ X)
    cal = calibration_moments("g", sums[0], tokens, sums[1], tokens, dense_max_n=n // 4)
    assert cal.harmful.is_dense and cal.task.is_dense


def test_moment_diagonal_is_the_diagonal_of_either_form():
    S = normalised_gram(geometric_sum(12, gen(3)), 100)
    dense = dense_moment(geometric_sum(12, gen(3)), 100)
    torch.testing.assert_close(moment_diagonal(dense), S.diagonal())
    spiked = Eigen.of(S).spiked(4, 100)
    torch.testing.assert_close(moment_diagonal(spiked), moment_matrix(spiked).diagonal())


# -- the fine-tuned model's statistics (Antidote's): one moment, no task ------------------------
def test_update_moment_is_dense_when_it_fits():
    cal = update_moment("g", spiked_structure_sum(24, 3, gen(30)), 5, dense_max_n=24)
    assert cal.is_dense and cal.tokens == 5
    assert torch.allclose(cal.matrix, normalised_gram(spiked_structure_sum(24, 3, gen(30)), 5))


def test_update_moment_keeps_what_antidote_reads_when_spiked():
    """An exactly spiked Gram (5 directions over a flat floor) above dense_max_n: the rank found is
    5, and the diagonal (lora_A's and full weights' scores) and diag(A S A^T) (lora_B's) of a factor
    the rule never saw agree with the dense form's."""
    n = 96
    gram_sum = spiked_structure_sum(n, 5, gen(31))
    dense = update_moment("g", gram_sum, 11, dense_max_n=n)
    spiked = update_moment("g", gram_sum, 11, dense_max_n=n // 4)
    assert not spiked.is_dense and spiked.rank == 5 and spiked.tokens == 11
    A = torch.randn(6, n, generator=gen(32), dtype=F64)
    assert torch.allclose(moment_diagonal(spiked), moment_diagonal(dense), rtol=1e-9, atol=1e-9)
    assert torch.allclose(row_gram(A, spiked).diagonal(), row_gram(A, dense).diagonal(), rtol=1e-9)


def test_update_moment_stays_dense_where_no_spiked_form_keeps_the_diagonal():
    moment = update_moment("g", geometric_sum(48, gen(33)), 3, dense_max_n=8)
    assert moment.is_dense
    assert not update_moment("g", geometric_sum(48, gen(33)), 3, dense_max_n=8, tolerance=0.9).is_dense
