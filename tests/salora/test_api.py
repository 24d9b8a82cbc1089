"""train_salora end to end on the tiny world, its cache, and its one-line errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel

from csulora.errors import InputError, OptionError
from csulora.salora import SaLoRAConfig, train_salora
from csulora.salora.model import lora_layers

from .conftest import write_jsonl

CONFIG = SaLoRAConfig(rank=4, safety_rank=8, task_rank=8, num_samples=8, steps=3, batch_size=4, max_new_tokens=8)


@pytest.fixture(scope="module")
def trained(tiny_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("salora-run")
    out = train_salora(
        tiny_world["model_dir"], tiny_world["data"], tiny_world["safety"], root / "adapter",
        config=CONFIG, cache_dir=root / "cache", progress=False,
    )
    return {"out": out, "cache": root / "cache", "root": root}


def test_writes_a_plain_peft_lora_of_rank_2r_with_a_report(trained, tiny_world):
    out = trained["out"]
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "salora.json"]
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA"
    assert adapter_config["r"] == 8 and adapter_config["lora_alpha"] == 8
    report = json.loads((out / "salora.json").read_text())
    assert report["ranks"] == {"lora": 4, "safety": 8, "task": 8, "exported": 8}
    assert report["modules"] == 4 and report["train_samples"] == 24
    safety = report["feature_pass"]["safety"]
    assert safety["samples"] == 8 and safety["response_tokens"] >= 8 and safety["cached"] is False
    assert report["feature_pass"]["seconds_this_run"] > 0
    assert 0 < safety["generation_seconds"] <= safety["seconds"]
    assert 0.0 <= report["safety_responses_refusing"] <= 1.0 and len(report["refusal_examples"]) == 5
    assert len(list(trained["cache"].glob("salora-*.safetensors"))) == 2


def test_adapter_loads_in_stock_peft_and_keeps_the_safety_directions_free(trained, tiny_world):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_world["model_dir"]), dtype=torch.float32)
    loaded = PeftModel.from_pretrained(model, str(trained["out"]))
    layers = lora_layers(loaded)
    assert len(layers) == 4
    # B' = C [B | -B0]: its columns avoid the cached safety directions V_s.
    cache_file = next(trained["cache"].glob("salora-safety-*.safetensors"))
    with safe_open(str(cache_file), framework="pt") as handle:
        for name, layer in layers.items():
            V_s = handle.get_tensor(f"{name}.V")
            B = layer.lora_B["default"].weight
            assert B.abs().max() > 0
            assert (V_s.T @ B).abs().max() < 1e-4 * B.abs().max()


def test_rerun_reuses_the_cached_feature_passes(trained, tiny_world):
    out = train_salora(
        tiny_world["model_dir"], tiny_world["data"], tiny_world["safety"], trained["root"] / "again",
        config=CONFIG, cache_dir=trained["cache"], progress=False,
    )
    report = json.loads((out / "salora.json").read_text())
    assert report["feature_pass"]["safety"]["cached"] is True
    assert report["feature_pass"]["task"]["cached"] is True
    assert report["feature_pass"]["seconds_this_run"] == 0
    first = json.loads((trained["out"] / "salora.json").read_text())
    assert report["feature_pass"]["seconds_total"] == first["feature_pass"]["seconds_total"]
    # Same seed, same features: the same adapter.
    from safetensors.torch import load_file

    a, b = load_file(str(trained["out"] / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_too_few_safety_samples(tiny_world, tmp_path):
    few = write_jsonl(tmp_path / "few.jsonl", [{"prompt": "How do I steal a car"}] * 3)
    with pytest.raises(InputError, match=r"few\.jsonl: 3 safety samples.*num_samples=8"):
        train_salora(tiny_world["model_dir"], tiny_world["data"], few, tmp_path / "out", config=CONFIG,
                     cache_dir=tmp_path / "c", progress=False)
    assert not (tmp_path / "out").exists()


def test_too_few_response_tokens_for_the_rank(tiny_world, tmp_path):
    short = write_jsonl(tmp_path / "short.jsonl", [{"prompt": f"Say {i}", "response": ""} for i in range(8)])
    config = SaLoRAConfig(rank=4, safety_rank=8, task_rank=16, num_samples=8, steps=1, max_new_tokens=8)
    with pytest.raises(InputError, match=r"short\.jsonl: the task samples give 8 response tokens, fewer than the rank 16"):
        train_salora(tiny_world["model_dir"], short, tiny_world["safety"], tmp_path / "out", config=config,
                     cache_dir=tmp_path / "c", progress=False)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rank": 40}, r"rank 40 exceeds layer model\.layers\.0\.self_attn\.v_proj \(32 x 64\)"),
        ({"safety_rank": 32}, r"safety rank 32 must be below layer .*v_proj's output size 32"),
        ({"task_rank": 33}, r"task rank 33 exceeds layer .*v_proj's output size 32"),
    ],
)
def test_rank_larger_than_the_layer(tiny_world, tmp_path, options, message):
    config = SaLoRAConfig(**{**CONFIG.to_dict(), **options})
    with pytest.raises(OptionError, match=message):
        train_salora(tiny_world["model_dir"], tiny_world["data"], tiny_world["safety"], tmp_path / "out",
                     config=config, cache_dir=tmp_path / "c", progress=False)


def test_unknown_target_module(tiny_world, tmp_path):
    config = SaLoRAConfig(**{**CONFIG.to_dict(), "targets": ("qkv_proj",)})
    with pytest.raises(InputError, match="no 2-D weight of a module named qkv_proj"):
        train_salora(tiny_world["model_dir"], tiny_world["data"], tiny_world["safety"], tmp_path / "out",
                     config=config, cache_dir=tmp_path / "c", progress=False)


@pytest.mark.parametrize("missing", ["model", "data", "safety"])
def test_missing_files(tiny_world, tmp_path, missing):
    paths = {"model": tiny_world["model_dir"], "data": tiny_world["data"], "safety": tiny_world["safety"]}
    paths[missing] = tmp_path / "nope"
    with pytest.raises(InputError, match="nope"):
        train_salora(paths["model"], paths["data"], paths["safety"], tmp_path / "out", config=CONFIG,
                     cache_dir=tmp_path / "c", progress=False)


def test_existing_output_needs_force(trained, tiny_world, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        train_salora(tiny_world["model_dir"], tiny_world["data"], tiny_world["safety"], out, config=CONFIG,
                     cache_dir=trained["cache"], progress=False)
    assert (out / "keep.txt").exists()


def test_config_must_be_a_salora_config(tiny_world, tmp_path):
    with pytest.raises(OptionError, match="SaLoRAConfig"):
        train_salora(tiny_world["model_dir"], tiny_world["data"], tiny_world["safety"], tmp_path / "o",
                     config={"rank": 4}, progress=False)  # type: ignore[arg-type]


def test_csulora_reads_and_audits_the_exported_adapter(trained, tiny_world, tmp_path):
    """The export is a plain LoRA for our own tools too: read_adapter and audit_adapter accept it."""
    from safetensors.torch import load_file, save_file

    from csulora.pipeline.api import audit_adapter
    from csulora.io.adapters import read_adapter

    adapter = read_adapter(trained["out"])
    assert len(adapter.modules) == 4
    assert all(m.A.shape[0] == 8 and m.scale == 1.0 for m in adapter.modules.values())
    # A stand-in "base": the aligned weights minus a random displacement.
    base = tmp_path / "base"
    shutil.copytree(tiny_world["model_dir"], base)
    weights = load_file(str(base / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    shifted = {k: (v - 0.02 * torch.randn(v.shape, generator=g)) if v.dim() == 2 else v for k, v in weights.items()}
    save_file(shifted, str(base / "model.safetensors"), metadata={"format": "pt"})
    report = audit_adapter(trained["out"], base=base, aligned=tiny_world["model_dir"], progress=False)
    assert report.summary["modules"] == 4
    for row in report.modules:
        assert abs(row["rho_F"] + row["rho_P"] + row["rho_O"] - 1.0) < 1e-6


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    from csulora.salora.api import default_cache_dir

    monkeypatch.setenv("CSULORA_CACHE", str(tmp_path / "root"))
    assert default_cache_dir() == tmp_path / "root" / "salora"
    monkeypatch.delenv("CSULORA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "csulora" / "salora"


def test_the_output_never_touches_an_input(tiny_world, tmp_path):
    """issue 23: SaLoRA's OUTDIR may never be, contain or lie inside MODEL, --data or --safety-data."""
    for out in (tiny_world["model_dir"], tiny_world["model_dir"] / "salora", tiny_world["data"].parent):
        with pytest.raises(InputError, match="an output may never be, contain or lie inside an input"):
            train_salora(tiny_world["model_dir"], tiny_world["data"], tiny_world["safety"], out, config=CONFIG,
                         cache_dir=tmp_path / "c", progress=False, force=True)
    assert not (tiny_world["model_dir"] / "salora").exists() and not (tmp_path / "c").exists()
