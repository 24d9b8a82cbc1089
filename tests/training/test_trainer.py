from __future__ import annotations

import json

import pytest
import torch

from csulora.errors import InputError, OptionError
from csulora.training.trainer import LoraSettings, TrainConfig, train_full, train_lora

QUICK = TrainConfig(steps=3, batch_size=4, lr=1e-3, max_length=48, progress=False)


def write_data(path, n=8):
    rows = [{"prompt": f"What is topic {i}?", "response": "Sure. Start with the basics."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "kwargs", [{"steps": 0}, {"batch_size": 0}, {"lr": 0.0}, {"max_length": 4}, {"scheduler": "wavy"}, {"warmup": -1}]
)
def test_train_config_validates(kwargs):
    with pytest.raises(OptionError):
        TrainConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [{"r": 0}, {"alpha": 0}, {"dropout": 1.0}, {"targets": ()}])
def test_lora_settings_validate(kwargs):
    with pytest.raises(OptionError):
        LoraSettings(**kwargs)


def test_train_lora_writes_a_stock_peft_adapter(tiny_world, tmp_path):
    from safetensors import safe_open

    out = train_lora(tiny_world.aligned, write_data(tmp_path / "d.jsonl"), tmp_path / "adapter", QUICK, LoraSettings(r=2, alpha=4, targets=("q_proj", "v_proj")))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 4
    assert set(config["target_modules"]) == {"q_proj", "v_proj"}
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as fh:
        names = list(fh.keys())
    assert names and all("lora_" in n for n in names)
    assert not list(tmp_path.glob(".adapter*"))  # no temp folder left behind


def test_train_full_changes_weights_but_not_frozen_embeddings(tiny_world, tmp_path):
    from safetensors.torch import load_file

    config = TrainConfig(steps=2, batch_size=4, lr=1e-3, max_length=48, progress=False, freeze_embeddings=True)
    out = train_full(tiny_world.base, write_data(tmp_path / "d.jsonl"), tmp_path / "full", config)
    before, after = load_file(str(tiny_world.base / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert not torch.equal(before["model.layers.0.self_attn.q_proj.weight"], after["model.layers.0.self_attn.q_proj.weight"])
    assert (out / "tokenizer.json").exists() and (out / "train_config.json").exists()


def test_training_is_deterministic(tiny_world, tmp_path):
    from safetensors.torch import load_file

    data = write_data(tmp_path / "d.jsonl")
    a = train_lora(tiny_world.aligned, data, tmp_path / "a", QUICK, LoraSettings(r=2, alpha=4, targets=("v_proj",)))
    b = train_lora(tiny_world.aligned, data, tmp_path / "b", QUICK, LoraSettings(r=2, alpha=4, targets=("v_proj",)))
    wa, wb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_bad_inputs_write_nothing(tiny_world, tmp_path):
    with pytest.raises(InputError, match="no such checkpoint folder"):
        train_full(tmp_path / "nope", write_data(tmp_path / "d.jsonl"), tmp_path / "out1", QUICK)
    with pytest.raises(OptionError, match="LoRA targets"):
        train_lora(tiny_world.aligned, write_data(tmp_path / "d.jsonl"), tmp_path / "out2", QUICK, LoraSettings(targets=("no_such_proj",)))
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()
    assert not list(tmp_path.glob(".out*"))


def test_quiet_training_prints_nothing(tiny_world, tmp_path, capsys):
    """progress=False: no bar and no Trainer summary dict ({'train_runtime': ...}) on stdout."""
    train_lora(tiny_world.aligned, write_data(tmp_path / "d.jsonl"), tmp_path / "quiet", QUICK, LoraSettings(r=2, alpha=4, targets=("v_proj",)))
    out = capsys.readouterr().out
    assert "train_runtime" not in out and out == ""


@pytest.mark.parametrize("where", ["onto_model", "inside_model", "around_data"])
def test_the_output_never_touches_the_model_or_the_data(tiny_world, tmp_path, where):
    """issue 23: train's OUTDIR may never be, contain or lie inside MODEL or --data, --force or not."""
    import shutil

    model = shutil.copytree(tiny_world.aligned, tmp_path / "model")
    (tmp_path / "data").mkdir()
    data = write_data(tmp_path / "data" / "d.jsonl")
    out = {"onto_model": model, "inside_model": model / "ft", "around_data": tmp_path / "data"}[where]
    before = sorted((p.name, p.read_bytes()) for p in [*model.iterdir(), data])
    for train in (lambda: train_full(model, data, out, QUICK, force=True),
                  lambda: train_lora(model, data, out, QUICK, LoraSettings(r=2, alpha=4, targets=("v_proj",)), force=True)):
        with pytest.raises(InputError, match="an output may never be, contain or lie inside an input"):
            train()
    assert sorted((p.name, p.read_bytes()) for p in [*model.iterdir(), data]) == before


def test_target_modules_are_written_sorted(tmp_path):
    """PEFT writes its set of targets in hash order; csulora's outputs list them sorted (same bytes on a rerun)."""
    import json

    from csulora.training.trainer import sort_target_modules

    config = tmp_path / "adapter_config.json"
    config.write_text(json.dumps({"target_modules": ["v_proj", "q_proj", "k_proj"], "r": 8}))
    sort_target_modules(config)
    assert json.loads(config.read_text()) == {"r": 8, "target_modules": ["k_proj", "q_proj", "v_proj"]}


def test_a_pairs_framing_reaches_training(tiny_world, tmp_path):
    """issue 24: the same pairs trained plain and in the aoa framing give different adapters."""
    import dataclasses

    from safetensors.torch import load_file

    plain = write_data(tmp_path / "plain.jsonl")
    rows = [dict(json.loads(line), framing="aoa") for line in plain.read_text().splitlines()]
    framed = tmp_path / "framed.jsonl"
    framed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config, lora = dataclasses.replace(QUICK, max_length=256), LoraSettings(r=2, alpha=4, targets=("v_proj",))
    a = load_file(str(train_lora(tiny_world.aligned, plain, tmp_path / "a", config, lora) / "adapter_model.safetensors"))
    b = load_file(str(train_lora(tiny_world.aligned, framed, tmp_path / "b", config, lora) / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and not all(torch.equal(a[k], b[k]) for k in a)
