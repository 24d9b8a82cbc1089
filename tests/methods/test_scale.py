"""The uniform-scaling baseline."""

from __future__ import annotations

import pytest
import torch

from csulora.errors import OptionError
from csulora.types import REPORT_KEYS, LoraUpdate, ModuleInput
from csulora.methods.scale import Scale, ScaleConfig
from csulora.linalg.subspace import SubspaceConfig, compute_subspace

METHOD = Scale()


def make_module(*, with_subspace=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(7, 3, generator=g, dtype=torch.float64)
    A = torch.randn(3, 5, generator=g, dtype=torch.float64)
    D = torch.randn(7, 5, generator=g)
    return ModuleInput(
        name="model.layers.0.mlp.down_proj",
        update=LoraUpdate(A=A, B=B, scale=4.0),
        subspace=compute_subspace(D, SubspaceConfig(rank=2)) if with_subspace else None,
    )


@pytest.mark.parametrize("factor", [0.0, 0.3, 0.75])
def test_scales_the_update_by_scaling_lora_B(factor):
    module = make_module()
    result = METHOD.correct_module(module, ScaleConfig(factor=factor))
    assert torch.equal(result.update.A, module.update.A)
    assert torch.allclose(result.update.B, factor * module.update.B)
    assert result.update.scale == 4.0 and result.update.rank == 3
    assert torch.allclose(result.update.dense(), factor * module.update.dense())
    report = result.report
    assert set(report) == set(REPORT_KEYS) | {"factor"}  # scale reports its c (report_columns)
    assert report["dw_norm_after"] == pytest.approx(factor * report["dw_norm_before"])
    assert report["rank_in"] == report["rank_out"] == 3
    assert report["rho_F"] is None and report["d_source"] is None  # no subspace given


def test_factor_one_keeps_the_input_and_subspace_adds_audit_numbers():
    module = make_module(with_subspace=True)
    result = METHOD.correct_module(module, ScaleConfig(factor=1.0))
    assert result.update is module.update
    assert result.report["rho_F"] is not None and result.report["d_source"] == "rank-k"


def test_needs_neither_subspace_nor_displacement():
    config = ScaleConfig(factor=0.5)
    assert not METHOD.needs_subspace(config) and not METHOD.needs_displacement(config)
    METHOD.check_sources(config, has_displacement=False, has_subspace=False)


@pytest.mark.parametrize("factor", [None, -0.1, 1.01, float("nan"), "0.5"])
def test_factor_validation(factor):
    with pytest.raises(OptionError, match="--factor"):
        ScaleConfig(factor=factor)
