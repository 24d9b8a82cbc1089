from __future__ import annotations

import shutil

import pytest
import torch

from csulora.errors import InputError
from csulora.modeling import check_adapter_dir, load_model


def test_load_model_merges_the_adapter_and_pads_left(tiny_world):
    base, tok = load_model(tiny_world.aligned, device="cpu")
    merged, _ = load_model(tiny_world.aligned, tiny_world.attacked, device="cpu")
    assert tok.padding_side == "left" and tok.pad_token is not None
    name = "model.layers.0.self_attn.q_proj.weight"
    w0, w1 = dict(base.named_parameters())[name], dict(merged.named_parameters())[name]
    assert w0.shape == w1.shape and not torch.equal(w0, w1)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert not merged.training


def test_unknown_folder_and_pickled_model_are_refused(tiny_world, tmp_path):
    with pytest.raises(InputError, match="no such checkpoint folder"):
        load_model(tmp_path / "missing")
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_world.base, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(InputError, match=r"pickled.*safetensors") as info:
        load_model(pickled)
    assert "\n" not in str(info.value)


def test_bad_adapter_folders(tiny_world, tmp_path):
    with pytest.raises(InputError, match="no such adapter folder"):
        check_adapter_dir(tmp_path / "none")
    pickled = tmp_path / "pickled-adapter"
    shutil.copytree(tiny_world.attacked, pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(InputError, match="pickled"):
        load_model(tiny_world.aligned, pickled)
