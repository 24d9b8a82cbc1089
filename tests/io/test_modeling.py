from __future__ import annotations

import shutil

import pytest
import torch

from csulora.errors import InputError
from csulora.io.modeling import check_adapter_dir, load_model


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


def test_loading_is_quiet_and_restores_the_libraries_settings(tiny_world, capfd):
    """issue 13: the demo printed a "Loading weights" bar per load and PEFT's FutureWarnings."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_model(tiny_world.aligned, tiny_world.attacked, device="cpu")
    out, err = capfd.readouterr()
    assert "Loading weights" not in err + out and err == "", err
    assert not [w for w in caught if issubclass(w.category, FutureWarning | DeprecationWarning)], caught
    assert hf_logging.is_progress_bar_enabled() and hf_logging.get_verbosity() == verbosity


def test_hub_id_model_is_resolved_through_the_hub_cache(tiny_world, tmp_path, monkeypatch):
    from tests.io.test_hub import use_fake_hub

    repos = {"tiny-org/aligned": tiny_world.aligned, "tiny-org/attacked": tiny_world.attacked}
    use_fake_hub(monkeypatch, tmp_path / "hub", repos)
    model, _ = load_model("tiny-org/aligned", "tiny-org/attacked", device="cpu")
    reference, _ = load_model(tiny_world.aligned, tiny_world.attacked, device="cpu")
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(InputError, match=r"MODEL tiny-org/missing is not a folder and the hub is unreachable"):
        load_model("tiny-org/missing", device="cpu")
