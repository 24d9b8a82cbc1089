"""The memory budget, the passes over the tokens it asks for, and the statistics pass itself
(docs/design.md §5c).

Memory. A group needs two ``n x n`` float64 sums (harmful and task); at 7B all groups at
once exceed a 24 GB machine. The groups are then processed in as many passes over the
cached tokens as the memory budget requires (:func:`plan_passes`), each later pass starting
at its first block from hidden states the one before cached
(:mod:`csulora.references.calibration.replay`). One progress bar covers every pass, in
tokens per second.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from csulora.references.calibration.groups import PROBE_TOKENS, GramGroup, shared_input_groups
from csulora.references.calibration.replay import BlockResume, block_index, decoder_blocks, replay_is_exact
from csulora.references.calibration.statistics import (
    BufferPool,
    accumulate_sums,
    build_calibration,
    build_update_statistics,
    product_dtype_for,
    sum_bytes,
)
from csulora.types import ModuleCalibration

# The Grams of one pass may take this share of the memory free after the model is loaded.
MEMORY_FRACTION = 0.5
FALLBACK_BUDGET = 8 << 30  # when the free memory cannot be read

Log = Callable[[str], None]


def plan_passes(groups: Sequence[GramGroup], budget_bytes: int, *, sets: int = 2) -> list[list[GramGroup]]:
    """Consecutive groups (forward order) whose sums (:func:`~csulora.references.calibration.statistics.sum_bytes`)
    fit the budget together; a group larger than the budget gets a pass of its own. Building the
    statistics needs two full ``n x n`` float64 matrices of the widest group on top (reused).
    ``sets``: sums per group (1: the fine-tuned model's harmful sums alone)."""
    passes: list[list[GramGroup]] = []
    current: list[GramGroup] = []
    used = 0
    for group in groups:
        if current and used + sum_bytes(group, sets=sets) > budget_bytes:
            passes.append(current)
            current, used = [], 0
        current.append(group)
        used += sum_bytes(group, sets=sets)
    if current:
        passes.append(current)
    return passes


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on ``device`` now (None when it cannot be read)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()  # blocks cached by the generation are free for the sums
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def default_memory_budget(device: torch.device) -> int:
    """Half of the memory free after the model is loaded (8 GiB when that cannot be read)."""
    free = free_memory_bytes(device)
    return int(free * MEMORY_FRACTION) if free else FALLBACK_BUDGET


def memory_budget(memory_budget_gb: float | None, device: torch.device) -> int:
    """Bytes the sums of one pass may take: the user's GB, else :func:`default_memory_budget`."""
    return int(memory_budget_gb * (1 << 30)) if memory_budget_gb is not None else default_memory_budget(device)


def size_text(n_bytes: float) -> str:
    return f"{n_bytes / (1 << 30):.1f} GiB" if n_bytes >= 1 << 30 else f"{n_bytes / (1 << 20):.1f} MiB"


def pass_span(groups: Sequence[GramGroup]) -> str:
    first, last = groups[0].modules[0], groups[-1].modules[-1]
    return first if first == last else f"{first} .. {last}"


@dataclass(frozen=True)
class StatisticsPlan:
    """The Gram groups, the passes they take, and the decoder blocks later passes resume at
    (None: one pass, or a model whose blocks cannot be skipped; then passes recompute them)."""

    groups: list[GramGroup]
    passes: list[list[GramGroup]]
    blocks: list[nn.Module] | None = None

    def describe(self) -> str:
        if len(self.passes) == 1:
            return "one pass over the tokens"
        if self.blocks is not None:
            return (
                f"{len(self.passes)} passes over the tokens, each starting at its first layer from hidden states "
                "the last one cached"
            )
        return f"{len(self.passes)} passes over the tokens, each running the model from the start up to its last layer"


def plan_statistics(
    model: nn.Module, linears: Mapping[str, nn.Linear], examples: Sequence[Mapping], budget: int, log: Log,
    *, sets: int = 2,
) -> StatisticsPlan:
    """Groups from a probe forward on the first example, passes from the memory budget, and
    whether later passes may start from cached hidden states (checked by another probe).
    ``sets``: the sums each group holds (:func:`plan_passes`)."""
    probe = examples[0]["input_ids"][:PROBE_TOKENS]
    groups = shared_input_groups(model, linears, probe)
    passes = plan_passes(groups, budget, sets=sets)
    blocks = None
    if len(passes) > 1 and all(g.calls == 1 for g in groups):
        blocks = decoder_blocks(model, linears)
        if blocks is not None and not replay_is_exact(model, blocks, linears, probe):
            blocks = None
    plan = StatisticsPlan(groups=groups, passes=passes, blocks=blocks)
    needed = sum(sum_bytes(g, sets=sets) for g in groups)
    log(
        f"{len(linears)} modules in {len(groups)} Gram groups; their sums need {size_text(needed)}, "
        f"budget {size_text(budget)}: {plan.describe()}"
    )
    return plan


@contextlib.contextmanager
def token_bar(total: int, progress: bool) -> Iterator[Any]:
    """One bar over every pass of the statistics, in tokens (tqdm shows tokens/s)."""
    from tqdm.auto import tqdm

    with tqdm(total=total, desc="statistics", unit="tok", unit_scale=True, disable=None if progress else True) as bar:
        yield bar


def resume_for(plan: StatisticsPlan, number: int, cached: Sequence[Any] | None) -> BlockResume | None:
    """How pass ``number`` (1-based) skips its earlier blocks and records the next pass's start."""
    if plan.blocks is None:
        return None
    part, passes = plan.passes[number - 1], plan.passes
    following = block_index(passes[number][0].modules[0]) if number < len(passes) else None
    return BlockResume(
        plan.blocks, start=block_index(part[0].modules[0]), cached=cached,
        record_at=following - 1 if following else None,
    )  # fmt: skip


def collect_statistics(
    model: nn.Module,
    linears: Mapping[str, nn.Linear],
    plan: StatisticsPlan,
    harmful: Sequence[Mapping],
    task: Sequence[Mapping] | None,
    *,
    pad_id: int,
    batch_size: int,
    product_dtype: torch.dtype,
    progress: bool,
    log: Log,
) -> dict[str, ModuleCalibration]:
    """Every group's statistics, pass by pass: harmful sums, task sums, then the stored form.
    The buffers of one pass's sums are reused by the next (:class:`~csulora.references.calibration.statistics.BufferPool`).
    ``task`` None: no task set, the fine-tuned model's statistics (harmful moment only,
    :func:`~csulora.references.calibration.statistics.build_update_statistics`)."""
    calibrations: dict[str, ModuleCalibration] = {}
    pool = BufferPool()
    common = {"pad_id": pad_id, "batch_size": batch_size, "product_dtype": product_dtype, "progress": False, "pool": pool}
    passes = plan.passes
    cached: dict[str, Sequence[Any] | None] = {"harmful": None, "task": None}
    sets = (("harmful", harmful),) if task is None else (("harmful", harmful), ("task", task))
    tokens = sum(len(e["input_ids"]) for _, examples in sets for e in examples)
    with token_bar(tokens * len(passes), progress) as bar:
        for number, part in enumerate(passes, start=1):
            if len(passes) > 1:
                log(f"pass {number}/{len(passes)}: {len(part)} groups, {pass_span(part)}")
                bar.set_postfix_str(f"pass {number}/{len(passes)}")
            sums = {}
            for which, examples in sets:
                resume = resume_for(plan, number, cached[which])
                sums[which] = accumulate_sums(model, examples, part, linears, resume=resume, on_batch=bar.update, **common)
                cached[which] = resume.recorded if resume is not None and resume.record_at is not None else None
            for group in part:  # pop: each group's sums go back to the pool as soon as it is built
                if task is None:
                    calibrations[group.name] = build_update_statistics(group, sums["harmful"].pop(group.name))
                    continue
                calibrations[group.name] = build_calibration(
                    group, sums["harmful"].pop(group.name), sums["task"].pop(group.name)
                )
    return calibrations


def statistics_pass(
    model: nn.Module, tokenizer: Any, linears: Mapping[str, nn.Linear], harmful: Sequence[Mapping],
    task: Sequence[Mapping] | None, *, memory_budget_gb: float | None, device: torch.device, dtype: torch.dtype,
    batch_size: int, progress: bool, log: Log,
) -> tuple[StatisticsPlan, dict[str, ModuleCalibration], int]:
    """The plan (groups probed on the task's first example, else the harmful set's), the statistics
    and the memory budget they ran under. ``task`` None: the fine-tuned model's harmful sums alone."""
    budget = memory_budget(memory_budget_gb, device)
    sets = 1 if task is None else 2
    plan = plan_statistics(model, linears, harmful if task is None else task, budget, log, sets=sets)
    calibrations = collect_statistics(
        model, linears, plan, harmful, task,
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0, batch_size=batch_size,
        product_dtype=product_dtype_for(device, dtype), progress=progress, log=log,
    )  # fmt: skip
    return plan, calibrations, budget
