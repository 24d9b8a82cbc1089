"""Hidden-state replay: a later pass over the tokens starts at its first block (docs/design.md §5c).

When the Gram sums do not fit the memory budget in one pass, each pass ends its forwards after
the last block it needs and caches the hidden state where the next pass starts (``padded
tokens x d`` numbers, on the CPU); the next pass replays it instead of running the blocks
before it (:class:`BlockResume`), so several passes cost about one forward in all. Replaying
is used only where a probe forward shows it reproduces the model's own
(:func:`replay_is_exact`); otherwise every pass recomputes the earlier blocks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from csulora.io.checkpoints import layer_index
from csulora.references.activations import StopForward, decoder_body


def block_index(module: str) -> int:
    """The decoder block a target module belongs to (targets are always inside a block)."""
    index = layer_index(module)
    if index is None:
        raise ValueError(f"{module} is not inside a decoder block")
    return index


def decoder_blocks(model: nn.Module, modules: Iterable[str]) -> list[nn.Module] | None:
    """The decoder blocks, in order, of the one ``nn.ModuleList`` the module names run through
    (``model.layers``); None when the names do not point to exactly one."""
    parents = set()
    for name in modules:
        index = layer_index(name)  # io/checkpoints owns the rule: the first ".N." of the name
        if index is None:
            return None
        parents.add(name.split(f".{index}.", 1)[0])
    container = dict(model.named_modules()).get(parents.pop()) if len(parents) == 1 else None
    return list(container) if isinstance(container, nn.ModuleList) else None


@dataclass
class BlockResume:
    """How one pass skips the blocks before it and caches a block's output for the next pass.

    ``blocks[:start]`` do not compute: each returns, batch after batch, ``cached`` (the output
    of block ``start - 1``, recorded by the previous pass over the same batches). The output
    of ``blocks[record_at]`` is appended to ``recorded`` (on the CPU) for the next pass.
    A cache costs ``padded tokens x d`` numbers, small beside a Gram's ``n^2``.
    """

    blocks: Sequence[nn.Module]
    start: int = 0
    cached: Sequence[Any] | None = None
    record_at: int | None = None
    recorded: list[Any] = field(default_factory=list)


def moved(value: Any, device: torch.device | str) -> Any:
    """``value`` (a tensor, or tuples/lists of them) on ``device``; a CPU copy is a real copy, so
    the cache never aliases a buffer the model reuses."""
    if isinstance(value, Tensor):
        return value.detach().to(device, copy=True) if str(device) == "cpu" else value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(moved(v, device) for v in value)
    return value


@contextlib.contextmanager
def replaying_blocks(blocks: Sequence[nn.Module], outputs: Sequence[Any], device: torch.device) -> Iterator[None]:
    """``blocks`` (the first k of the decoder) return the recorded output of block k-1, one
    batch after another, instead of computing; block k then starts from it."""
    batches = iter(outputs)
    current: list[Any] = [None]

    def first(*_args, **_kwargs):
        current[0] = moved(next(batches), device)
        return current[0]

    def rest(*_args, **_kwargs):
        return current[0]

    for i, block in enumerate(blocks):
        block.forward = first if i == 0 else rest  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)


@contextlib.contextmanager
def recording_block_output(block: nn.Module, into: list[Any], *, stop: bool) -> Iterator[None]:
    """Append ``block``'s output of every batch to ``into`` (CPU); ``stop``: end the forward there."""

    def record(_module: nn.Module, _args: tuple, output: Any) -> None:
        into.append(moved(output, "cpu"))
        if stop:
            raise StopForward

    handle = block.register_forward_hook(record)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def later_inputs(
    model: nn.Module, blocks: Sequence[nn.Module], later: Mapping[str, nn.Linear], ids: Tensor,
    replay: Sequence[Any] | None, recorded: list[Any],
) -> dict[str, Tensor]:  # fmt: skip
    """One probe forward: the first input of every module of ``later``, the output of the block
    before the middle recorded into ``recorded``, the first half replayed from ``replay`` when given."""
    middle = len(blocks) // 2
    seen: dict[str, Tensor] = {}
    handles = [
        module.register_forward_pre_hook(lambda _m, inputs, name=name: seen.setdefault(name, inputs[0].clone()))
        for name, module in later.items()
    ]
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(recording_block_output(blocks[middle - 1], recorded, stop=False))
            if replay is not None:
                stack.enter_context(replaying_blocks(blocks[:middle], replay, ids.device))
            decoder_body(model)(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def replay_is_exact(
    model: nn.Module, blocks: Sequence[nn.Module], linears: Mapping[str, nn.Linear], probe_ids: Sequence[int]
) -> bool:
    """Whether skipping the first half of the blocks by replaying a recorded output leaves every
    later module's input as it was (one probe forward each way). False for a model whose
    blocks share state or are not called in order: its passes then recompute the earlier blocks.
    """
    middle = len(blocks) // 2
    later = {name: module for name, module in linears.items() if block_index(name) >= middle}
    if middle == 0 or not later:
        return False
    ids = torch.tensor([list(probe_ids)], device=next(model.parameters()).device)
    recorded: list[Any] = []
    reference = later_inputs(model, blocks, later, ids, None, recorded)
    try:
        replayed = later_inputs(model, blocks, later, ids, recorded, [])
    except Exception:  # noqa: BLE001 (a capability probe: any failure means "recompute instead")
        return False
    return reference.keys() == replayed.keys() and all(
        torch.allclose(reference[n], replayed[n], rtol=1e-5, atol=1e-6 * float(reference[n].abs().max()))
        for n in reference
    )
