"""SaLoRA's fixed safety module, attached to a stock PEFT LoRA layer.

PEFT's ``lora.Linear`` computes ``y = base(x) + lora_B(lora_A(x)) * scaling``. SaLoRA wants
``y = W_res x + C B A x``. With alpha = r (scaling 1) and the base weight set to ``W_res``,
the only missing piece is ``C`` on the LoRA branch, so we put it there with a PyTorch forward
hook on ``lora_B`` (a public, documented mechanism of ``nn.Module``): the hook replaces
``lora_B``'s output ``B A x`` by ``C B A x``. Nothing of PEFT is copied or patched; the
gradient reaching ``B`` is projected by ``C`` too, as in the paper.

The hook applies only on PEFT's unmerged forward path; SaLoRA models are trained and then
exported as a plain LoRA (``export_factors``), never merged in place.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

# Attribute name of the safety module on the LoRA layer. It must not contain "lora_": PEFT
# treats attributes with that prefix as adapter weights when saving and marking trainables.
SAFETY_MODULE_ATTR = "safety_module"


class SafetyModule(nn.Module):
    """``y -> C y`` on the last axis with ``C = I - V_s V_s^T``, in factored form.

    ``V_s`` is a non-persistent buffer: it follows ``.to(device)`` with the model but is
    never saved with it (the exported adapter already has ``C`` folded into ``B'``).
    """

    def __init__(self, V_s: Tensor) -> None:
        super().__init__()
        self.register_buffer("V_s", V_s.detach().clone(), persistent=False)

    def forward(self, y: Tensor) -> Tensor:
        V_s = self.V_s.to(dtype=y.dtype)
        return y - (y @ V_s) @ V_s.T

    def extra_repr(self) -> str:
        m, r_s = self.V_s.shape
        return f"out_features={m}, safety_rank={r_s}"


def attach_safety_module(layer: LoraLayer, adapter_name: str, V_s: Tensor) -> RemovableHandle:
    """Register ``C`` on ``layer``'s LoRA branch for ``adapter_name``; returns the hook handle."""
    lora_B = layer.lora_B[adapter_name]
    if V_s.shape[0] != lora_B.out_features:
        raise ValueError(f"V_s has {V_s.shape[0]} rows, the layer has {lora_B.out_features} outputs")
    module = SafetyModule(V_s.to(device=lora_B.weight.device, dtype=lora_B.weight.dtype))
    setattr(layer, SAFETY_MODULE_ATTR, module)

    def project_lora_output(_module: nn.Module, _inputs: tuple, output: Tensor) -> Tensor:
        return module(output)

    return lora_B.register_forward_hook(project_lora_output)


def safety_basis(layer: LoraLayer) -> Tensor:
    """The ``V_s`` attached to ``layer`` (m x r_s)."""
    module = getattr(layer, SAFETY_MODULE_ATTR, None)
    if not isinstance(module, SafetyModule):
        raise ValueError("layer has no SaLoRA safety module attached")
    return module.V_s


@torch.no_grad()
def initialise_layer(
    layer: LoraLayer, adapter_name: str, *, W_res: Tensor, B0: Tensor, A0: Tensor, V_s: Tensor
) -> RemovableHandle:
    """Turn one stock LoRA layer into a SaLoRA layer: frozen ``W_res``, ``B = B0``, ``A = A0``, ``C``."""
    base = layer.get_base_layer()
    lora_A, lora_B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
    if tuple(W_res.shape) != tuple(base.weight.shape):
        raise ValueError(f"W_res shape {tuple(W_res.shape)} != base weight {tuple(base.weight.shape)}")
    if tuple(B0.shape) != tuple(lora_B.weight.shape) or tuple(A0.shape) != tuple(lora_A.weight.shape):
        raise ValueError("B0/A0 shapes do not match the LoRA layer's rank")
    base.weight.copy_(W_res.to(base.weight.dtype))
    lora_A.weight.copy_(A0.to(lora_A.weight.dtype))
    lora_B.weight.copy_(B0.to(lora_B.weight.dtype))
    return attach_safety_module(layer, adapter_name, V_s)
