"""A method with only a dense form on a LoRA adapter (Safe Delta's case, issue 22): the pipeline hands it
``s B A`` and writes the corrected model, or with ``lora_rank`` its best rank-r LoRA."""

from __future__ import annotations

import json

import pytest
import torch

from csulora.errors import OptionError
from csulora.io.adapters import read_adapter
from csulora.methods import registry
from csulora.pipeline.api import correct_adapter
from tests.fixtures_tiny import merged_weights, tiny_adapter, tiny_pair  # noqa: F401
from tests.toy_methods import DenseHalve


@pytest.fixture
def dense_method(monkeypatch):
    monkeypatch.setitem(registry.METHODS, DenseHalve.name, DenseHalve())
    return DenseHalve.name


def test_a_dense_only_method_needs_aligned(dense_method, tiny_adapter, tmp_path):
    with pytest.raises(OptionError, match="give --aligned ALIGNED"):
        correct_adapter(tiny_adapter, tmp_path / "o", dense_method, strength=0.5)
    with pytest.raises(OptionError, match="--lora-rank applies to an adapter corrected by a method with only a dense"):
        correct_adapter(tiny_adapter, tmp_path / "o", "scale", factor=0.5, lora_rank=2)
    assert not (tmp_path / "o").exists()


def test_the_output_is_the_corrected_model(dense_method, tiny_adapter, tiny_pair, tmp_path):
    out = tmp_path / "fixed"
    report = correct_adapter(tiny_adapter, out, dense_method, aligned=tiny_pair[1], strength=0.5, progress=False)
    written = merged_weights(out)
    aligned = merged_weights(tiny_pair[1])
    adapter = read_adapter(tiny_adapter)
    for name, module in adapter.modules.items():
        update = module.update()
        expected = aligned[name] + 0.5 * update.scale * (update.B @ update.A)
        torch.testing.assert_close(written[name], expected, atol=1e-6, rtol=1e-5)
    untouched = [k for k in aligned if k not in adapter.modules]
    assert untouched and all(torch.equal(written[k], aligned[k]) for k in untouched)
    card = (out / "README.md").read_text()
    assert "Safety-corrected full checkpoint (toy-dense)" in card and "no longer a LoRA" in card
    assert report.untargeted is not None and not any(u["changed"] for u in report.untargeted)


@pytest.mark.parametrize("rank", [1, 4])
def test_lora_rank_writes_the_best_rank_r_lora(dense_method, tiny_adapter, tiny_pair, tmp_path, rank):
    out = tmp_path / f"r{rank}"
    report = correct_adapter(tiny_adapter, out, dense_method, aligned=tiny_pair[1], strength=0.5, lora_rank=rank,
                             progress=False)  # fmt: skip
    adapter, written = read_adapter(tiny_adapter), read_adapter(out)
    assert (out / "adapter_config.json").is_file() and "LoRA adapter" in (out / "README.md").read_text()
    for row in report.modules:
        module = adapter.modules[row["module"]]
        update = module.update()
        target = 0.5 * update.scale * (update.B @ update.A)
        got = written.modules[row["module"]].update()
        dense = got.scale * (got.B @ got.A)
        lost = float((target - dense).square().sum() / target.square().sum())
        assert row["refactor_energy_lost"] == pytest.approx(lost, abs=1e-5)
        if rank >= module.rank:  # the corrected update is rank r_in: nothing is lost
            assert lost < 1e-10 and row["rank_out"] <= module.rank
        else:
            assert lost > 0 and row["rank_out"] == rank
    assert json.loads((out / "csulora_report.json").read_text())["modules"][0]["lora_rank"] == rank


def test_a_module_the_method_leaves_as_it_was_is_the_adapter_merged(dense_method, tiny_adapter, tiny_pair, tmp_path):
    """Strength 0 changes nothing: the corrected model is the aligned one with the adapter merged
    (a densified adapter has no fine-tuned tensor to copy)."""
    correct_adapter(tiny_adapter, tmp_path / "o", dense_method, aligned=tiny_pair[1], strength=0.0, progress=False)
    written, merged = merged_weights(tmp_path / "o"), merged_weights(tiny_pair[1], tiny_adapter)
    for name in read_adapter(tiny_adapter).modules:
        torch.testing.assert_close(written[name], merged[name], atol=1e-6, rtol=1e-5)
