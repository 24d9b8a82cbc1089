"""The contract every registered correction method keeps (one test for all of them).

For each method in the registry, on one module with every input a method may need:
- the report has every key of REPORT_KEYS (methods may add their own on top);
- the adapter's scaling s is kept and the factors' shapes fit the weight;
- the identity setting of its knob returns the input factors unchanged, and through the
  API writes the input adapter's weights byte for byte;
- a knob value out of range is an OptionError before any tensor is read.
A new method added to the registry is checked here without editing this file.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from csulora.pipeline.api import correct_adapter
from csulora.errors import OptionError
from csulora.io.adapters import ADAPTER_WEIGHTS
from csulora.methods.base import CALIBRATION, DISPLACEMENT, INPUT_KINDS, SUBSPACE, UPDATE_STATISTICS
from csulora.methods.registry import METHODS, get_method, make_config
from csulora.linalg.subspace import SubspaceConfig, compute_subspace
from csulora.types import REPORT_KEYS, DenseModuleInput, LoraUpdate, ModuleCalibration, ModuleInput, SecondMoment
from tests.fixtures_tiny import (  # noqa: F401
    tiny_adapter,
    tiny_calibration,
    tiny_pair,
    tiny_subspace,
    tiny_update_statistics,
)

NAMES = list(METHODS)


def random_moment(n: int, generator: torch.Generator, tokens: int = 50) -> SecondMoment:
    X = torch.randn(tokens, n, generator=generator, dtype=torch.float64)
    S = X.T @ X / tokens
    return SecondMoment(n=n, matrix=S / (torch.trace(S) / n), tokens=tokens)


def full_module(m: int = 12, n: int = 10, r: int = 3, k: int = 4, seed: int = 0) -> ModuleInput:
    """One module with every input a method may need: subspace, exact D, calibration."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(m, n, generator=g, dtype=torch.float64)
    calibration = ModuleCalibration(group="g", harmful=random_moment(n, g), task=random_moment(n, g))
    return ModuleInput(
        name="model.layers.0.mlp.up_proj",
        update=LoraUpdate(
            A=torch.randn(r, n, generator=g, dtype=torch.float64),
            B=torch.randn(m, r, generator=g, dtype=torch.float64),
            scale=1.5,
        ),
        subspace=compute_subspace(D, SubspaceConfig(rank=k, algorithm="exact")),
        displacement=D,
        calibration=calibration,
        update_statistics=ModuleCalibration(group="g", harmful=random_moment(n, g), task=random_moment(n, g)),
    )


def tuned_config(name: str, value: float):
    method = get_method(name)
    tuning = method.tuning
    assert tuning is not None
    return make_config(method, {**tuning.fixed, tuning.knob: value})


@pytest.mark.parametrize("name", NAMES)
def test_method_describes_itself(name):
    method = get_method(name)
    assert method.name == name and method.pretty_name
    assert method.inputs <= set(INPUT_KINDS)
    if method.tuning is not None:
        grid = method.tuning.grid
        assert len(grid) >= 2 and len(set(grid)) == len(grid)
        assert method.tuning.order_weakest_first(grid) == grid, "default grid must be weakest first"
        for value in grid:
            tuned_config(name, value)  # every default grid value is a valid setting


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("strongest", [False, True])
def test_report_keys_scaling_and_shapes(name, strongest):
    method = get_method(name)
    module = full_module()
    config = make_config(method, {}) if method.tuning is None else tuned_config(
        name, method.tuning.grid[-1 if strongest else len(method.tuning.grid) // 2]
    )
    if not method.has_factored_form:
        check_dense_contract(method, module, config)
        return
    [result] = list(method.correct([module], config))
    assert set(REPORT_KEYS) <= set(result.report)
    assert result.name == module.name
    assert result.update.scale == module.update.scale
    assert result.update.shape == module.update.shape
    assert result.update.A.shape[0] == result.update.B.shape[1] == result.report["rank_out"]
    assert result.report["rank_in"] == module.update.rank
    assert math.isclose(result.report["dw_norm_before"], float(module.update.dense().norm()), rel_tol=1e-9)
    assert math.isclose(result.report["dw_norm_after"], float(result.update.dense().norm()), rel_tol=1e-9, abs_tol=1e-12)
    assert torch.isfinite(result.update.A).all() and torch.isfinite(result.update.B).all()


def check_dense_contract(method, module: ModuleInput, config) -> None:
    """A method with only a dense form (the pipeline hands an adapter's ``s B A`` to it)."""
    dense = module.update.dense()
    given = DenseModuleInput(name=module.name, update=dense.clone(), subspace=module.subspace,
                             displacement=module.displacement, calibration=module.calibration,
                             update_statistics=module.update_statistics,
                             aligned_weight=torch.randn(dense.shape, dtype=torch.float64))  # fmt: skip
    run = method.dense_run(config)
    result = method.correct_dense(given, run)
    assert set(REPORT_KEYS) <= set(result.report) and result.name == module.name
    assert math.isclose(result.report["dw_norm_before"], float(dense.norm()), rel_tol=1e-9)
    after = dense if result.update is None else result.update
    assert after.shape == dense.shape and torch.isfinite(after).all()
    assert math.isclose(result.report["dw_norm_after"], float(after.norm()), rel_tol=1e-6, abs_tol=1e-12)
    for column, *_ in method.report_columns:
        assert column in result.report, f"{method.name} declares the column {column} but does not report it"


@pytest.mark.parametrize("name", [n for n in NAMES if get_method(n).tuning and get_method(n).tuning.identity is not None])
def test_identity_setting_returns_the_input_factors(name):
    method = get_method(name)
    config = tuned_config(name, method.tuning.identity)
    assert method.is_identity(config)
    module = full_module()
    if not method.has_factored_form:
        given = DenseModuleInput(name=module.name, update=module.update.dense(), calibration=module.calibration)
        assert method.correct_dense(given, method.dense_run(config)).update is None  # left as it was
        return
    [result] = list(method.correct([module], config))
    assert torch.equal(result.update.A, module.update.A) and torch.equal(result.update.B, module.update.B)


@pytest.mark.parametrize("name", [n for n in NAMES if get_method(n).tuning and get_method(n).tuning.identity is not None
                                  and get_method(n).has_factored_form])
def test_identity_setting_writes_the_input_bytes(
    name, tiny_pair, tiny_adapter, tiny_subspace, tiny_calibration, tiny_update_statistics, tmp_path
):
    method = get_method(name)
    config = tuned_config(name, method.tuning.identity)
    sources = sources_for(method.needs(config), tiny_pair, tiny_subspace, tiny_calibration, tiny_update_statistics)
    out = tmp_path / "out"
    correct_adapter(tiny_adapter, out, name, progress=False, **sources, **config.to_dict())
    assert (out / ADAPTER_WEIGHTS).read_bytes() == (Path(tiny_adapter) / ADAPTER_WEIGHTS).read_bytes()


def sources_for(needs: frozenset[str], pair, subspace, calibration, update_statistics) -> dict:
    """The API keyword arguments that supply what a method needs (extend with new input kinds)."""
    unknown = set(needs) - {SUBSPACE, DISPLACEMENT, CALIBRATION, UPDATE_STATISTICS}
    assert not unknown, f"the contract test does not know how to supply {unknown}"
    sources: dict = {"subspace": subspace}
    if DISPLACEMENT in needs:
        sources.update(base=pair[0], aligned=pair[1])
    if CALIBRATION in needs:
        sources["calibration"] = calibration
    if UPDATE_STATISTICS in needs:  # the adapter's own (checked against it and the aligned model)
        sources["update_statistics"] = update_statistics
    return sources


@pytest.mark.parametrize("name", [n for n in NAMES if get_method(n).tuning is not None])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1e9, "strong"])
def test_bad_knob_is_an_option_error(name, bad):
    method = get_method(name)
    with pytest.raises(OptionError) as info:
        make_config(method, {**method.tuning.fixed, method.tuning.knob: bad})
    assert "\n" not in str(info.value)
