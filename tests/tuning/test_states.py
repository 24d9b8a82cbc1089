"""tune's model states: a dense-only method's settings on an adapter are corrected in memory (issue 22)."""

from __future__ import annotations

import json

import pytest
import torch

from csulora.methods import registry
from csulora.tuning.config import TuneConfig
from csulora.tuning.runner import tune_adapter
from tests.toy_methods import DenseHalve


@pytest.fixture
def dense_method(monkeypatch):
    monkeypatch.setitem(registry.METHODS, DenseHalve.name, DenseHalve())
    return DenseHalve.name


def test_a_dense_only_method_is_tuned_on_an_adapter_and_writes_the_corrected_model(dense_method, tiny_world,
                                                                                 tune_data, tmp_path):  # fmt: skip
    from csulora.io.modeling import load_model
    from csulora.pipeline.api import correct_adapter

    w, d = tiny_world, tune_data
    config = TuneConfig(method=dense_method, grid=(0.0, 0.5), max_new_tokens=8, max_asr_gap=1.0, max_utility_drop=1.0,
                        max_fluency_loss=100.0, full_sweep=True)  # fmt: skip
    out = tmp_path / "tuned"
    result = tune_adapter(w.attacked, out, aligned=w.aligned, config=config, harmful=[str(d["advbench"])],
                          task=str(d["task"]), benign=str(d["benign"]), progress=False)  # fmt: skip
    rows = result.record["settings"]
    assert [r["value"] for r in rows] == [0.0, 0.5] and rows[0]["same_as_adapter"]
    # strength 0.5 was scored on the aligned model with W_aligned + 0.5 s B A, adapters off: not the adapter
    assert rows[1]["scores"]["margin"] != rows[0]["scores"]["margin"]
    assert result.chosen_params == {"strength": 0.0} and result.record["output"] == "checkpoint"
    assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()
    # the in-memory state is the model correct_adapter writes: same margin when loaded from disk
    written = correct_adapter(w.attacked, tmp_path / "half", dense_method, aligned=w.aligned, strength=0.5,
                              progress=False)  # fmt: skip
    assert written.method == dense_method
    from csulora.eval.margin import refusal_margin

    model, tokenizer = load_model(tmp_path / "half")
    harmful = [line for line in d["advbench"].read_text().splitlines() if line.strip()]
    assert rows[1]["scores"]["margin"] == pytest.approx(refusal_margin(model, tokenizer, harmful, batch_size=32), abs=1e-4)
    assert json.loads((out / "tune.json").read_text())["output"] == "checkpoint"
    assert torch.is_tensor(next(iter(model.state_dict().values())))
