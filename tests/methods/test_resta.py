"""Rank-k RESTA: dW + beta D_k as an exact LoRA of rank r + k."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from csulora.errors import OptionError
from csulora.types import REPORT_KEYS, LoraUpdate, ModuleInput
from csulora.methods.resta import Resta, RestaConfig
from csulora.linalg.subspace import SubspaceConfig, compute_subspace

METHOD = Resta()


def make_module(m, n, r, k, *, seed=0, scale=2.0, zero_d=False):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(m, r, generator=g, dtype=torch.float64)
    A = torch.randn(r, n, generator=g, dtype=torch.float64)
    D = torch.zeros(m, n) if zero_d else torch.randn(m, n, generator=g)
    return ModuleInput(
        name="model.layers.2.self_attn.o_proj",
        update=LoraUpdate(A=A, B=B, scale=scale),
        subspace=compute_subspace(D, SubspaceConfig(rank=k, algorithm="exact")),
        displacement=None,
    )


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(1, 8), n=st.integers(1, 8), r=st.integers(1, 4), k=st.integers(1, 8),
    seed=st.integers(0, 10_000), beta=st.sampled_from([0.25, 1.0, 3.0]),
    scale=st.sampled_from([2.0, 0.125, -1.0]),
)
def test_adds_beta_times_rank_k_displacement(m, n, r, k, seed, beta, scale):
    module = make_module(m, n, r, min(k, m, n), seed=seed, scale=scale)
    result = METHOD.correct_module(module, RestaConfig(restore=beta))
    sub = module.subspace
    Dk = sub.U @ torch.diag(sub.S) @ sub.V.T
    expected = module.update.dense() + beta * Dk
    assert result.update.scale == scale
    assert result.update.rank == r + sub.rank
    assert torch.equal(result.update.B[:, :r], module.update.B)  # the input factors are kept
    assert torch.equal(result.update.A[:r], module.update.A)
    assert torch.allclose(result.update.dense(), expected, atol=1e-10)
    report = result.report
    assert set(report) == set(REPORT_KEYS)
    assert report["rank_out"] == r + sub.rank
    assert report["dw_norm_after"] == pytest.approx(float(expected.norm()), rel=1e-9)
    added = float((beta * Dk).square().sum() / module.update.dense().square().sum())
    assert report["restore_energy_added"] == pytest.approx(added, rel=1e-9)


def test_beta_zero_and_empty_subspace_keep_the_input():
    module = make_module(6, 5, 2, 3)
    assert METHOD.correct_module(module, RestaConfig(restore=0.0)).update is module.update
    empty = make_module(6, 5, 2, 3, zero_d=True)
    result = METHOD.correct_module(empty, RestaConfig(restore=2.0))
    assert result.update is empty.update
    assert result.report["restore_energy_added"] == 0.0


def test_default_strength_and_needs():
    config = RestaConfig()
    assert config.restore == 1.0
    assert METHOD.needs_subspace(config) and not METHOD.needs_displacement(config)
    with pytest.raises(OptionError, match="--subspace"):
        METHOD.check_sources(config, has_displacement=False, has_subspace=False)


@pytest.mark.parametrize("beta", [-0.5, float("inf"), "1"])
def test_restore_validation(beta):
    with pytest.raises(OptionError, match="--restore"):
        RestaConfig(restore=beta)
