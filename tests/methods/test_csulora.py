"""CSULoRA: closed form vs a dense argmin, schedules, rank modes, restoration, edge cases."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from csulora.linalg.geometry import ModuleGeometry
from csulora.errors import OptionError
from csulora.types import REPORT_KEYS, LoraUpdate, ModuleInput
from csulora.methods.csulora import RATIO_EPS, Csulora, CsuloraConfig, shrunk_factors
from csulora.methods.resta import Resta, RestaConfig
from csulora.linalg.subspace import SubspaceConfig, compute_subspace

METHOD = Csulora()


def make_module(m, n, r, k, *, seed=0, scale=2.0, zero_d=False, zero_dw=False):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(m, r, generator=g, dtype=torch.float64)
    A = torch.randn(r, n, generator=g, dtype=torch.float64)
    if zero_dw:
        B = torch.zeros_like(B)
    D = torch.zeros(m, n) if zero_d else torch.randn(m, n, generator=g)
    return ModuleInput(
        name="model.layers.1.mlp.up_proj",
        update=LoraUpdate(A=A, B=B, scale=scale),
        subspace=compute_subspace(D, SubspaceConfig(rank=k, algorithm="exact")),
        displacement=D,
    )


def projectors(module):
    U, V = module.subspace.U, module.subspace.V
    m, n = U.shape[0], V.shape[0]
    PU, PV = U @ U.T, V @ V.T
    return PU, torch.eye(m, dtype=torch.float64) - PU, PV, torch.eye(n, dtype=torch.float64) - PV


def dense_rho(module):
    dW = module.update.dense()
    PU, QU, PV, QV = projectors(module)
    energies = [
        float((PU @ dW @ PV).square().sum()),
        float((PU @ dW @ QV + QU @ dW @ PV).square().sum()),
        float((QU @ dW @ QV).square().sum()),
    ]
    total = sum(energies)
    return [e / total for e in energies]


def dense_lambdas(rho, gamma, schedule):
    rho_F, rho_P, rho_O = rho
    if schedule == "energy":
        return gamma * rho_P, gamma * rho_O
    if schedule == "ratio":
        return gamma * rho_P / (rho_F + 1e-3), gamma * rho_O / (rho_F + 1e-3)
    return gamma, gamma


def dense_argmin(module, lam_P, lam_O, beta):
    """Minimise ||X-dW||^2 + lam_P||Pi_P X||^2 + lam_O||Pi_O X||^2 - 2 beta <X, D_k>.

    Written on vec(X) (row-major: vec(L X R) = kron(L, R^T) vec(X)) and solved from the
    normal equations of the quadratic, without using that the Pi are projectors.
    """
    PU, QU, PV, QV = projectors(module)
    m, n = PU.shape[0], PV.shape[0]
    Pi_P = torch.kron(PU, QV) + torch.kron(QU, PV)
    Pi_O = torch.kron(QU, QV)
    sub = module.subspace
    Dk = sub.U @ torch.diag(sub.S) @ sub.V.T
    H = torch.eye(m * n, dtype=torch.float64) + lam_P * Pi_P.T @ Pi_P + lam_O * Pi_O.T @ Pi_O
    rhs = module.update.dense().reshape(-1) + beta * Dk.reshape(-1)
    return torch.linalg.solve(H, rhs).reshape(m, n)


shapes = dict(
    m=st.integers(1, 7), n=st.integers(1, 7), r=st.integers(1, 3), k=st.integers(1, 7),
    seed=st.integers(0, 10_000),
)


@settings(max_examples=40, deadline=None)
@given(
    **shapes,
    gamma=st.sampled_from([0.3, 1.0, 4.0]),
    schedule=st.sampled_from(["energy", "ratio", "constant"]),
    beta=st.sampled_from([0.0, 0.7]),
    scale=st.sampled_from([2.0, 0.25, -1.0]),
)
def test_closed_form_matches_dense_argmin(m, n, r, k, seed, gamma, schedule, beta, scale):
    module = make_module(m, n, r, min(k, m, n), seed=seed, scale=scale)
    result = METHOD.correct_module(module, CsuloraConfig(gamma=gamma, schedule=schedule, restore=beta))
    report = result.report
    rho = dense_rho(module)
    lam_P, lam_O = dense_lambdas(rho, gamma, schedule)
    assert report["lam_P"] == pytest.approx(lam_P, rel=1e-9, abs=1e-12)
    assert report["lam_O"] == pytest.approx(lam_O, rel=1e-9, abs=1e-12)
    assert report["c_P"] == pytest.approx(1 / (1 + lam_P)) and report["c_O"] == pytest.approx(1 / (1 + lam_O))
    expected = dense_argmin(module, lam_P, lam_O, beta)
    assert result.update.scale == scale
    assert torch.allclose(result.update.dense(), expected, atol=1e-9)
    k_eff = module.subspace.rank
    assert result.update.rank <= r + min(r, k_eff) + (k_eff if beta > 0 else 0)
    assert report["rank_out"] == result.update.rank and report["rank_in"] == r
    assert report["dw_norm_after"] == pytest.approx(float(expected.norm()), rel=1e-9)
    assert report["compress_energy_dropped"] is None
    assert set(report) == set(REPORT_KEYS)


@settings(max_examples=30, deadline=None)
@given(**shapes, beta=st.sampled_from([0.0, 0.5]), schedule=st.sampled_from(["energy", "constant"]))
def test_compress_is_best_rank_q_truncation(m, n, r, k, seed, beta, schedule):
    module = make_module(m, n, r, min(k, m, n), seed=seed)
    exact = METHOD.correct_module(module, CsuloraConfig(gamma=2.0, schedule=schedule, restore=beta))
    small = METHOD.correct_module(
        module, CsuloraConfig(gamma=2.0, schedule=schedule, restore=beta, rank_mode="compress")
    )
    q = r + (module.subspace.rank if beta > 0 else 0)
    assert small.update.rank <= q
    X = exact.update.dense()
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    keep = min(q, S.numel())
    assert torch.allclose(small.update.dense(), U[:, :keep] @ torch.diag(S[:keep]) @ Vh[:keep], atol=1e-9)
    dropped = float(S[keep:].square().sum() / S.square().sum())
    assert small.report["compress_energy_dropped"] == pytest.approx(dropped, abs=1e-10)
    assert small.report["rank_out"] == small.update.rank


def test_compress_reports_energy_dropped_on_a_real_case():
    module = make_module(12, 10, 4, 3, seed=3)
    result = METHOD.correct_module(module, CsuloraConfig(gamma=4.0, schedule="constant", rank_mode="compress"))
    assert result.update.rank == 4
    assert 0.0 < result.report["compress_energy_dropped"] < 1.0


def test_rank_r_form_when_c_O_is_c_P_squared():
    module = make_module(9, 8, 3, 2, seed=5)
    geometry = ModuleGeometry(module)
    B, A = shrunk_factors(geometry, 0.5, 0.25)
    assert B.shape[1] == 3
    PU, QU, PV, QV = projectors(module)
    expected = (PU + 0.5 * QU) @ module.update.dense() @ (PV + 0.5 * QV)
    assert torch.allclose(module.update.scale * B @ A, expected, atol=1e-10)


def test_exact_mode_writes_rank_2r_or_k_plus_r():
    for k, expected in ((5, 6), (2, 5)):  # r = 3: 2r when k >= r, k + r when k < r
        module = make_module(9, 8, 3, k, seed=5)
        result = METHOD.correct_module(module, CsuloraConfig(gamma=2.0))
        assert result.update.rank == result.report["rank_out"] == expected


def test_gamma_zero_returns_the_input_update_untouched():
    module = make_module(8, 6, 2, 3)
    for schedule in ("energy", "ratio", "constant"):
        for mode in ("exact", "compress"):
            result = METHOD.correct_module(module, CsuloraConfig(gamma=0.0, schedule=schedule, rank_mode=mode))
            assert result.update is module.update
            assert result.report["dw_norm_after"] == result.report["dw_norm_before"]


def test_restore_zero_is_byte_identical_to_csulora():
    module = make_module(8, 6, 2, 3, seed=4)
    for mode in ("exact", "compress"):
        plain = METHOD.correct_module(module, CsuloraConfig(gamma=1.5, rank_mode=mode))
        restored = METHOD.correct_module(module, CsuloraConfig(gamma=1.5, rank_mode=mode, restore=0.0))
        assert torch.equal(plain.update.A, restored.update.A)
        assert torch.equal(plain.update.B, restored.update.B)
        assert plain.report == restored.report


@pytest.mark.parametrize("mode", ["exact", "compress"])
def test_gamma_zero_with_restore_is_rank_k_resta(mode):
    module = make_module(8, 6, 2, 3, seed=6, scale=-0.5)
    ours = METHOD.correct_module(module, CsuloraConfig(gamma=0.0, restore=1.3, rank_mode=mode))
    resta = Resta().correct_module(module, RestaConfig(restore=1.3))
    assert torch.equal(ours.update.A, resta.update.A)
    assert torch.equal(ours.update.B, resta.update.B)
    assert ours.update.rank == 2 + 3
    assert ours.report["restore_energy_added"] == pytest.approx(resta.report["restore_energy_added"])


def test_empty_subspace_treats_everything_as_off_subspace():
    module = make_module(7, 5, 2, 3, zero_d=True)
    for schedule in ("energy", "ratio"):  # ratio falls back to energy without a subspace
        result = METHOD.correct_module(module, CsuloraConfig(gamma=3.0, schedule=schedule, restore=2.0))
        report = result.report
        assert (report["rho_F"], report["rho_P"], report["rho_O"]) == (0.0, 0.0, 1.0)
        assert report["lam_O"] == 3.0 and report["c_O"] == 0.25
        assert result.update.rank == 2
        assert torch.allclose(result.update.dense(), 0.25 * module.update.dense())
        assert report["restore_energy_added"] == 0.0


def test_zero_update_is_written_unchanged_without_nan():
    module = make_module(7, 5, 2, 3, zero_dw=True)
    result = METHOD.correct_module(module, CsuloraConfig(gamma=2.0, schedule="ratio", rank_mode="compress"))
    assert result.update is module.update
    report = result.report
    assert (report["rho_F"], report["rho_P"], report["rho_O"]) == (0.0, 0.0, 0.0)
    for key, value in report.items():
        if isinstance(value, float):
            assert math.isfinite(value), key
    # Restoration still adds beta D_k: the closed form with dW = 0.
    restored = METHOD.correct_module(module, CsuloraConfig(gamma=2.0, restore=1.0))
    sub = module.subspace
    assert torch.allclose(restored.update.dense(), sub.U @ torch.diag(sub.S) @ sub.V.T, atol=1e-10)
    assert restored.report["restore_energy_added"] is None


def test_ratio_schedule_uses_rho_F_plus_eps():
    module = make_module(10, 9, 3, 4, seed=11)
    report = METHOD.correct_module(module, CsuloraConfig(gamma=0.5, schedule="ratio")).report
    assert report["lam_P"] == pytest.approx(0.5 * report["rho_P"] / (report["rho_F"] + RATIO_EPS))
    assert report["lam_O"] == pytest.approx(0.5 * report["rho_O"] / (report["rho_F"] + RATIO_EPS))


def test_reruns_are_byte_identical():
    module = make_module(30, 20, 4, 5, seed=2)
    for config in (CsuloraConfig(gamma=2.0, restore=0.5), CsuloraConfig(rank_mode="compress", restore=0.5)):
        first, second = METHOD.correct_module(module, config), METHOD.correct_module(module, config)
        assert torch.equal(first.update.B, second.update.B)
        assert torch.equal(first.update.A, second.update.A)
        assert first.report == second.report


def test_stream_interface_and_needs():
    modules = [make_module(6, 5, 2, 2, seed=s) for s in range(3)]
    config = CsuloraConfig()
    results = list(METHOD.correct(iter(modules), config))
    assert [r.name for r in results] == [m.name for m in modules]
    assert METHOD.needs_subspace(config) and not METHOD.needs_displacement(config)
    assert METHOD.summary(results, config) == {}


@pytest.mark.parametrize(
    "options, flag",
    [
        ({"gamma": -0.1}, "--gamma"),
        ({"gamma": float("nan")}, "--gamma"),
        ({"gamma": "1"}, "--gamma"),
        ({"schedule": "linear"}, "--schedule"),
        ({"rank_mode": "fast"}, "--rank-mode"),
        ({"restore": -1.0}, "--restore"),
    ],
)
def test_option_validation(options, flag):
    with pytest.raises(OptionError, match=flag):
        CsuloraConfig(**options)
