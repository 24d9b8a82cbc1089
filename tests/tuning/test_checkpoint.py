"""Settings of a full fine-tune's correction applied in memory (docs/design.md §5d): the same
weights correct_checkpoint writes, and the fine-tuned weights back afterwards."""

from __future__ import annotations

import pytest
import torch

from csulora.checkpoint_api import correct_checkpoint
from csulora.errors import OptionError
from csulora.tuning.checkpoint import corrected_in_memory, model_tensors, same_weights, weights_from
from tests.fixtures_full import full_world, read_tensors  # noqa: F401
from tests.fixtures_tiny import tiny_pair  # noqa: F401


def load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize(("method", "options"), [("csulora", {"gamma": 2.0}), ("safelora", {"num_layers": 3})])
def test_in_memory_weights_are_the_written_ones_and_are_restored(full_world, tmp_path, method, options):
    out = tmp_path / "written"
    correct_checkpoint(full_world.ft, out, method, aligned=full_world.aligned, base=full_world.base, progress=False,
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
