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


def test_loading_a_model_and_an_adapter_emits_no_future_warning_and_silences_only_that_one(tiny_world):
    """issue 23: every tune/eval printed transformers' `is_gradient_checkpointing` FutureWarning, which
    PEFT triggers whenever an adapter is attached. Silenced exactly there: other warnings still show."""
    import warnings

    from csulora.io.modeling import attach_adapter, no_checkpointing_deprecation, quiet_loading

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_model(tiny_world.aligned, tiny_world.attacked, device="cpu")
        model, _ = load_model(tiny_world.aligned, device="cpu")
        attach_adapter(model, tiny_world.attacked, adapter_name="uncorrected")
        with quiet_loading(), no_checkpointing_deprecation():
            warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed", FutureWarning)
            warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == ["something else is deprecated"]


def test_an_adapter_that_does_not_fit_is_one_line(tiny_world, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from csulora.io.modeling import attach_adapter

    other = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1))  # fmt: skip
    with pytest.raises(InputError, match=r"adapter does not fit the model") as info:
        attach_adapter(other, tiny_world.attacked)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("which", ["model", "adapter"])
def test_nan_weights_are_refused_in_one_line_naming_the_folder_and_tensor(tiny_world, tmp_path, which):
    """issue 23: eval/train/calibrate on NaN weights ran to the end and reported numbers that mean nothing."""
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(getattr(tiny_world, {"model": "aligned", "adapter": "attacked"}[which]), tmp_path / which)
    weights = folder / ("model.safetensors" if which == "model" else "adapter_model.safetensors")
    tensors = load_file(str(weights))
    name = sorted(k for k in tensors if "layers.1" in k and tensors[k].ndim == 2)[0]
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    model, adapter = (folder, None) if which == "model" else (tiny_world.aligned, folder)
    with pytest.raises(InputError, match=r"contains NaN values") as info:
        load_model(model, adapter, device="cpu")
    assert str(folder) in str(info.value) and "layers.1" in str(info.value) and "\n" not in str(info.value)
