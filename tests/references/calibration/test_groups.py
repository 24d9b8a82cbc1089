"""``csulora.references.calibration.groups``: modules that read one input share one Gram (docs/design.md §5c)."""

from __future__ import annotations

import pytest
from torch import nn

from csulora.errors import InputError
from csulora.io.calibration_file import load_calibration
from csulora.references.calibration.groups import group_name, shared_input_groups
from tests.references.calibration.helpers import L0, L1


class Toy(nn.Module):
    """a and b read one tensor; c reads an equal copy of it; d runs twice; idle never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.a, self.b, self.c = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(4, 4)
        self.d, self.idle = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        x = self.embed(input_ids)
        z = self.a(x) + self.b(x)
        return self.d(self.d(self.c(x.clone()))) + z.sum()


def test_modules_reading_one_tensor_share_a_group(calibrated):
    file = load_calibration(calibrated.path)
    for layer in (L0, L1):
        attn = {file.group_of(f"{layer}.self_attn.{m}") for m in ("q_proj", "k_proj", "v_proj")}
        mlp = {file.group_of(f"{layer}.mlp.{m}") for m in ("gate_proj", "up_proj")}
        assert attn == {f"{layer}.self_attn.q_proj+k_proj+v_proj"}
        assert mlp == {f"{layer}.mlp.gate_proj+up_proj"}
        assert file.group_of(f"{layer}.self_attn.o_proj") == f"{layer}.self_attn.o_proj"
        assert file.group_of(f"{layer}.mlp.down_proj") == f"{layer}.mlp.down_proj"
    assert len(file.modules) == 14 and len(file.groups) == 8
    assert {g.n for g in calibrated.groups} == {64, 192}
    assert calibrated.modules == file.modules


def test_shared_inputs_come_from_the_forward_not_the_names():
    model = Toy()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "idle"}
    groups = shared_input_groups(model, linears, [1, 2, 3])
    assert [(g.name, g.modules, g.calls) for g in groups] == [
        ("a+b", ("a", "b"), 1),
        ("c", ("c",), 1),  # equal values, another tensor: its own Gram
        ("d", ("d",), 2),  # runs twice: its own Gram over both calls
    ]
    with pytest.raises(InputError, match="module idle never runs in the model's forward pass"):
        shared_input_groups(model, {**linears, "idle": model.idle}, [1, 2, 3])


def test_group_names():
    assert group_name(["m.l.0.attn.q", "m.l.0.attn.k"]) == "m.l.0.attn.q+k"
    assert group_name(["m.l.0.mlp.down"]) == "m.l.0.mlp.down"
    assert group_name(["x.a", "y.b"]) == "x.a+y.b"
    assert group_name(["a", "b"]) == "a+b"
