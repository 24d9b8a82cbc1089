"""Build a SaLoRA model on stock PEFT and export it as a plain PEFT LoRA.

The model is ``peft.get_peft_model`` with a standard ``LoraConfig`` (r, alpha = r, no
dropout); each target layer is then initialised and given its safety module
(:func:`csulora.salora.layer.initialise_layer`). The export writes the trained update
relative to the original weights as a rank-2r LoRA that stock PEFT loads unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from csulora.io.checkpoints import matches_target  # PEFT's target rule, owned in one place
from csulora.io.modeling import no_checkpointing_deprecation
from csulora.salora.config import SaLoRAConfig
from csulora.salora.layer import initialise_layer, safety_basis
from csulora.salora.math import export_factors, residual_weight, task_initialisation

ADAPTER_NAME = "default"
# PEFT's saved key layout for a causal LM: "base_model.model.<module name>.lora_A.weight".
PEFT_KEY_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LayerInit:
    """One target layer's SaLoRA state (float64 on CPU): safety basis and initial factors."""

    V_s: Tensor  # m x r_s
    B0: Tensor  # m x r
    A0: Tensor  # r x n


def find_target_linears(model: nn.Module, targets: Iterable[str]) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules of ``model`` that the targets name, in model order."""
    targets = tuple(targets)
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and matches_target(name, targets)
    }


def initial_factors(W: Tensor, V_s: Tensor, V_t: Tensor, rank: int, *, seed: int) -> tuple[LayerInit, Tensor]:
    """SaLoRA's per-layer init and the frozen residual weight (all float64)."""
    W = W.detach().to(torch.float64).cpu()
    B0, A0 = task_initialisation(W, V_t.to(torch.float64), rank, seed=seed)
    V_s = V_s.to(torch.float64)
    return LayerInit(V_s=V_s, B0=B0, A0=A0), residual_weight(W, V_s, B0, A0)


def build_salora_model(
    model: nn.Module,
    safety_bases: Mapping[str, Tensor],
    task_bases: Mapping[str, Tensor],
    config: SaLoRAConfig,
) -> tuple[PeftModel, dict[str, LayerInit]]:
    """Wrap ``model`` (modified in place) into a trainable SaLoRA ``PeftModel``.

    ``safety_bases`` / ``task_bases`` map each target module name to its ``V_s`` / ``V_t``.
    Returns the model, whose outputs equal the original ones at step 0, and each layer's
    init (needed for the export).
    """
    linears = find_target_linears(model, config.targets)
    if set(linears) != set(safety_bases) or set(linears) != set(task_bases):
        raise ValueError("feature bases do not cover exactly the target modules")
    # Compute every init from the original weights before PEFT wraps the modules.
    inits: dict[str, LayerInit] = {}
    residuals: dict[str, Tensor] = {}
    for name, linear in linears.items():
        inits[name], residuals[name] = initial_factors(
            linear.weight, safety_bases[name], task_bases[name], config.rank, seed=config.seed
        )
    lora_config = LoraConfig(
        r=config.rank,
        lora_alpha=config.rank,  # scaling 1, as in the paper
        target_modules=list(config.targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with no_checkpointing_deprecation():  # PEFT reads a deprecated transformers property (io/modeling.py)
        peft_model = get_peft_model(model, lora_config)
    layers = lora_layers(peft_model)
    if set(layers) != set(inits):
        raise ValueError("PEFT wrapped other modules than the SaLoRA targets")
    for name, layer in layers.items():
        init = inits[name]
        initialise_layer(layer, ADAPTER_NAME, W_res=residuals.pop(name), B0=init.B0, A0=init.A0, V_s=init.V_s)
    return peft_model, inits


def lora_layers(peft_model: PeftModel) -> dict[str, LoraLayer]:
    """The LoRA layers of a PEFT model, keyed by their name in the underlying model."""
    return {
        name: module
        for name, module in peft_model.get_base_model().named_modules()
        if isinstance(module, LoraLayer)
    }


@torch.no_grad()
def exported_state_dict(peft_model: PeftModel, inits: Mapping[str, LayerInit]) -> dict[str, Tensor]:
    """The trained update as plain LoRA tensors keyed the way PEFT saves them (rank 2r)."""
    tensors: dict[str, Tensor] = {}
    for name, layer in lora_layers(peft_model).items():
        init = inits[name]
        A = layer.lora_A[ADAPTER_NAME].weight.detach().to(torch.float64).cpu()
        B = layer.lora_B[ADAPTER_NAME].weight.detach().to(torch.float64).cpu()
        V_s = safety_basis(layer).to(torch.float64).cpu()
        B_export, A_export = export_factors(B, A, init.B0, init.A0, V_s)
        dtype = layer.lora_A[ADAPTER_NAME].weight.dtype
        tensors[f"{PEFT_KEY_PREFIX}{name}.lora_A.weight"] = A_export.to(dtype).contiguous()
        tensors[f"{PEFT_KEY_PREFIX}{name}.lora_B.weight"] = B_export.to(dtype).contiguous()
    return tensors


def exported_lora_config(config: SaLoRAConfig, base_model_name_or_path: str) -> LoraConfig:
    """``LoraConfig`` of the exported adapter: rank 2r, ``lora_alpha = 2r`` so scaling stays 1."""
    return LoraConfig(
        r=2 * config.rank,
        lora_alpha=2 * config.rank,
        target_modules=list(config.targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path,
    )
