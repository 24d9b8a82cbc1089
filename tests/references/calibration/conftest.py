"""Fixtures of the calibration tests: the data files, one calibration of the tiny world, its model."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from csulora.eval.splits import advbench_split
from csulora.eval.tasks import date_task
from csulora.io.modeling import load_model
from tests.references.calibration.helpers import N_PROMPTS, run, write_lines, write_pairs


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("calibration_data")
    harmful = write_lines(root / "harmful.txt", (p.text for p in advbench_split("align")[:N_PROMPTS]))
    task = write_pairs(root / "task.jsonl", date_task("train")[:N_PROMPTS])
    return SimpleNamespace(root=root, harmful=harmful, task=task)


@pytest.fixture(scope="session")
def calibrated(tiny_world, data):
    """One calibration of the tiny world's aligned model (every module, one pass)."""
    return run(tiny_world, data.root / "out" / "calibration.safetensors", data)


@pytest.fixture(scope="session")
def aligned_model(tiny_world):
    return load_model(tiny_world.aligned, device="cpu")


@pytest.fixture
def outs(tmp_path) -> Path:
    folder = tmp_path / "outs"
    folder.mkdir()
    return folder
