"""Settings of a full fine-tune's correction applied in memory (docs/design.md §5d): the same
weights correct_checkpoint writes, and the fine-tuned weights back afterwards."""

from __future__ import annotations

import json

import pytest
import torch

from csulora.pipeline.api import correct_adapter
from csulora.errors import OptionError
from csulora.tuning.checkpoint import corrected_in_memory, model_tensors, same_weights, weights_from
from tests.fixtures_full import full_world  # noqa: F401
from tests.fixtures_tiny import tiny_pair  # noqa: F401


def load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize(("method", "options"), [("csulora", {"gamma": 2.0}), ("safelora", {"num_layers": 3})])
def test_in_memory_weights_are_the_written_ones_and_are_restored(full_world, tmp_path, method, options):
    out = tmp_path / "written"
    correct_adapter(full_world.ft, out, method, aligned=full_world.aligned, base=full_world.base, progress=False,
                       reset_others=True, **options)  # fmt: skip
    model = load(full_world.ft)
    with corrected_in_memory(
        model, full_world.ft, method, aligned=full_world.aligned, base=full_world.base, reset_others=True, **options
    ) as correction:
        assert len(correction.results) == 14
        assert same_weights(model, out)
    assert same_weights(model, full_world.ft)


def test_the_aligned_reference_is_swapped_in_and_out(full_world):
    model = load(full_world.ft)
    with weights_from(model, full_world.aligned, restore_from=full_world.ft):
        assert same_weights(model, full_world.aligned)
    assert same_weights(model, full_world.ft)


def test_bad_options_change_nothing(full_world):
    model = load(full_world.ft)
    before = {name: t.detach().clone() for name, t in model_tensors(model).items()}
    with pytest.raises(OptionError, match="Safe LoRA approx needs the exact D"):
        with corrected_in_memory(model, full_world.ft, "safelora", aligned=full_world.aligned):
            pass
    assert all(torch.equal(before[n], t) for n, t in model_tensors(model).items())


def test_tune_on_a_full_fine_tune_writes_only_the_chosen_checkpoint(tiny_world, tune_data, tmp_path):
    """The tiny world's aligned model fully fine-tuned on the attack data, tuned with RESTA."""
    from csulora.tuning.config import TuneConfig
    from csulora.tuning.runner import tune_adapter

    ft = tiny_full_finetune(tiny_world, tmp_path)
    out = tmp_path / "tuned"
    config = TuneConfig(method="resta", grid=(0.0, 1.0, 3.0), max_new_tokens=8, max_asr_gap=1.0, max_utility_drop=1.0,
                        full_sweep=True)  # every setting scored: the margins of four states are compared
    result = tune_adapter(
        ft, out, aligned=tiny_world.aligned, base=tiny_world.base, config=config,
        harmful=[str(tune_data["advbench"]), str(tune_data["airt"])], task=str(tune_data["task"]),
        benign=str(tune_data["benign"]), progress=False,
    )  # fmt: skip
    assert result.qualified and result.chosen_params == {"restore": 0.0}  # the weakest qualifies (loose bounds)
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tune.json", "tune.png", "README.md"}
    assert "Safety-corrected full checkpoint (resta)" in (out / "README.md").read_text()  # one card for both kinds
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no candidate folders left
    settings = json.loads((out / "tune.json").read_text())["settings"]
    assert [s["value"] for s in settings] == [0.0, 1.0, 3.0] and settings[0]["same_as_adapter"] is True
    record = json.loads((out / "tune.json").read_text())
    margins = [record["aligned"]["margin"], record["adapter"]["margin"], settings[1]["scores"]["margin"], settings[2]["scores"]["margin"]]
    assert len(set(margins)) == 4  # four different model states: aligned, fine-tuned, two corrections
    assert record["adapter"]["benign_fluency"] is not None  # measured with the aligned weights swapped in
    from csulora.io.modeling import load_model

    load_model(out)  # stock transformers loads the chosen checkpoint


def test_tune_antidote_on_a_full_fine_tune_reads_its_update_statistics(tiny_world, tune_data, update_pairs, tmp_path):
    """`csulora calibrate ALIGNED --update CHECKPOINT` feeds tune --method antidote on that checkpoint;
    the chosen checkpoint is what `correct` writes with the same file."""
    from csulora.references.calibration import calibrate_update
    from csulora.tuning.config import TuneConfig
    from csulora.tuning.runner import tune_adapter

    ft = tiny_full_finetune(tiny_world, tmp_path)
    stats = calibrate_update(tiny_world.aligned, tmp_path / "ft-statistics.safetensors", update=ft, pairs=update_pairs,
                             device="cpu", progress=False).path  # fmt: skip
    config = TuneConfig(method="antidote", grid=(0.01, 0.1), max_new_tokens=8, max_asr_gap=1.0, max_utility_drop=1.0,
                        max_fluency_loss=100.0)  # fmt: skip
    result = tune_adapter(
        ft, tmp_path / "tuned", aligned=tiny_world.aligned, update_statistics=stats, config=config,
        harmful=[str(tune_data["advbench"])], task=str(tune_data["task"]), benign=str(tune_data["benign"]), progress=False,
    )  # fmt: skip
    assert result.qualified and result.chosen_method == "antidote" and result.chosen_params == {"dense_ratio": 0.01}
    correct_adapter(ft, tmp_path / "written", "antidote", aligned=tiny_world.aligned, update_statistics=stats,
                    dense_ratio=0.01, progress=False)  # fmt: skip
    chosen = load(tmp_path / "tuned")
    assert same_weights(chosen, tmp_path / "written") and not same_weights(chosen, ft)


def tiny_full_finetune(world, tmp_path):
    from csulora.training.trainer import TrainConfig, train_full

    if "ft" not in _FULL:
        config = TrainConfig(steps=4, batch_size=16, lr=2e-3, max_length=56, progress=False)
        _FULL["ft"] = train_full(world.aligned, world.data / "attack.jsonl", tmp_path / "full-ft", config)
    return _FULL["ft"]


_FULL: dict = {}
