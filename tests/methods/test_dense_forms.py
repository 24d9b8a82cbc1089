"""Each method's dense form (full fine-tunes, docs/design.md §5d) against its definition.

Tensors in, tensors out: random float64 dW, D and subspaces, no files. The I/O path is
tested end to end in tests/pipeline/test_checkpoint_api.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from csulora.linalg.geometry import DenseGeometry, geometry_numbers
from csulora.methods.safelora import measure_dense
from csulora.pipeline.audit import audit_numbers
from csulora.errors import OptionError
from csulora.methods.base import CorrectionMethod, MethodConfig
from csulora.methods.registry import METHODS, get_method, make_config
from csulora.linalg.subspace import SubspaceConfig, compute_subspace, empty_subspace
from csulora.types import REPORT_KEYS, DenseModuleInput, LoraUpdate, ModuleInput


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def world(m=9, n=7, k=3, seed=0, inside=False):
    """dW, D (rank k + noise) and D's subspace; ``inside``: dW lies in the subspace (F only)."""
    D = randn(m, 3, seed=seed) @ randn(3, n, seed=seed + 1) + 0.01 * randn(m, n, seed=seed + 2)
    sub = compute_subspace(D, SubspaceConfig(rank=k))
    dW = sub.U @ randn(k, k, seed=seed + 3) @ sub.V.T if inside else randn(m, n, seed=seed + 4)
    return dW, D, sub


def module(dW, D=None, sub=None, name="m"):
    return DenseModuleInput(name=name, update=dW.clone(), subspace=sub, displacement=None if D is None else D.clone())


def parts(dW, U, V):
    PU, PV = U @ U.T, V @ V.T
    QU, QV = torch.eye(len(PU), dtype=dW.dtype) - PU, torch.eye(len(PV), dtype=dW.dtype) - PV
    return PU @ dW @ PV, PU @ dW @ QV + QU @ dW @ PV, QU @ dW @ QV


def written(result, dW):
    return dW if result.update is None else result.update


@settings(max_examples=30)
@given(
    m=st.integers(2, 9), n=st.integers(2, 9), k=st.integers(1, 4), seed=st.integers(0, 1000),
    gamma=st.sampled_from([0.0, 0.5, 4.0]), restore=st.sampled_from([0.0, 0.7]),
    schedule=st.sampled_from(["energy", "ratio", "constant"]),
)  # fmt: skip
def test_csulora_dense_is_the_closed_form(m, n, k, seed, gamma, restore, schedule):
    from csulora.methods.csulora import penalties

    dW, D, sub = world(m, n, min(k, m, n), seed)
    config = make_config("csulora", {"gamma": gamma, "restore": restore, "schedule": schedule})
    result = get_method("csulora").correct_dense(module(dW, D, sub), config)
    F, P, O = parts(dW, sub.U, sub.V)  # noqa: E741
    total = float(dW.square().sum())
    rho = (float(F.square().sum()) / total, float(P.square().sum()) / total, float(O.square().sum()) / total)
    lam_P, lam_O = penalties(rho, gamma, schedule, subspace_empty=sub.rank == 0)
    want = F + P / (1 + lam_P) + O / (1 + lam_O) + restore * sub.U @ torch.diag(sub.S) @ sub.V.T
    torch.testing.assert_close(written(result, dW), want)
    assert (result.update is None) == (gamma == 0.0 and restore == 0.0)
    for key, value in zip(("rho_F", "rho_P", "rho_O"), rho):
        assert result.report[key] == pytest.approx(value, abs=1e-10)


def test_energies_of_an_update_inside_the_subspace_do_not_cancel():
    dW, D, sub = world(40, 30, 3, seed=1, inside=True)
    geometry = DenseGeometry(module(dW, D, sub))
    energies = geometry.part_energies
    # P and O are exactly zero up to rounding of dW itself, not up to rounding of ||dW||^2
    assert energies.P <= 1e-24 * energies.F and energies.O <= 1e-24 * energies.F
    assert energies.fractions()[0] == pytest.approx(1.0)


@pytest.mark.parametrize("restore", [0.0, 1.5])
def test_resta_dense_adds_the_exact_displacement_or_its_rank_k_part(restore):
    dW, D, sub = world(seed=2)
    config = make_config("resta", {"restore": restore})
    exact = get_method("resta").correct_dense(module(dW, D, sub), config)
    torch.testing.assert_close(written(exact, dW), dW + restore * D)
    rank_k = get_method("resta").correct_dense(module(dW, None, sub), config)
    torch.testing.assert_close(written(rank_k, dW), dW + restore * sub.U @ torch.diag(sub.S) @ sub.V.T)
    assert exact.report["restore_source"] == "D" and rank_k.report["restore_source"] == "D_k"
    assert (exact.update is None) == (restore == 0.0)
    assert exact.report["restore_energy_added"] == pytest.approx(restore**2 * float(D.square().sum() / dW.square().sum()))


def test_scale_dense_scales_in_the_update_buffer():
    dW, _, _ = world(seed=3)
    given = module(dW)
    result = get_method("scale").correct_dense(given, make_config("scale", {"factor": 0.25}))
    assert result.update is given.update  # no second m x n buffer
    torch.testing.assert_close(result.update, 0.25 * dW)
    assert result.report["dw_norm_after"] == pytest.approx(0.25 * float(dW.norm()))
    assert get_method("scale").correct_dense(module(dW), make_config("scale", {"factor": 1.0})).update is None


@pytest.mark.parametrize("projection", ["approx", "exact"])
def test_safelora_dense_projects_when_the_cosine_is_at_most_the_threshold(projection):
    dW, D, sub = world(12, 8, 2, seed=4)
    C = D @ D.T / D.norm() if projection == "approx" else sub.U @ sub.U.T
    cos = round(float((C @ dW * dW).sum() / ((C @ dW).norm() * dW.norm())), 5)
    for threshold, projected in ((cos, True), (cos - 1e-3, False)):
        config = make_config("safelora", {"select": "threshold", "threshold": threshold, "projection": projection})
        result = get_method("safelora").correct_dense(module(dW, D, sub), config)
        assert result.report["safelora_cos"] == cos and result.report["projected"] is projected
        torch.testing.assert_close(written(result, dW), C @ dW if projected else dW)
        want_dist = 1.0 if projected else 1.0 / (1.0 + float((dW - C @ dW).norm()))
        assert result.report["safelora_dist"] == pytest.approx(want_dist)


def test_safelora_number_mode_measures_once_and_touches_only_the_selected():
    safelora = get_method("safelora")
    config = make_config("safelora", {"num_layers": 1})
    inputs = {f"m{i}": world(seed=10 + i) for i in range(3)}
    assert safelora.needs_dense_first_pass(config)
    measures = {name: safelora.dense_first_pass(module(dW, D, sub, name), config) for name, (dW, D, sub) in inputs.items()}
    plan = safelora.dense_run(config, measures)
    lowest = min(measures, key=lambda name: measures[name].cos)
    for name, (dW, D, sub) in inputs.items():
        given = module(dW, D, sub, name)
        result = safelora.correct_dense(given, plan)
        assert result.report["projected"] is (name == lowest)
        if name != lowest:
            assert torch.equal(given.update, dW)  # not selected: no second pass over it
    with pytest.raises(ValueError, match="first stream"):
        safelora.correct_dense(module(*inputs["m0"]), config)


@pytest.mark.parametrize("spiked", [False, True])
def test_calibrated_dense_solves_the_closed_form_by_blocks(monkeypatch, spiked):
    import csulora.methods.calibrated as calibrated
    from csulora.linalg.gram import dense_moment, moment_matrix, spiked_moment
    from csulora.types import ModuleCalibration

    monkeypatch.setattr(calibrated, "_DENSE_BLOCK_ELEMENTS", 20)  # a few rows per block
    n = 12
    g = torch.Generator().manual_seed(3)
    grams = [(X.T @ X) for X in (torch.randn(40, n, generator=g, dtype=torch.float64) for _ in range(2))]
    moment = (lambda gram: spiked_moment(gram, 40, 4)) if spiked else (lambda gram: dense_moment(gram, 40))
    stats = ModuleCalibration(group="g", harmful=moment(grams[0]), task=moment(grams[1]))
    dW = randn(9, n, seed=9)
    given = DenseModuleInput("m", dW.clone(), calibration=stats)
    result = get_method("calibrated").correct_dense(given, make_config("calibrated", {"strength": 5.0, "mu": 0.1}))
    S_h, S_t = moment_matrix(stats.harmful), moment_matrix(stats.task)
    T = S_t + 0.1 * torch.eye(n, dtype=torch.float64)
    want = dW @ T @ torch.linalg.inv(T + 5.0 * S_h)
    assert result.update is given.update
    torch.testing.assert_close(result.update, want, atol=1e-10, rtol=1e-10)  # S_h, S_t: the stored (spiked) matrices
    kept = float(((result.update @ S_h) * result.update).sum() / ((dW @ S_h) * dW).sum())
    assert result.report["harmful_action_kept"] == pytest.approx(kept, rel=1e-6)
    zero = get_method("calibrated").correct_dense(DenseModuleInput("m", dW.clone(), calibration=stats), make_config("calibrated", {"strength": 0.0}))
    assert zero.update is None


def test_empty_subspace_and_zero_update_are_defined():
    dW, D, _ = world(seed=5)
    empty = empty_subspace(*dW.shape)
    result = get_method("csulora").correct_dense(module(dW, torch.zeros_like(D), empty), make_config("csulora", {"gamma": 1.0}))
    torch.testing.assert_close(result.update, dW / 2)  # all off-subspace: c_O = 1 / (1 + 1)
    zero = torch.zeros_like(dW)
    for name, options in (("csulora", {"gamma": 2.0}), ("safelora", {"select": "threshold"}), ("resta", {"restore": 0.0})):
        _, D2, sub = world(seed=6)
        report = get_method(name).correct_dense(module(zero, D2, sub), make_config(name, options)).report
        assert report["cos_dW_D"] is None and report["safelora_cos"] is None
        json.dumps(report, allow_nan=False)


def test_dense_reports_have_the_lora_report_keys():
    dW, D, sub = world(seed=7)
    dense = audit_numbers(module(dW, D, sub), "approx")
    lora = audit_numbers(ModuleInput("m", LoraUpdate(A=randn(2, 7, seed=1), B=randn(9, 2, seed=2), scale=1.0), sub, D),
                         "approx")  # fmt: skip
    assert set(dense) == set(lora)
    for name, options in (("scale", {"factor": 0.5}), ("resta", {}), ("csulora", {}), ("safelora", {"select": "threshold"})):
        report = get_method(name).correct_dense(module(dW, D, sub), make_config(name, options)).report
        assert set(REPORT_KEYS) <= set(report)
        assert report["rank_in"] is None and report["rank_out"] is None


def test_statistics_are_taken_before_safelora_takes_the_update_buffer():
    dW, D, sub = world(seed=8)
    fresh = {**geometry_numbers(DenseGeometry(module(dW, D, sub))), "cos": measure_dense(DenseGeometry(module(dW, D, sub)), "approx").cos}
    given = module(dW, D, sub)
    geometry = DenseGeometry(given, reuse_update=True)
    measured = measure_dense(geometry, "approx", write=True)  # takes dW's buffer: C dW written over dW
    assert not torch.equal(given.update, dW)
    assert {**geometry_numbers(geometry), "cos": measured.cos} == fresh  # every statistic was taken first
    torch.testing.assert_close(measured.projected, D @ D.T @ dW / D.norm())
    with pytest.raises(RuntimeError, match="overwritten"):
        geometry.intact()


@dataclass(frozen=True)
class _NoOptions(MethodConfig):
    pass


class _LoraOnly(CorrectionMethod[_NoOptions]):
    name = "lora-only"
    pretty_name = "LoRA only"
    config_cls = _NoOptions

    def correct_module(self, module, config):  # pragma: no cover - never called here
        raise AssertionError


def test_a_method_without_a_dense_form_is_refused_in_one_line():
    method = _LoraOnly()
    assert not method.has_dense_form
    with pytest.raises(OptionError, match=r"^--method lora-only \(LoRA only\) has no dense form") as info:
        method.check_dense_options(_NoOptions())
    assert "\n" not in str(info.value)
    assert {name for name, m in METHODS.items() if m.has_dense_form} == set(METHODS)  # every method has one


def test_calibrated_action_shares_on_a_row_sample_of_a_tall_update(monkeypatch):
    import csulora.methods.calibrated as calibrated
    from csulora.linalg.gram import dense_moment, moment_matrix
    from csulora.types import ModuleCalibration

    monkeypatch.setattr(calibrated, "_ACTION_SAMPLE_ROWS", 4)  # every 5th of 18 rows: 0, 5, 10, 15
    monkeypatch.setattr(calibrated, "_DENSE_BLOCK_ELEMENTS", 21)  # blocks of 3 rows: samples inside blocks
    g = torch.Generator().manual_seed(4)
    grams = [(X.T @ X) for X in (torch.randn(30, 7, generator=g, dtype=torch.float64) for _ in range(2))]
    stats = ModuleCalibration(group="g", harmful=dense_moment(grams[0], 30), task=dense_moment(grams[1], 30))
    dW = randn(18, 7, seed=5)
    result = get_method("calibrated").correct_dense(DenseModuleInput("m", dW.clone(), calibration=stats), make_config("calibrated", {"strength": 3.0}))
    rows = [0, 5, 10, 15]
    S_h = moment_matrix(stats.harmful)
    want = float(((result.update[rows] @ S_h) * result.update[rows]).sum() / ((dW[rows] @ S_h) * dW[rows]).sum())
    assert result.report["harmful_action_kept"] == pytest.approx(want, rel=1e-9)


def test_a_held_solve_does_not_keep_its_statistics_alive():
    import gc
    import weakref

    from csulora.linalg.gram import dense_moment
    from csulora.methods.calibrated import _Solves
    from csulora.types import ModuleCalibration

    g = torch.Generator().manual_seed(6)
    grams = [(X.T @ X) for X in (torch.randn(30, 6, generator=g, dtype=torch.float64) for _ in range(2))]
    stats = ModuleCalibration(group="g", harmful=dense_moment(grams[0], 30), task=dense_moment(grams[1], 30))
    solves = _Solves(limit=1)
    solve = solves.get(stats, 3.0, 0.01)
    assert solves.get(stats, 3.0, 0.01) is solve  # the same statistics: the factorisation is reused
    alive = weakref.ref(stats)
    del stats
    gc.collect()
    assert alive() is None  # a full fine-tune's file lets a group go: its 268 MB (7B) must go too
    again = ModuleCalibration(group="g", harmful=dense_moment(grams[0], 30), task=dense_moment(grams[1], 30))
    assert solves.get(again, 3.0, 0.01) is not solve  # another object of the same group: rebuilt
