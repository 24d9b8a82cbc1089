"""Forward passes that watch what linear layers read, shared by SaLoRA and ``calibrate``.

SaLoRA's feature pass (:mod:`csulora.salora.features`, docs/design.md §6) and the
calibration pass (:mod:`csulora.references.calibration.statistics`, docs/design.md §5c) both run a causal LM
over tokenized examples, batched, and hand each watched module's input on the *counted*
tokens to a statistic. What they share lives here:

- :func:`right_padded_batch`: right padding (the real tokens keep their positions) and a
  token mask; an example counts the tokens whose ``labels`` are not ``-100``, or every
  token when it has no ``labels``; padding never counts;
- :class:`MaskedInputHooks`: forward pre-hooks that cut a module's input down to the
  counted rows (``tokens x n``) before the statistic sees it;
- :func:`run_batches`: the batch loop, through the decoder body without its LM head.
  A hook may raise :class:`StopForward` once the last module it needs has run, which ends
  that batch's forward early.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from csulora.training.data import IGNORE_INDEX


class StopForward(Exception):
    """Raised by a hook when the rest of the forward pass is not needed (caught by :func:`run_batches`)."""


def decoder_body(model: nn.Module) -> nn.Module:
    """The model without its LM head: the hooks only need the layers' inputs, and the
    vocabulary-sized logits would be a large share of a small model's compute for nothing."""
    return getattr(model, "base_model", None) or model


def counted_tokens(example: Mapping) -> list[bool]:
    """Which tokens of an example count: those with a label, or all when it has no labels."""
    if "labels" not in example:
        return [True] * len(example["input_ids"])
    return [label != IGNORE_INDEX for label in example["labels"]]


def right_padded_batch(examples: Sequence[Mapping], pad_id: int, device: torch.device) -> tuple[dict, Tensor]:
    """Right-padded ``input_ids``/``attention_mask`` and the counted-token mask (batch x seq, bool).

    Right padding keeps the real tokens' positions unchanged (left padding would shift them
    for models that number positions from the first slot); under the causal mask a real
    token never sees the padding after it.
    """
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    counted = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        ids[row, :n] = torch.as_tensor(example["input_ids"], dtype=torch.long)
        attention[row, :n] = 1
        counted[row, :n] = torch.as_tensor(counted_tokens(example), dtype=torch.bool)
    return {"input_ids": ids.to(device), "attention_mask": attention.to(device)}, counted


class MaskedInputHooks:
    """Forward pre-hooks on ``modules`` that pass each one's input, counted rows only, to :meth:`observe`.

    Set :attr:`token_mask` (batch x seq, bool) before each forward. Use as a context manager:
    the hooks are removed on exit, whatever happens.
    """

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.modules = dict(modules)
        self._mask: Tensor | None = None
        self._rows: Tensor | None = None  # flat indices of the counted tokens
        self._mask_set = False
        self._handles: list = []

    def observe(self, name: str, module: nn.Module, x: Tensor) -> None:
        """Called with ``x`` (counted tokens x in_features) in the module's own dtype."""
        raise NotImplementedError

    @property
    def token_mask(self) -> Tensor | None:
        return self._mask

    @token_mask.setter
    def token_mask(self, mask: Tensor) -> None:
        self._mask = mask
        self._mask_set = True
        # Gather by flat row index (one index_select per module), not with a boolean mask per call.
        self._rows = mask.reshape(-1).nonzero().squeeze(1)

    def __enter__(self) -> MaskedInputHooks:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook_for(name)))
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook_for(self, name: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            if not self._mask_set:
                raise RuntimeError(f"{type(self).__name__}.token_mask must be set before the forward pass")
            x = inputs[0]
            rows = x.reshape(-1, x.shape[-1])
            if self._rows.device != rows.device:
                self._rows = self._rows.to(rows.device)
            self.observe(name, module, rows.index_select(0, self._rows))

        return hook


@torch.no_grad()
def run_batches(
    model: nn.Module,
    examples: Sequence[Mapping],
    hooks: MaskedInputHooks,
    *,
    pad_id: int,
    batch_size: int,
    progress: bool = True,
    desc: str = "forward",
    longest_first: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> None:
    """One forward of the decoder body over every example, batched, with ``hooks`` watching.

    Batches group similar lengths (less compute wasted on padding; the order of a sum does
    not change it beyond rounding). ``longest_first`` runs the longest batch first, so an
    out-of-memory error shows at once (docs/design.md §7). ``on_batch``: called after each
    batch with its tokens (padding excluded), for a caller's own progress bar over several
    calls; then this call shows none.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    decoder = decoder_body(model)
    lengths = [len(e["input_ids"]) for e in examples]
    order = sorted(range(len(examples)), key=lambda i: (-lengths[i], i) if longest_first else (lengths[i], i))
    was_training = model.training
    model.eval()
    try:
        starts = range(0, len(order), batch_size)
        if progress and on_batch is None:
            starts = tqdm(starts, desc=desc, unit="batch", disable=None)
        for start in starts:
            batch = [examples[i] for i in order[start : start + batch_size]]
            inputs, hooks.token_mask = right_padded_batch(batch, pad_id, device)
            try:
                decoder(**inputs, use_cache=False)
            except StopForward:
                pass
            if on_batch is not None:
                on_batch(sum(len(e["input_ids"]) for e in batch))
    finally:
        model.train(was_training)
