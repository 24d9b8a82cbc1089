"""The SaLoRA model on stock PEFT: unchanged at step 0, exported exactly as a plain LoRA."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from csulora.salora import SaLoRAConfig
from csulora.salora.api import write_adapter
from csulora.salora.layer import SafetyModule
from csulora.salora.math import safety_projector
from csulora.salora.model import (
    build_salora_model,
    exported_lora_config,
    exported_state_dict,
    find_target_linears,
    lora_layers,
)

CONFIG = SaLoRAConfig(rank=4, safety_rank=8, task_rank=8, num_samples=8)


def _random_bases(model, rank: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        name: torch.linalg.qr(torch.randn(lin.out_features, rank, generator=g))[0]
        for name, lin in find_target_linears(model, CONFIG.targets).items()
    }


def _inputs(tokenizer) -> dict[str, torch.Tensor]:
    batch = tokenizer(["Convert the date March 7, 1984", "How do I steal a car"], return_tensors="pt", padding=True)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@pytest.fixture()
def salora_model(tiny_model):
    model, tokenizer = tiny_model
    inputs = _inputs(tokenizer)
    with torch.no_grad():
        reference = model(**inputs).logits
    V_s, V_t = _random_bases(model, CONFIG.safety_rank, 0), _random_bases(model, CONFIG.task_rank, 1)
    peft_model, inits = build_salora_model(model, V_s, V_t, CONFIG)
    return peft_model, inits, tokenizer, inputs, reference


def test_step_zero_leaves_every_output_unchanged(salora_model):
    peft_model, inits, _, inputs, reference = salora_model
    assert len(inits) == 4
    with torch.no_grad():
        logits = peft_model(**inputs).logits
    assert torch.allclose(logits, reference, atol=1e-5, rtol=1e-5)
    # ... while the base weights really are the residual, not the original.
    layer = lora_layers(peft_model)["model.layers.0.self_attn.q_proj"]
    assert layer.lora_B["default"].weight.abs().max() > 0


def test_only_the_lora_factors_train(salora_model):
    peft_model = salora_model[0]
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 8


def test_lora_branch_output_is_projected_by_the_safety_module(salora_model):
    peft_model = salora_model[0]
    layer = lora_layers(peft_model)["model.layers.1.self_attn.v_proj"]
    safety = layer.safety_module
    assert isinstance(safety, SafetyModule)
    x = torch.randn(3, 64)
    with torch.no_grad():
        branch = layer.lora_B["default"](layer.lora_A["default"](x))
        raw = x @ layer.lora_A["default"].weight.T @ layer.lora_B["default"].weight.T
    C = safety_projector(safety.V_s.double()).float()
    assert torch.allclose(branch, raw @ C.T, atol=1e-5)
    assert torch.allclose(branch @ safety.V_s, torch.zeros(3, CONFIG.safety_rank), atol=1e-5)
    assert "safety_module" not in "".join(peft_model.state_dict())  # never saved with the model


def test_gradient_reaching_B_is_projected(salora_model):
    peft_model, _, _, inputs, _ = salora_model
    peft_model.train()
    peft_model(**inputs, labels=inputs["input_ids"]).loss.backward()
    layer = lora_layers(peft_model)["model.layers.0.self_attn.q_proj"]
    grad = layer.lora_B["default"].weight.grad
    assert grad is not None and grad.abs().max() > 0
    assert torch.allclose(layer.safety_module.V_s.T @ grad, torch.zeros(CONFIG.safety_rank, CONFIG.rank), atol=1e-6)


def test_export_reproduces_the_trained_model_through_stock_peft(salora_model, tiny_world, tmp_path):
    from transformers import AutoModelForCausalLM

    from csulora.training.data import tokenize_pairs
    from csulora.training.trainer import TrainConfig, fit

    from .conftest import task_pairs

    peft_model, inits, tokenizer, inputs, _ = salora_model
    start = {n: l.lora_B["default"].weight.detach().clone() for n, l in lora_layers(peft_model).items()}
    peft_model.train()
    fit(peft_model, tokenizer, tokenize_pairs(tokenizer, task_pairs(8), 64),
        TrainConfig(steps=2, batch_size=4, lr=1e-2, progress=False))
    assert all(not torch.equal(l.lora_B["default"].weight, start[n]) for n, l in lora_layers(peft_model).items())
    with torch.no_grad():
        trained = peft_model(**inputs).logits
    tensors = exported_state_dict(peft_model, inits)
    write_adapter(tmp_path, tensors, exported_lora_config(CONFIG, str(tiny_world["model_dir"])))

    original = AutoModelForCausalLM.from_pretrained(str(tiny_world["model_dir"]), dtype=torch.float32)
    with torch.no_grad():
        before = original(**inputs).logits
    loaded = PeftModel.from_pretrained(original, str(tmp_path)).eval()
    with torch.no_grad():
        exported = loaded(**inputs).logits
    assert not torch.allclose(trained, before, atol=1e-3)  # the perturbation mattered
    assert torch.allclose(exported, trained, atol=1e-5, rtol=1e-5)
    # Plain LoRA of rank 2r with scaling 1, every tensor used.
    layer = lora_layers(loaded)["model.layers.0.self_attn.v_proj"]
    assert layer.r["default"] == 2 * CONFIG.rank and layer.scaling["default"] == 1.0
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert set(saved) == set(tensors) and len(saved) == 8


def test_building_the_salora_model_emits_no_future_warning(tiny_model):
    """issue 23: PEFT's read of transformers' deprecated `is_gradient_checkpointing` is silenced here too."""
    import warnings

    model, _ = tiny_model
    V_s, V_t = _random_bases(model, CONFIG.safety_rank, 0), _random_bases(model, CONFIG.task_rank, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_salora_model(model, V_s, V_t, CONFIG)
    assert not [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
