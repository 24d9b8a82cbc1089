"""Antidote (Huang et al., arXiv 2408.09600): one-shot pruning of the weights harmful inputs use most.

Published code: github.com/git-disl/Antidote, ``utils.py`` ``prune_wanda_outlier`` (the scores and
masks), applied in ``train.py`` (``param.data *= (1 - bad_mask)``). This file re-derives its
semantics (none of its code is used); ``benchmarks/peers_parity.py`` runs the published function
beside this one (docs/peers.md).

Per pruned weight matrix ``W`` (rows x width, ``out x in``) with ``q_j`` the mean square of its
j-th input over the statistics pass (the diagonal of the input Gram, any scale):

    score_ij = |W_ij| * sqrt(q_j)                          (Wanda's score)

and in **every row** the ``width - int(width * (1 - dense_ratio))`` entries with the highest
scores are set to zero (the published mask sorts each row ascending with a stable sort, marks
all but the first ``int(width * (1 - dense_ratio))`` entries, and multiplies the weight by
``1 - mask``; ties therefore prune the higher column first). It is per row, uniform over
layers: the "outlier" (OWL) layer-wise ratios in ``prune_wanda_outlier`` are commented out,
and ``Hyper_m = 3``, ``Lamda = 0.08`` are set but unused; ``prune_n = 0`` (unstructured).

The inputs are those of the **fine-tuned** model reading harmful prompts followed by harmful
answers (the published "realignment" data: BeaverTails harmful pairs, 2000 of them in the
scripts), recorded layer by layer with the unpruned weights (the masks are all computed
before any is applied). Which weights:

- an adapter (``full_finetuning="False"``): every LoRA factor — ``lora_A`` (r x n, inputs x) and
  ``lora_B`` (m x r, inputs ``A x``, so ``q_j = (A S A^T)_jj`` with S the module's input Gram);
  the output stays a LoRA of the same rank. Published default ``dense_ratio = 0.1``
  (``train.py``, the adapter scripts).
- a full fine-tune (``full_finetuning="True"``): the full weights ``W_ft`` (not the update) of the
  modules whose name contains ``q_proj``, ``k_proj`` or ``v_proj``; pruned entries become 0, so
  the corrected update is ``X = W_ft * (1 - mask) - W_aligned``. Published
  ``dense_ratio = 0.00001`` (``script/finetune/antidote_poison_ratio_full.sh``): one weight per
  row at width 4096.

The statistics are the fine-tuned model's: ``csulora calibrate ALIGNED --update UPDATE --pairs
FILE.jsonl -o STATS.safetensors`` runs the aligned model with the adapter attached (merged), or
the full fine-tune, on the harmful prompts each followed by its harmful answer, and writes an
update-statistics file (role ``update``) whose one Gram a group (``harmful``) is read here;
``correct``/``tune`` take it as ``--update-statistics STATS.safetensors`` (``UPDATE_STATISTICS``)
and refuse a file measured on another update or aligned model. The dense form also reads
``W_aligned`` (``ALIGNED_WEIGHT``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from csulora.errors import InputError
from csulora.linalg.geometry import DenseGeometry, ModuleGeometry
from csulora.linalg.gram import moment_diagonal, row_gram
from csulora.methods.base import (
    ALIGNED_WEIGHT,
    UPDATE_STATISTICS,
    CorrectionMethod,
    MethodConfig,
    Tuning,
    require_choice,
    require_number,
)
from csulora.methods.common import finish_dense_report, finish_report, method_report
from csulora.methods.registry import register
from csulora.types import (
    DenseModuleInput,
    DenseModuleResult,
    LoraUpdate,
    ModuleCalibration,
    ModuleInput,
    ModuleResult,
    SecondMoment,
)

PUBLISHED_DENSE_RATIO_ADAPTER = 0.1  # train.py --dense_ratio default; script/finetune/antidote_*.sh
PUBLISHED_DENSE_RATIO_FULL = 1e-5  # script/finetune/antidote_poison_ratio_full.sh: dense_ratio=0.00001
PUBLISHED_FULL_TARGETS = ("q_proj", "k_proj", "v_proj")  # utils.find_layers(full_finetuning="True")
PRUNE_CHOICES = ("qkv", "all")
_SORT_ROWS = 256  # rows scored and sorted at a time (bounded float + int64 temporaries)


def pruned_per_row(width: int, dense_ratio: float) -> int:
    """Entries zeroed in a row of ``width``: ``width - int(width * (1 - dense_ratio))``, the
    published float arithmetic kept (``int(4096 * (1 - 1e-5)) = 4095``: one entry)."""
    return width - int(width * (1 - dense_ratio))


def top_score_mask(weight: Tensor, input_sq_norms: Tensor, dense_ratio: float) -> Tensor:
    """Bool mask (rows x width) of each row's :func:`pruned_per_row` highest-scoring entries.

    ``score_ij = |W_ij| * sqrt(q_j)`` in ``weight``'s dtype; ties go to the higher column (the
    published stable ascending sort marks the tail). ``input_sq_norms``: ``q`` (width), >= 0.
    """
    rows, width = weight.shape
    if input_sq_norms.shape != (width,):
        raise ValueError(f"the input statistics have {tuple(input_sq_norms.shape)} entries, the weight {width} columns")
    mask = torch.zeros(rows, width, dtype=torch.bool)
    count = pruned_per_row(width, dense_ratio)
    if count == 0:
        return mask
    norms = input_sq_norms.to(torch.float64).clamp_min(0.0).sqrt().to(weight.dtype)
    for start in range(0, rows, _SORT_ROWS):
        score = weight[start : start + _SORT_ROWS].abs() * norms
        tail = torch.sort(score, dim=1, stable=True).indices[:, width - count :]
        mask[start : start + _SORT_ROWS].scatter_(1, tail, True)
    return mask


@dataclass(frozen=True)
class PrunedFactors:
    """LoRA factors after pruning (same shapes, same rank) and how many entries each lost."""

    A: Tensor
    B: Tensor
    pruned_A: int
    pruned_B: int


def antidote_factors(A: Tensor, B: Tensor, inputs: SecondMoment, dense_ratio: float) -> PrunedFactors:
    """Prune an adapter module's factors (``dW = s B A``; the scale does not change the ranking).

    ``inputs``: the Gram of the module's inputs x in the fine-tuned model (dense or spiked, any
    scale). ``lora_A`` is scored with ``q = diag(S)``; ``lora_B`` reads ``A x``, scored with
    ``q = diag(A S A^T)`` from the unpruned A, as the published masks are all taken first.
    """
    if inputs.n != A.shape[1]:
        raise ValueError(f"the input statistics are for {inputs.n} inputs but lora_A has {A.shape[1]} columns")
    A64, B64 = A.to(torch.float64), B.to(torch.float64)
    mask_A = top_score_mask(A64, moment_diagonal(inputs), dense_ratio)
    mask_B = top_score_mask(B64, row_gram(A64, inputs).diagonal(), dense_ratio)
    return PrunedFactors(
        A=A64.masked_fill(mask_A, 0.0),
        B=B64.masked_fill(mask_B, 0.0),
        pruned_A=int(mask_A.sum()),
        pruned_B=int(mask_B.sum()),
    )


def antidote_dense_(dW: Tensor, W_aligned: Tensor, input_sq_norms: Tensor, dense_ratio: float) -> int:
    """A full fine-tune's module, in place: ``dW`` becomes ``X = W_ft * (1 - mask) - W_aligned``.

    ``W_ft = W_aligned + dW`` (formed by blocks of rows in dW's dtype; ``W_aligned`` may be a
    memory map in any float dtype) is what the published code scores and prunes. Returns the
    number of entries zeroed. Note a zero update still prunes: Antidote zeroes weights of the
    fine-tuned model, not of its update.
    """
    if W_aligned.shape != dW.shape:
        raise ValueError(f"the aligned weight is {list(W_aligned.shape)} but the update is {list(dW.shape)}")
    pruned = 0
    if pruned_per_row(dW.shape[1], dense_ratio) == 0:
        return 0
    for start in range(0, dW.shape[0], _SORT_ROWS):
        rows = slice(start, start + _SORT_ROWS)
        aligned = W_aligned[rows].to(dW.dtype)
        mask = top_score_mask(aligned + dW[rows], input_sq_norms, dense_ratio)
        dW[rows] = torch.where(mask, -aligned, dW[rows])
        pruned += int(mask.sum())
    return pruned


def is_published_full_target(name: str) -> bool:
    """Whether the published full fine-tune path prunes this module (its name test, by substring)."""
    return any(part in name for part in PUBLISHED_FULL_TARGETS)


# -- the method's options and sweep ---------------------------------------------------------------
@dataclass(frozen=True)
class AntidoteConfig(MethodConfig):
    dense_ratio: float | None = field(
        default=None,
        metadata={
            "help": "share of each row's weights zeroed, highest |W| x input norm first (0: off); default as "
            f"published: {PUBLISHED_DENSE_RATIO_ADAPTER} on an adapter's LoRA factors, "
            f"{PUBLISHED_DENSE_RATIO_FULL} on a full fine-tune's weights"
        },
    )
    prune: str = field(
        default="qkv",
        metadata={
            "help": "on a full fine-tune, the weights pruned: qkv (q/k/v_proj, as published) "
            "or all (every targeted linear)",
            "choices": PRUNE_CHOICES,
        },
    )

    def __post_init__(self) -> None:
        if self.dense_ratio is not None:
            require_number("dense_ratio", self.dense_ratio, low=0.0, high=1.0)
            self._store_as("dense_ratio", float)
        require_choice("prune", self.prune, PRUNE_CHOICES)

    def ratio(self, *, full_fine_tune: bool) -> float:
        """The dense ratio used: the option, or the published default for the input's kind."""
        if self.dense_ratio is not None:
            return self.dense_ratio
        return PUBLISHED_DENSE_RATIO_FULL if full_fine_tune else PUBLISHED_DENSE_RATIO_ADAPTER

    def prunes(self, module_name: str) -> bool:
        """Whether a full fine-tune's module is pruned under ``prune`` (adapters: every factor)."""
        return self.prune == "all" or is_published_full_target(module_name)


# Weakest first; 0 prunes nothing (the identity). The grid spans both published defaults (1e-5 on
# full weights, 0.1 on LoRA factors).
ANTIDOTE_TUNING = Tuning(knob="dense_ratio", grid=(0.0, 1e-5, 0.01, 0.03, 0.1, 0.2, 0.3), identity=0.0)


class Antidote(CorrectionMethod[AntidoteConfig]):
    """Antidote: prune, per row, the weights the fine-tuned model's harmful inputs use most."""

    name = "antidote"
    pretty_name = "Antidote (one-shot pruning)"
    paper_url = "https://arxiv.org/abs/2408.09600"
    config_cls = AntidoteConfig
    inputs = frozenset({UPDATE_STATISTICS})
    tuning = ANTIDOTE_TUNING
    report_columns = (("pruned_share", "pruned", ".3g"),)

    def is_identity(self, config: AntidoteConfig) -> bool:
        return config.dense_ratio == 0.0

    def dense_inputs(self, config: AntidoteConfig, *, has_displacement: bool) -> frozenset[str]:
        return frozenset({UPDATE_STATISTICS, ALIGNED_WEIGHT})

    def correct_module(self, module: ModuleInput, config: AntidoteConfig) -> ModuleResult:
        """Prune the LoRA factors themselves: the output stays a LoRA of the same rank."""
        stats = _statistics_of(module, module.update.shape[1])
        geometry = ModuleGeometry(module)
        report = method_report(geometry)
        ratio = config.ratio(full_fine_tune=False)
        if ratio == 0.0:
            update, pruned, entries = module.update, 0, 0  # the identity: the input bytes
        else:
            factors = antidote_factors(geometry.A, geometry.B, stats.harmful, ratio)
            update = LoraUpdate(A=factors.A, B=factors.B, scale=module.update.scale)
            pruned, entries = factors.pruned_A + factors.pruned_B, factors.A.numel() + factors.B.numel()
        report.update(dense_ratio=ratio, pruned_share=pruned / entries if entries else 0.0)
        return ModuleResult(name=module.name, update=update, report=finish_report(report, update))

    def correct_dense(self, module: DenseModuleInput, config: AntidoteConfig) -> DenseModuleResult:
        """Prune ``W_ft = W_aligned + dW`` of the pruned modules (q/k/v as published); the update
        becomes ``W_ft * (1 - mask) - W_aligned``, in dW's own buffer."""
        report = method_report(DenseGeometry(module))  # before dW is overwritten
        ratio = config.ratio(full_fine_tune=True)
        pruned = 0
        if config.prunes(module.name) and ratio > 0.0:
            stats = _statistics_of(module, module.shape[1])
            if module.aligned_weight is None:
                raise InputError(f"{module.name}: Antidote's dense form needs W_aligned beside dW")
            pruned = antidote_dense_(module.update, module.aligned_weight, moment_diagonal(stats.harmful), ratio)
        update = module.update if pruned else None
        report.update(dense_ratio=ratio, pruned_share=pruned / module.update.numel())
        return DenseModuleResult(name=module.name, update=update, report=finish_dense_report(report, update))


def _statistics_of(module: ModuleInput | DenseModuleInput, n: int) -> ModuleCalibration:
    stats = module.update_statistics
    if stats is None:
        raise InputError(f"{module.name}: Antidote needs the fine-tuned model's activation statistics")
    if stats.n != n:
        raise InputError(
            f"{module.name}: the fine-tuned model's statistics (group {stats.group}) are for inputs of size {stats.n} "
            f"but the update has {n} columns"
        )
    return stats


register(Antidote())
