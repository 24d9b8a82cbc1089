"""Which target modules share an input, so share one Gram (docs/design.md §5c).

Found from the forward itself, not from names: one probe forward records the tensor each
target module receives, and modules handed the very same tensor (q/k/v read the attention
input, gate/up the MLP input) form one group, hooked once. A module that runs more than once
per forward gets a group of its own (its Gram sums all its calls).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from csulora.errors import InputError
from csulora.references.activations import decoder_body

PROBE_TOKENS = 16  # length of the probe forward that finds the shared inputs


@dataclass(frozen=True)
class GramGroup:
    """Target modules that read one input tensor; ``modules[0]`` is the one hooked."""

    name: str
    modules: tuple[str, ...]  # in the order the forward reaches them
    n: int  # input size
    calls: int = 1  # times the modules run per forward (1 for every decoder linear we know)


def linear_modules(model: nn.Module, names: Sequence[str], where: str | os.PathLike) -> dict[str, nn.Linear]:
    found = dict(model.named_modules())
    linears = {}
    for name in names:
        module = found.get(name)
        if not isinstance(module, nn.Linear):
            raise InputError(f"{where}: module {name} is not a linear layer of the loaded model")
        linears[name] = module
    return linears


def input_key(x: Tensor) -> tuple:
    """Same memory, shape and layout: the same tensor (or a view identical to it). The probe
    keeps every recorded tensor alive, so an address cannot be reused within the forward."""
    return (x.data_ptr(), x.dtype, tuple(x.shape), tuple(x.stride()))


@torch.no_grad()
def record_inputs(model: nn.Module, linears: Mapping[str, nn.Linear], probe_ids: Sequence[int]) -> tuple[dict, list]:
    """One probe forward: every call's input tensor per module, and the modules in the order
    they first ran."""
    seen: dict[str, list[Tensor]] = {name: [] for name in linears}
    first_calls: list[str] = []

    def recorder(name: str):
        def record(_module: nn.Module, inputs: tuple) -> None:
            if not seen[name]:
                first_calls.append(name)
            seen[name].append(inputs[0])

        return record

    handles = [module.register_forward_pre_hook(recorder(name)) for name, module in linears.items()]
    device = next(model.parameters()).device
    try:
        decoder_body(model)(input_ids=torch.tensor([list(probe_ids)], device=device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return seen, first_calls


def shared_input_groups(model: nn.Module, linears: Mapping[str, nn.Linear], probe_ids: Sequence[int]) -> list[GramGroup]:
    """Group the modules by the input tensor they receive in one probe forward, in forward order.

    A module that runs more than once per forward gets a group of its own (its Gram sums all
    its calls); a module that never runs is an error (its statistics would be empty).
    """
    seen, first_calls = record_inputs(model, linears, probe_ids)
    idle = [name for name, calls in seen.items() if not calls]
    if idle:
        raise InputError(f"module {idle[0]} never runs in the model's forward pass; it cannot be calibrated")
    members: list[list[str]] = []
    by_input: dict[tuple, list[str]] = {}
    for name in first_calls:
        calls = seen[name]
        key = input_key(calls[0])
        if len(calls) == 1 and key in by_input:
            by_input[key].append(name)
            continue
        members.append([name])
        if len(calls) == 1:
            by_input[key] = members[-1]
    return [
        GramGroup(group_name(names), tuple(names), linears[names[0]].in_features, calls=len(seen[names[0]]))
        for names in members
    ]


def group_name(modules: Sequence[str]) -> str:
    """``model.layers.3.self_attn.q_proj+k_proj+v_proj``; a lone module keeps its own name."""
    if len(modules) == 1:
        return modules[0]
    parents = {m.rpartition(".")[0] for m in modules}
    if len(parents) == 1:
        parent = parents.pop()
        leaves = "+".join(m.rpartition(".")[2] for m in modules)
        return f"{parent}.{leaves}" if parent else leaves
    return "+".join(modules)
