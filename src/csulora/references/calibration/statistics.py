"""The Gram sums of the statistics pass, and the statistics built from them (docs/design.md §5c).

Cost. Per token and group a full Gram costs ``n^2`` multiply-adds against the layer's own
``m n`` (per block ``3 d^2 + f^2`` against ``4 d^2 + 3 d f`` for a Llama block with hidden
``d`` and MLP width ``f``: about one more forward). Only the upper triangle is computed, in
strips of rows (:func:`add_upper_gram_`), which roughly halves that, and the LM head is
skipped (the hooks need the layers' inputs only). Each hook call takes the whole batch's
counted tokens as one matrix, so the products are large GEMMs. Products are float32 on the
CPU and in the model's dtype on CUDA, added to float64 sums once per batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from csulora.errors import InputError
from csulora.linalg.gram import calibration_moments, update_moment
from csulora.references.activations import MaskedInputHooks, StopForward, run_batches
from csulora.references.calibration.groups import GramGroup
from csulora.references.calibration.replay import BlockResume, block_index, recording_block_output, replaying_blocks
from csulora.types import ModuleCalibration, SecondMoment

# Rows per strip of the upper-triangle Gram products (add_upper_gram_): 256 was fastest of
# 128..1024 at n = 576, 1536 and 4096 on one CPU thread. Wider Grams get at most MAX_STRIPS
# strips (n / 16 rows, a multiple of 64): at n = 11008 and 256 tokens, 704-row strips cost the
# same as 256-row ones on one thread and 0.65x on two threads of the busy benchmark machine
# (43 small GEMMs and copies a Gram, each a wait for the other thread, become 16).
GRAM_STRIP = 256
MAX_STRIPS = 16


def strip_rows(n: int, strip: int | None = None) -> int:
    """Rows per strip of an ``n x n`` Gram: ``strip`` when given, else ``GRAM_STRIP`` or, for a
    Gram wider than ``MAX_STRIPS`` of those, ``n / MAX_STRIPS`` rounded up to 64."""
    if strip is not None:
        return strip
    return max(GRAM_STRIP, -(-n // (MAX_STRIPS * 64)) * 64)


def product_dtype_for(device: torch.device, model_dtype: torch.dtype) -> torch.dtype:
    """float32 products on the CPU; on CUDA the model's dtype (docs/design.md §5c)."""
    return model_dtype if device.type == "cuda" else torch.float32


# -- the Gram kernels -----------------------------------------------------------------------------
def strip_layout(n: int, strip: int) -> list[tuple[int, int, int]]:
    """``(start, rows, offset)`` of each strip of rows ``start:start+rows``, columns ``start:``, in a
    packed buffer (:class:`PackedGram`): the strips hold the upper triangle, diagonal blocks whole."""
    layout, offset = [], 0
    for start in range(0, n, strip):
        rows = min(strip, n - start)
        layout.append((start, rows, offset))
        offset += rows * (n - start)
    return layout


def packed_numel(n: int, strip: int | None = None) -> int:
    """Numbers a :class:`PackedGram` holds: ``n (n + strip) / 2`` or so, about half of ``n^2``."""
    start, rows, offset = strip_layout(n, strip_rows(n, strip))[-1]
    return offset + rows * (n - start)


def sum_bytes(group: GramGroup, strip: int | None = None, *, sets: int = 2) -> int:
    """The harmful and the task sum of ``group``, packed float64, held together while a pass runs
    (``sets=1``: the harmful sum alone, the fine-tuned model's statistics)."""
    return sets * packed_numel(group.n, strip) * 8


class BufferPool:
    """Buffers handed back once used and handed out again, by dtype, size and device.

    Fresh memory is the statistics pass's largest fixed cost: the kernel maps and zeroes each
    page on its first touch (about 2 s per GB of CPU on the shared 2-core benchmark machine,
    docs/benchmarks.md), so a pass that reuses the last one's sums touches no new memory.
    A buffer from the pool holds whatever was in it: every user overwrites what it reads.
    """

    def __init__(self) -> None:
        self.free: dict[tuple, list[Tensor]] = {}

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        spare = self.free.get((numel, dtype, str(device)))
        return spare.pop() if spare else torch.empty(numel, dtype=dtype, device=device)

    def give(self, buffer: Tensor) -> None:
        self.free.setdefault((buffer.numel(), buffer.dtype, str(buffer.device)), []).append(buffer)


class PackedGram:
    """``sum x^T x`` over batches, upper triangle only: strips of rows packed in one buffer.

    Half the memory of the full matrix, so half the fresh pages to touch; :func:`unpack_symmetric`
    writes the full symmetric float64 matrix when the statistics are built, one group at a time.
    Bit for bit the float64 sum of each batch's product (as :func:`add_upper_gram_` explains), yet
    no buffer is zeroed and a one-batch sum never holds float64: the first batch's products are
    kept as they come (``first``, in the product dtype), the float64 sum (``total``) is made from
    them when a second batch arrives, and later products are added to it. Buffers come from
    ``pool`` and go back with :meth:`release`.
    """

    def __init__(self, n: int, pool: BufferPool, device: torch.device, strip: int | None = None) -> None:
        self.n, self.strip, self.pool, self.device = n, strip_rows(n, strip), pool, device
        self.layout = strip_layout(n, self.strip)
        self.first: Tensor | None = None  # the first batch's products, packed, in the product dtype
        self.total: Tensor | None = None  # float64, packed, from the second batch on
        self.tokens = 0

    @property
    def numel(self) -> int:
        return packed_numel(self.n, self.strip)

    @property
    def data(self) -> Tensor | None:
        """The packed sum so far (None before the first batch)."""
        return self.total if self.total is not None else self.first

    def strips(self, buffer: Tensor) -> list[tuple[int, int, Tensor]]:
        """``(start, rows, view)``: each strip of ``buffer`` as a ``rows x (n - start)`` matrix."""
        return [
            (start, rows, buffer[offset : offset + rows * (self.n - start)].view(rows, self.n - start))
            for start, rows, offset in self.layout
        ]

    def widen(self) -> Tensor:
        """The float64 sum, made from the first batch's products when this is the second batch."""
        if self.total is None:
            assert self.first is not None
            self.total = self.pool.take(self.numel, torch.float64, self.device).copy_(self.first)
            self.pool.give(self.first)
            self.first = None
        return self.total

    def release(self) -> None:
        for buffer in (self.first, self.total):
            if buffer is not None:
                self.pool.give(buffer)
        self.first = self.total = None


def add_upper_gram_(sums: PackedGram, x: Tensor, workspace: Tensor) -> None:
    """``sums += x^T x`` on the upper strips; ``workspace``: at least ``sums.strip x n`` numbers of x's dtype.

    A Gram is symmetric, so half of ``x^T x`` is redundant: the strips cost ``(1 + strip/n)/2``
    of the full product, and measured on one CPU thread (2048 tokens) 0.55x at n = 1536 and
    0.41x at n = 4096 (the strips also run closer to peak than the transposed full product).
    The first batch's products go straight into packed storage; a later batch's land in the
    reused ``workspace`` (a fresh product would fault in new pages every time) and are added,
    converted, to the float64 sum: ``0 + P1 + P2 + ...`` in float64, each ``P`` a float32 (or
    model dtype) product, as when the sums started from zeros.
    """
    n = sums.n
    if sums.data is None:
        sums.first = sums.pool.take(sums.numel, x.dtype, sums.device)
        for start, rows, view in sums.strips(sums.first):
            torch.mm(x[:, start : start + rows].T, x[:, start:], out=view)
    else:
        for start, rows, view in sums.strips(sums.widen()):
            product = workspace[: rows * (n - start)].view(rows, n - start)
            torch.mm(x[:, start : start + rows].T, x[:, start:], out=product)
            view.add_(product)
    sums.tokens += int(x.shape[0])


def unpack_symmetric(sums: PackedGram, out: Tensor) -> Tensor:
    """Write the full symmetric ``n x n`` sum into ``out`` (every entry: ``out`` may hold anything).

    ``out`` is float64, or of the sum's own dtype (a one-batch sum is its products, exact in
    their dtype). Each strip is copied into its rows and, transposed, into the columns below
    its diagonal block; then every diagonal block's lower triangle is replaced by the mirror
    of its upper one, all blocks in one operation, so every entry below the diagonal is exactly
    its upper twin. Two copies a strip and no n x n temporary: on a busy 2-core machine each
    small operation costs a wait for the other thread (docs/benchmarks.md). A sum that saw no
    tokens is zero.
    """
    n, data = sums.n, sums.data
    if out.shape != (n, n) or out.dtype not in (torch.float64, data.dtype if data is not None else torch.float64):
        raise ValueError(f"need a float64 {n} x {n} matrix, got {out.dtype} {list(out.shape)}")
    if data is None:
        return out.zero_()
    for start, rows, view in sums.strips(data):
        out[start : start + rows, start:].copy_(view)
        out[start + rows :, start : start + rows].copy_(view[:, rows:].T)
    mirror_diagonal_blocks_(out, sums.strip)
    return out


def mirror_diagonal_blocks_(out: Tensor, strip: int) -> None:
    """In every ``strip x strip`` block on the diagonal (the last one may be smaller), the lower
    triangle becomes the transpose of the upper one."""
    n = out.shape[0]
    whole, rest = divmod(n, strip)
    width = min(strip, n)
    upper = torch.ones(width, width, dtype=torch.bool, device=out.device).triu()
    if whole:
        blocks = out.as_strided((whole, strip, strip), (strip * n + strip, n, 1))
        blocks.copy_(torch.where(upper, blocks, blocks.transpose(1, 2)))
    if rest:
        block = out[n - rest :, n - rest :]
        block.copy_(torch.where(upper[:rest, :rest], block, block.T))


# -- the hooks ------------------------------------------------------------------------------------
class GroupGramSums(MaskedInputHooks):
    """Adds ``x^T x`` of the counted rows into one :class:`PackedGram` per group (hooked on its
    first module); buffers come from ``pool`` and go back to it once the statistics are built.

    ``stop_after``: the module after which nothing of this pass is left to see; its hook
    ends the forward (:class:`~csulora.references.activations.StopForward`).
    """

    def __init__(
        self,
        groups: Sequence[GramGroup],
        linears: Mapping[str, nn.Linear],
        *,
        device: torch.device,
        product_dtype: torch.dtype,
        stop_after: str | None,
        pool: BufferPool,
        strip: int | None = None,
    ) -> None:
        super().__init__({g.modules[0]: linears[g.modules[0]] for g in groups})
        self.group_of = {g.modules[0]: g.name for g in groups}
        self.sums = {g.name: PackedGram(g.n, pool, device, strip) for g in groups}
        need = max(min(s.strip, s.n) * s.n for s in self.sums.values())
        self.workspace = pool.take(need, product_dtype, device)
        self.pool = pool
        self.product_dtype = product_dtype
        self.stop_after = stop_after

    def observe(self, name: str, module: nn.Module, x: Tensor) -> None:
        add_upper_gram_(self.sums[self.group_of[name]], x.to(self.product_dtype), self.workspace)
        if name == self.stop_after:
            raise StopForward

    def __exit__(self, *exc_info) -> None:
        super().__exit__(*exc_info)
        self.pool.give(self.workspace)


def accumulate_sums(
    model: nn.Module,
    examples: Sequence[Mapping],
    groups: Sequence[GramGroup],
    linears: Mapping[str, nn.Linear],
    *,
    pad_id: int,
    batch_size: int,
    product_dtype: torch.dtype,
    progress: bool = True,
    desc: str = "statistics",
    strip: int | None = None,
    resume: BlockResume | None = None,
    on_batch: Callable[[int], None] | None = None,
    pool: BufferPool | None = None,
) -> dict[str, PackedGram]:
    """The Gram sums of ``groups`` over ``examples``, packed (:class:`PackedGram`, on the model's
    device, with their token counts).

    Every token of an example counts unless it has ``labels`` (then those not ``-100``);
    padding never counts. ``strip``: rows per product strip (default :func:`strip_rows`; see
    :func:`add_upper_gram_`).
    ``resume``: skip the blocks before this pass and record a block's output for the next
    (:class:`~csulora.references.calibration.replay.BlockResume`; several passes only). The
    forward ends as soon as nothing of this pass is left to see: after its last group's input,
    or after the recorded block. ``on_batch``: called with each batch's token count (a caller's
    progress bar; without it the batches get a bar of their own when ``progress``). ``pool``:
    where the buffers come from (:class:`BufferPool`; default a new one).
    """
    device = next(model.parameters()).device
    record_at = resume.record_at if resume is not None else None
    stop_at_record = record_at is not None and record_at >= block_index(groups[-1].modules[0])
    single_calls = all(g.calls == 1 for g in groups)
    stop_after = groups[-1].modules[0] if single_calls and not stop_at_record else None
    hooks = GroupGramSums(groups, linears, device=device, product_dtype=product_dtype, stop_after=stop_after,
                          pool=pool if pool is not None else BufferPool(), strip=strip)  # fmt: skip
    with contextlib.ExitStack() as stack:
        sums = stack.enter_context(hooks)
        if resume is not None and resume.cached is not None and resume.start > 0:
            stack.enter_context(replaying_blocks(resume.blocks[: resume.start], resume.cached, device))
        if resume is not None and record_at is not None:
            stack.enter_context(recording_block_output(resume.blocks[record_at], resume.recorded, stop=stop_at_record))
        run_batches(
            model, examples, sums, pad_id=pad_id, batch_size=batch_size, progress=progress, desc=desc,
            longest_first=True, on_batch=on_batch,
        )  # fmt: skip
    return sums.sums


def full_sum(sums: PackedGram) -> Tensor:
    """The full symmetric sum in an ``n x n`` buffer of the sums' pool (give it back when done):
    float64, or for a one-batch sum its products' dtype -- the same numbers in half the memory
    (:func:`csulora.linalg.gram.normalised_gram` reads either in float64)."""
    dtype = torch.float64 if sums.total is not None or sums.first is None else sums.first.dtype
    out = sums.pool.take(sums.n * sums.n, dtype, sums.device).view(sums.n, sums.n)
    return unpack_symmetric(sums, out)


# -- the stored statistics ------------------------------------------------------------------------
def stored_form(moment: SecondMoment) -> SecondMoment:
    """On the CPU in float32, as the file stores it: finished groups wait there for the writer,
    and float32 halves what they hold (docs/design.md §5c: products are float32 anyway)."""
    moved = {
        key: getattr(moment, key).to(device="cpu", dtype=torch.float32)
        for key in ("matrix", "U", "L")
        if getattr(moment, key) is not None
    }
    return replace(moment, **moved)


def build_calibration(group: GramGroup, harmful: PackedGram, task: PackedGram) -> ModuleCalibration:
    """One group's statistics from its sums: normalised, dense or spiked
    (:func:`csulora.linalg.gram.calibration_moments`). Every buffer of the sums goes back to
    their pool: the sums are spent."""
    full_h, full_t = full_sum(harmful), full_sum(task)
    try:
        built = calibration_moments(group.name, full_h, harmful.tokens, full_t, task.tokens)
    except ValueError as exc:
        raise InputError(f"calibration of {group.name}: {exc}") from None
    finally:
        for full in (full_h, full_t):
            harmful.pool.give(full.view(-1))
        harmful.release()
        task.release()
    return replace(built, harmful=stored_form(built.harmful), task=stored_form(built.task))


def build_update_statistics(group: GramGroup, harmful: PackedGram) -> ModuleCalibration:
    """One group's statistics of the fine-tuned model (Antidote's): the harmful moment alone
    (:func:`csulora.linalg.gram.update_moment`), ``task`` None. The sums' buffers go back to
    their pool, as in :func:`build_calibration`."""
    full = full_sum(harmful)
    try:
        moment = update_moment(group.name, full, harmful.tokens)
    except ValueError as exc:
        raise InputError(f"update statistics of {group.name}: {exc}") from None
    finally:
        harmful.pool.give(full.view(-1))
        harmful.release()
    return ModuleCalibration(group=group.name, harmful=stored_form(moment), task=None)
