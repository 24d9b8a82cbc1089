"""``csulora.references.activations``: the batches, token masks and hooks shared by SaLoRA and calibrate."""

from __future__ import annotations

import torch
from torch import nn

from csulora.references.activations import MaskedInputHooks, StopForward, right_padded_batch, run_batches
from csulora.training.data import IGNORE_INDEX


def test_right_padding_and_the_counted_tokens():
    examples = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},  # SaLoRA: response tokens only
        {"input_ids": [8]},  # calibrate: every token
    ]
    inputs, counted = right_padded_batch(examples, pad_id=0, device=torch.device("cpu"))
    assert inputs["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert counted.tolist() == [[False, True, True], [True, False, False]]


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 3)
        self.first, self.second = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return self.second(self.first(self.embed(input_ids)))


class Recorder(MaskedInputHooks):
    def __init__(self, modules, stop_at=None):
        super().__init__(modules)
        self.seen: list[tuple[str, torch.Tensor]] = []
        self.stop_at = stop_at

    def observe(self, name, module, x):
        self.seen.append((name, x))
        if name == self.stop_at:
            raise StopForward


def test_hooks_see_the_counted_rows_and_a_stop_ends_the_forward():
    model = Chain()
    examples = [{"input_ids": [1, 2, 3]}, {"input_ids": [4]}]
    recorder = Recorder({"first": model.first, "second": model.second}, stop_at="first")
    with recorder:
        run_batches(model, examples, recorder, pad_id=0, batch_size=2, progress=False, longest_first=True)
    assert [name for name, _ in recorder.seen] == ["first"]  # "second" never ran
    x = recorder.seen[0][1]
    with torch.no_grad():
        expected = model.embed(torch.tensor([1, 2, 3, 4]))
    assert torch.equal(x, expected)  # 4 real tokens, the 2 padding slots dropped
    assert not model.first._forward_pre_hooks  # removed on exit
