"""Audit statistics in factored form against dense computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from csulora.linalg.geometry import ModuleGeometry
from csulora.methods.safelora import round_cosine
from csulora.pipeline.audit import audit_numbers


def audit_numbers_approx(module):
    return audit_numbers(module, "approx")
from csulora.types import LoraUpdate, ModuleInput
from csulora.linalg.subspace import SubspaceConfig, compute_subspace

AUDIT_KEYS = {
    "rho_F", "rho_P", "rho_O", "dw_norm", "safelora_cos", "cos_dW_D", "dw_over_d",
    "subspace_rank", "subspace_energy", "d_source",
}


def make_module(m, n, r, k, *, seed=0, scale=2.0, with_d=True, with_subspace=True, zero_d=False):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(m, r, generator=g, dtype=torch.float64)
    A = torch.randn(r, n, generator=g, dtype=torch.float64)
    # float64 D: products with D are taken in D's precision, so this compares at 1e-12.
    D = torch.zeros(m, n) if zero_d else torch.randn(m, n, generator=g, dtype=torch.float64)
    subspace = compute_subspace(D, SubspaceConfig(rank=k, algorithm="exact")) if with_subspace else None
    return ModuleInput(
        name="model.layers.0.self_attn.v_proj",
        update=LoraUpdate(A=A, B=B, scale=scale),
        subspace=subspace,
        displacement=D if with_d else None,
    )


def dense_parts(module):
    dW = module.update.dense()
    U, V = module.subspace.U, module.subspace.V
    PU, PV = U @ U.T, V @ V.T
    QU, QV = torch.eye(PU.shape[0], dtype=torch.float64) - PU, torch.eye(PV.shape[0], dtype=torch.float64) - PV
    return PU @ dW @ PV, PU @ dW @ QV + QU @ dW @ PV, QU @ dW @ QV


def dense_cos(x, y):
    return float((x * y).sum() / (x.norm() * y.norm()))


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 8), n=st.integers(1, 8), r=st.integers(1, 4), k=st.integers(1, 8),
    seed=st.integers(0, 10_000), scale=st.sampled_from([0.5, 2.0, -1.5]),
)
def test_parts_are_orthogonal_sum_to_dw_and_energies_match(m, n, r, k, seed, scale):
    module = make_module(m, n, r, min(k, m, n), seed=seed, scale=scale)
    F, P, O = dense_parts(module)
    dW = module.update.dense()
    assert torch.allclose(F + P + O, dW, atol=1e-10)
    for X, Y in ((F, P), (F, O), (P, O)):
        assert abs(float((X * Y).sum())) < 1e-9 * max(1.0, float(dW.square().sum()))
    geometry = ModuleGeometry(module)
    sp = geometry.split
    assert torch.allclose(scale * sp.X1 @ sp.Y1, F, atol=1e-10)
    report = audit_numbers_approx(module)
    rho = [report["rho_F"], report["rho_P"], report["rho_O"]]
    assert sum(rho) == pytest.approx(1.0, abs=1e-12)
    total = float(dW.square().sum())
    for value, part in zip(rho, (F, P, O)):
        assert value == pytest.approx(float(part.square().sum()) / total, abs=1e-10)
    assert report["dw_norm"] == pytest.approx(float(dW.norm()), rel=1e-12)


@settings(max_examples=30, deadline=None)
@given(m=st.integers(2, 8), n=st.integers(2, 8), r=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_cosines_and_norm_ratio_match_dense(m, n, r, seed):
    k = min(m, n) - 1 or 1
    module = make_module(m, n, r, k, seed=seed)
    D = module.displacement.double()
    dW = module.update.dense()
    BA = module.update.B @ module.update.A
    report = audit_numbers_approx(module)
    assert report["d_source"] == "exact"
    assert report["cos_dW_D"] == pytest.approx(dense_cos(dW, D), abs=1e-12)
    assert report["dw_over_d"] == pytest.approx(float(dW.norm() / D.norm()), rel=1e-12)
    C = D @ D.T / D.norm()
    assert report["safelora_cos"] == round_cosine(dense_cos(C @ BA, BA))
    U = module.subspace.U
    exact = audit_numbers(module, "exact")
    assert exact["safelora_cos"] == round_cosine(dense_cos(U @ U.T @ BA, BA))
    # From the subspace alone: cosine against D_k, the norm ratio still exact.
    module.displacement = None
    rank_k = audit_numbers_approx(module)
    sub = module.subspace
    Dk = sub.U @ torch.diag(sub.S) @ sub.V.T
    assert rank_k["d_source"] == "rank-k"
    assert rank_k["cos_dW_D"] == pytest.approx(dense_cos(dW, Dk), abs=1e-12)
    assert rank_k["dw_over_d"] == pytest.approx(report["dw_over_d"], rel=1e-12)
    assert rank_k["safelora_cos"] is None  # the published approx cosine needs D itself
    assert rank_k["subspace_rank"] == k
    assert rank_k["subspace_energy"] == pytest.approx(float(sub.S.square().sum() / D.square().sum()))


def test_keys_and_json_types():
    report = audit_numbers_approx(make_module(6, 5, 2, 2))
    assert set(report) == AUDIT_KEYS
    for key, value in report.items():
        assert value is None or isinstance(value, (float, int, str)), key


def assert_no_nan(report):
    for key, value in report.items():
        if isinstance(value, float):
            assert math.isfinite(value), key


def test_zero_displacement_is_all_off_subspace_without_nan():
    module = make_module(6, 5, 2, 3, zero_d=True)
    report = audit_numbers_approx(module)
    assert report["subspace_rank"] == 0
    assert (report["rho_F"], report["rho_P"], report["rho_O"]) == (0.0, 0.0, 1.0)
    assert report["safelora_cos"] is None and report["cos_dW_D"] is None and report["dw_over_d"] is None
    assert audit_numbers(module, "exact")["safelora_cos"] is None
    assert_no_nan(report)


def test_zero_update_has_zero_rho_and_no_cosines():
    module = make_module(6, 5, 2, 3)
    module.update = LoraUpdate(A=module.update.A, B=torch.zeros(6, 2, dtype=torch.float64), scale=2.0)
    report = audit_numbers_approx(module)
    assert (report["rho_F"], report["rho_P"], report["rho_O"]) == (0.0, 0.0, 0.0)
    assert report["dw_norm"] == 0.0 and report["dw_over_d"] == 0.0
    assert report["safelora_cos"] is None and report["cos_dW_D"] is None
    assert_no_nan(report)


def test_without_subspace_or_displacement_only_norms_are_reported():
    report = audit_numbers_approx(make_module(5, 4, 2, 2, with_d=False, with_subspace=False))
    assert report["d_source"] is None
    assert report["rho_F"] is None and report["subspace_rank"] is None
    assert report["cos_dW_D"] is None and report["dw_over_d"] is None
    assert report["dw_norm"] > 0


def test_round_cosine_is_numpy_round_half_even():
    for value in (0.123455, 0.123465, -0.4999950, 0.5000049999, 1 / 3):
        assert round_cosine(value) == float(np.round(value, 5))
