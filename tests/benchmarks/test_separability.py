"""Separability (issue 24): the shares of an isotropic update's action the calibrated correction keeps,
and its command line."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.separability import main
from csulora.references.separability import separability
from csulora.linalg.gram import isotropic_kept
from csulora.types import ModuleCalibration, SecondMoment
from tests.fixtures_tiny import tiny_calibration, tiny_pair  # noqa: F401


def moment(matrix: torch.Tensor) -> SecondMoment:
    n = matrix.shape[0]
    return SecondMoment(n=n, matrix=matrix / (torch.trace(matrix) / n))


def test_disjoint_inputs_keep_the_task_and_drop_the_harm():
    task = torch.diag(torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    harmful = torch.diag(torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64))
    kept_task, kept_harm = isotropic_kept(ModuleCalibration("g", moment(harmful), moment(task)), strength=10.0)
    assert kept_task > 0.95 and kept_harm < 0.01


def test_shared_inputs_cannot_be_told_apart():
    shared = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    kept_task, kept_harm = isotropic_kept(ModuleCalibration("g", moment(shared), moment(shared)), strength=10.0)
    assert kept_task == pytest.approx(kept_harm, rel=1e-9) and kept_task < 0.2


def test_the_dense_reference():
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(40, 5, generator=g, dtype=torch.float64), torch.randn(40, 5, generator=g, dtype=torch.float64)
    S_h, S_t = moment(X.T @ X), moment(Y.T @ Y)
    kept_task, kept_harm = isotropic_kept(ModuleCalibration("g", S_h, S_t), strength=3.0, mu=0.01)
    eye = torch.eye(5, dtype=torch.float64)
    C = (S_t.matrix + 0.01 * eye) @ torch.linalg.inv(S_t.matrix + 0.01 * eye + 3.0 * S_h.matrix)
    for kept, S in ((kept_task, S_t.matrix), (kept_harm, S_h.matrix)):
        assert kept == pytest.approx(float(torch.trace(C @ S @ C.T) / torch.trace(S)), rel=1e-9)


def test_the_command_line_writes_each_name_into_the_json(tiny_calibration, tmp_path):
    out = tmp_path / "separability.json"
    out.write_text(json.dumps({"date": {"kept": "as it was"}}))
    assert main(["--calibration", str(tiny_calibration), "--name", "demo", "--json", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["date"] == {"kept": "as it was"}  # other worlds' entries stay
    assert written["demo"]["median_task_kept"] == separability(tiny_calibration)["median_task_kept"]
