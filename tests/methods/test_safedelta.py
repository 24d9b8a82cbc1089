"""Safe Delta (csulora.methods.safedelta) against a dense reference written here from the definition.

The reference follows the published algorithm's definition step by step with plain loops: an
explicit sort of every entry by (sensitivity, row, column), a running sum against the budget,
and column-by-column OBS compensation in sub-blocks of 4 (docs/peers.md). Everything float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from csulora.errors import InputError, OptionError
from csulora.methods import safedelta as sd
from csulora.methods.safedelta import (
    SAFEDELTA_TUNING,
    SafeDelta,
    SafeDeltaConfig,
    kept_entries,
    safe_delta_update,
    safety_factor,
)
from csulora.types import DenseModuleInput, ModuleCalibration, ModuleInput, SecondMoment, LoraUpdate


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def gram(n, tokens, seed, *, spread=True):
    """A Gram of random activations whose inputs have unequal energies (as real ones do)."""
    x = randn(tokens, n, seed=seed)
    if spread:
        x = x * torch.linspace(0.3, 3.0, n, dtype=torch.float64)
    return x.T @ x


def reference(dW, H, s, block=sd.BLOCK_COLUMNS):
    """(X, kept set) from the definition: no blocking tricks, no vectorised selection."""
    m, n = dW.shape
    H = H.clone()
    for j in range(n):
        if H[j, j] == 0:
            H[j, j] = 1.0
    H += 0.01 * float(H.diagonal().mean()) * torch.eye(n, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    d = U.diagonal()
    t = [float(1.0 / d[j] ** 2) for j in range(n)]
    X = torch.zeros_like(dW)
    kept_all = set()
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        entries = sorted((t[j], i, j) for i in range(m) for j in range(i1, i2))
        eligible = entries[: len(entries) - int(0.15 * len(entries))]
        budget = sum(t[i1:i2]) / (i2 - i1) * (s / 2) * (m / 4096)
        spent, kept = 0.0, set()
        for tj, i, j in eligible:
            spent += float(dW[i, j] - X[i, j]) ** 2 * tj
            if spent > budget:
                break
            kept.add((i, j))
        kept_all |= kept
        for g1 in range(i1, i2, 4):
            group = list(range(g1, min(g1 + 4, i2)))
            E = torch.zeros(m, len(group), dtype=dW.dtype)
            for k, j in enumerate(group):
                for i in range(m):
                    if (i, j) in kept:
                        E[i, k] = (X[i, j] - dW[i, j]) / d[j]
                        X[i, j] = dW[i, j]
            for later in range(group[-1] + 1, n):
                X[:, later] -= E @ U[group, later]
    return X, kept_all


def kept_set(X, dW):
    return {(int(i), int(j)) for i, j in torch.nonzero(X == dW).tolist()}


def s_for_share(share, dW, H, block):
    """An s whose budget is about ``share`` of a block's loss, so the selection ends mid-way."""
    m = dW.shape[0]
    c = min(block, dW.shape[1])
    return share * 2 * 4096 * c * float(dW.square().mean()) / m


@pytest.mark.parametrize(
    ("m", "n", "block", "share", "seed"),
    [(7, 9, 2048, 0.4, 0), (5, 20, 8, 0.3, 1), (6, 14, 6, 0.6, 2), (9, 11, 2048, 0.05, 3), (4, 13, 4, 0.5, 4)],
)
def test_matches_the_dense_reference(m, n, block, share, seed):
    dW = randn(m, n, seed=seed)
    H = gram(n, 3 * n, seed + 10)
    s = s_for_share(share, dW, H, block)
    ours, stats = safe_delta_update(dW, H, s, block_columns=block)
    expected, kept = reference(dW, H, s, block)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    assert stats.kept == len(kept) and 0 < stats.kept < 0.85 * m * n  # the budget ended mid-way
    assert kept_set(ours, dW) == kept  # kept entries hold exactly the fine-tuned value


def test_a_diagonal_gram_needs_no_compensation_and_keeps_the_least_sensitive_columns_first():
    # H = diag(5, 1, 3, 2, 4): t_j = H_jj + 0.03 (damping 1 % of the mean 3), U diagonal.
    H = torch.diag(torch.tensor([5.0, 1.0, 3.0, 2.0, 4.0], dtype=torch.float64))
    dW = torch.ones(4, 5, dtype=torch.float64)  # every entry's loss is its column's t
    t = torch.tensor([5.03, 1.03, 3.03, 2.03, 4.03], dtype=torch.float64)
    per_budget_unit = float(t.mean()) * 0.5 * 4 / 4096  # tau = s * this
    # columns 1 and 3 cost 4 x 1.03 + 4 x 2.03 = 12.24; one entry of column 2 more is 15.27 <= 16
    X, stats = safe_delta_update(dW, H, 16.0 / per_budget_unit)
    expected = torch.zeros_like(dW)
    expected[:, [1, 3]] = 1.0
    expected[0, 2] = 1.0
    assert torch.equal(X, expected) and stats.kept == 9
    # Unbounded: the last int(0.15 * 20) = 3 entries in order (rows 1-3 of column 0) are never kept.
    X, stats = safe_delta_update(dW, H, 1e12)
    expected = torch.ones_like(dW)
    expected[1:, 0] = 0.0
    assert torch.equal(X, expected) and stats.kept == 17


def test_equal_sensitivities_are_taken_row_by_row():
    H = torch.eye(4, dtype=torch.float64)  # every column has t = 1.01
    dW = torch.ones(3, 4, dtype=torch.float64)
    s = 5.5 * 1.01 / (1.01 * 0.5 * 3 / 4096)  # room for 5 entries (5.05 <= 5.555 < 6.06)
    X, _ = safe_delta_update(dW, H, s)
    expected = torch.zeros_like(dW)
    expected[0, :] = 1.0
    expected[1, 0] = 1.0
    assert torch.equal(X, expected)


def test_s_zero_reverts_to_the_aligned_weights_and_a_zero_update_stays_zero():
    dW, H = randn(6, 10, seed=5), gram(10, 30, 6)
    X, stats = safe_delta_update(dW, H, 0.0)
    assert torch.equal(X, torch.zeros_like(dW)) and stats.kept == 0
    X, stats = safe_delta_update(torch.zeros(6, 10, dtype=torch.float64), H, 0.1)
    assert torch.equal(X, torch.zeros(6, 10, dtype=torch.float64))


def test_a_large_budget_keeps_the_eligible_85_percent_and_compensates_the_rest():
    dW, H = randn(8, 12, seed=7), gram(12, 40, 8)
    X, stats = safe_delta_update(dW, H, 1e12)
    assert stats.kept == 96 - int(0.15 * 96)
    expected, _ = reference(dW, H, 1e12)
    torch.testing.assert_close(X, expected, rtol=1e-10, atol=1e-12)
    reverted = X != dW
    assert int(reverted.sum()) == int(0.15 * 96)
    # the reverted entries sit in the most sensitive columns and were compensated, not zeroed
    factor = safety_factor(H, dtype=torch.float64)
    most_sensitive = set(torch.argsort(factor.sensitivity)[-2:].tolist())
    assert {int(j) for j in torch.nonzero(reverted)[:, 1]} <= most_sensitive


def test_a_rank_deficient_gram_is_damped_and_matches_the_reference():
    n = 10
    A = randn(n, 2, seed=9)
    H = A @ A.T  # rank 2
    dW = randn(5, n, seed=10)
    s = s_for_share(0.4, dW, H, 2048)
    X, _ = safe_delta_update(dW, H, s)
    expected, _ = reference(dW, H, s)
    assert bool(torch.isfinite(X).all())
    torch.testing.assert_close(X, expected, rtol=1e-8, atol=1e-10)


def test_dead_inputs_get_a_unit_diagonal_as_published():
    H = gram(8, 30, 11)
    H[3, :] = 0.0
    H[:, 3] = 0.0
    dW = randn(5, 8, seed=12)
    assert safety_factor(H).dead == 1
    s = s_for_share(0.5, dW, H, 2048)
    X, _ = safe_delta_update(dW, H, s)
    expected, _ = reference(dW, H, s)
    torch.testing.assert_close(X, expected, rtol=1e-10, atol=1e-12)


def test_the_scale_of_the_gram_does_not_matter():
    # Why csulora's S_h (mean eigenvalue 1) stands in for the published H = (2 / samples) sum x x^T.
    dW, H = randn(9, 16, seed=13), gram(16, 50, 14)
    s = s_for_share(0.4, dW, H, 2048)
    X1, stats1 = safe_delta_update(dW, H, s)
    X2, stats2 = safe_delta_update(dW, H * 377.0, s)
    assert stats1.kept == stats2.kept
    torch.testing.assert_close(X1, X2, rtol=1e-9, atol=1e-12)


def test_the_factor_is_the_upper_cholesky_factor_of_the_damped_inverse():
    H = gram(12, 30, 15)
    factor = safety_factor(H, dtype=torch.float64)
    damped = H + 0.01 * float(H.diagonal().mean()) * torch.eye(12, dtype=torch.float64)
    expected = torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)
    torch.testing.assert_close(factor.U, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(factor.sensitivity, expected.diagonal() ** -2, rtol=1e-10, atol=0.0)
    assert factor.dead == 0 and safety_factor(H).U.dtype == torch.float32


def test_bad_grams_and_shapes_are_value_errors():
    with pytest.raises(ValueError, match="not positive definite"):
        safety_factor(-torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="square"):
        safety_factor(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="NaN"):
        safety_factor(torch.full((3, 3), math.nan))
    with pytest.raises(ValueError, match="columns"):
        safe_delta_update(torch.zeros(2, 5), torch.eye(4), 0.1)


def test_float32_sweep_agrees_with_float64():
    dW, H = randn(12, 40, seed=16), gram(40, 100, 17)
    s = s_for_share(0.4, dW, H, 16)
    X64, _ = safe_delta_update(dW, H, s, block_columns=16)
    X32, _ = safe_delta_update(dW.float(), H, s, block_columns=16)
    assert X32.dtype == torch.float32
    assert float((X32.double() - X64).norm() / X64.norm()) < 1e-5


def test_kept_entries_never_reach_into_the_excluded_share():
    residual = torch.ones(10, 3, dtype=torch.float64)
    mask = kept_entries(residual, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), 1e12)
    assert int(mask.sum()) == 30 - int(0.15 * 30)
    assert bool(mask[:, :2].all()) and int(mask[:, 2].sum()) == 6 and bool(mask[:6, 2].all())


# -- options, sweep, and the (unregistered) method's dense form ----------------------------------------
def test_config_validates_and_stores_a_float():
    import numpy as np

    assert SafeDeltaConfig().s == 0.1
    assert type(SafeDeltaConfig(s=np.float64(0.3)).s) is float
    for bad in (-0.1, math.nan, "x", True):
        with pytest.raises(OptionError, match="--s"):
            SafeDeltaConfig(s=bad)


def test_tuning_goes_from_weakest_to_strongest_and_has_no_identity():
    assert SAFEDELTA_TUNING.knob == "s" and SAFEDELTA_TUNING.identity is None
    assert SAFEDELTA_TUNING.order_weakest_first(SAFEDELTA_TUNING.grid) == SAFEDELTA_TUNING.grid
    assert SAFEDELTA_TUNING.grid[0] > SafeDeltaConfig().s > SAFEDELTA_TUNING.grid[-1] == 0.0


def _calibration(H):
    moment = SecondMoment(n=H.shape[0], matrix=H)
    return ModuleCalibration(group="g", harmful=moment, task=moment)


def test_dense_form_writes_the_sweep_and_shares_the_factor_across_a_group():
    method = SafeDelta()
    H = gram(10, 40, 18)
    H = H / (H.trace() / 10)
    calibration = _calibration(H)
    run = method.dense_run(SafeDeltaConfig(s=s_for_share(0.4, randn(6, 10, seed=19), H, 2048)))
    results = []
    for seed in (19, 20):
        dW = randn(6, 10, seed=seed)
        results.append(method.correct_dense(DenseModuleInput(name=f"m{seed}", update=dW.clone(), calibration=calibration), run))
        expected, _ = safe_delta_update(dW, H, run.config.s)
        torch.testing.assert_close(results[-1].update, expected, rtol=1e-10, atol=1e-12)
    first = run.factors.factor
    assert first is not None and run.factors.get(calibration, torch.float64) is first
    report = results[0].report
    assert report["s"] == run.config.s and 0 < report["kept_share"] < 1 and report["calibration_group"] == "g"
    assert report["dw_norm_after"] == pytest.approx(float(results[0].update.norm()))


def test_dense_form_leaves_a_zero_update_and_refuses_missing_statistics_and_adapters():
    method = SafeDelta()
    H = torch.eye(4, dtype=torch.float64)
    zero = method.correct_dense(
        DenseModuleInput(name="z", update=torch.zeros(3, 4, dtype=torch.float64), calibration=_calibration(H)),
        SafeDeltaConfig(),
    )
    assert zero.update is None and zero.report["kept_share"] == 0.0
    with pytest.raises(InputError, match="needs the module's activation statistics"):
        method.correct_dense(DenseModuleInput(name="x", update=torch.ones(3, 4)), SafeDeltaConfig())
    with pytest.raises(InputError, match="inputs of size 4 but the update has 5 columns"):
        method.correct_dense(DenseModuleInput(name="x", update=torch.ones(3, 5), calibration=_calibration(H)), SafeDeltaConfig())
    lora = ModuleInput(name="a", update=LoraUpdate(A=torch.ones(1, 4), B=torch.ones(3, 1), scale=1.0))
    assert not method.has_factored_form  # the pipeline densifies an adapter for it (tests/pipeline/test_dense_adapter.py)
    with pytest.raises(OptionError, match="has no factored form"):
        method.correct_module(lora, SafeDeltaConfig())
