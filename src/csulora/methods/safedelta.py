"""Safe Delta (Lu et al., ICML 2025, arXiv 2505.12038): keep what the safety budget allows of a dense update.

Published code: github.com/ColinLu50/SafeDelta, ``llama2/safedelta/safedelta_runner.py``
(``SafeDeltaRunner.adjust_delta``, a SparseGPT-style sweep) driven by ``llama2/run_safedelta.py``.
This file re-derives its semantics (none of its code is used); ``benchmarks/peers_parity.py``
runs the published function beside this one (docs/peers.md).

Per linear module, with the fine-tuned update ``dW = W_ft - W_aligned`` (m x n, notation of
docs/design.md §2) and ``H`` (n x n) the Gram of the **aligned** model's inputs on harmful prompts
followed by its own safe answers (exactly what ``csulora calibrate`` stores as ``S_h``, §5c):

1. Dead inputs (``H_jj == 0``) get ``H_jj = 1``; then ``H += delta I`` with ``delta`` = 1 % of the
   mean diagonal (``percdamp=0.01``).
2. ``U`` = the upper Cholesky factor of ``H^-1`` (``H^-1 = U^T U``), ``d_j = U_jj``; the
   sensitivity of input j is ``t_j = 1 / d_j^2``: the safety loss (the OBS cost, measured on the
   harmful inputs) of moving one weight of column j by 1 with the later columns compensating.
3. Columns are taken in blocks of 2048 (the block size ``run_safedelta.py`` passes). The result
   ``X`` (the corrected update; the written weight is ``W_aligned + X``) starts at 0. At the start
   of a block, with ``R = dW - X`` on its columns, every entry has the loss ``R_ij^2 t_j``. The
   entries are ordered by ``t_j`` ascending (least safety-sensitive first); the last 15 % of that
   order (``int(0.15 * m * c)`` entries of a block of c columns: the most sensitive columns) are
   never kept; of the rest, the longest prefix whose cumulative loss stays within the budget

       tau = mean_{j in block}(t_j) * (s / 2) * (m / 4096)

   is **kept**: those entries take their fine-tuned value, ``X_ij = dW_ij``. ``s / 2``: the
   published comment reads "2 = 4096 / blocksize=2048", and the 2 is fixed whatever the block
   size; ``m / 4096`` scales the budget with the module's rows. The published default is
   ``s = 0.1`` (``run_safedelta.main(scale=0.1)``; its scripts use 0.1 and 0.11).
4. OBS compensation: the columns of the block are swept in sub-blocks of 4. In a sub-block,
   each kept entry moves from its current value ``X_ij`` to ``dW_ij``, an error
   ``E_ij = (X_ij - dW_ij) / d_j`` (0 for entries not kept, which keep their current value), and
   every later column k (of this block and the following ones) is compensated,
   ``X_:k -= sum_{j in sub-block} E_:j U_jk``. Columns of one sub-block do not compensate each
   other (the published sweep skips it). Entries not kept therefore end at the compensation they
   received, which holds the module's output on the harmful inputs near the aligned one.

Which entries are kept depends on ``H`` only through ``t`` and the ratio ``loss / tau``, and the
compensation only through ``U_jk / d_j``: both are unchanged when ``H`` is multiplied by a
positive number. So the published ``H = (2 / samples) sum x x^T`` and our ``S_h`` (per-token
mean, divided by its mean eigenvalue) give the same result, except on dead inputs, whose
diagonal is set to an absolute 1 (on ``S_h`` that is the mean eigenvalue).

Ties: entries of one column share ``t_j``; we order ties by flat index (row, then column).
The published code uses ``torch.argsort`` (not stable), so which rows of a block's one boundary
column are kept is implementation-defined there. Deviation: a block of fewer than 7 entries has
``int(0.15 * m * c) == 0``, and the published slice ``[0:-0]`` then keeps nothing; here it
keeps up to the budget as for any block (real modules never have such blocks).

Memory: the sweep works in ``dW``'s own buffer (overwritten by ``X``) plus the compensation owed
to the columns not yet swept (m x (n - 2048), in dW's dtype), ``U`` (n x n, in dW's dtype) and
block-sized temporaries. Factorising ``H`` takes two n x n float64 matrices at a time
(1.9 GB at n = 11008); see :func:`safety_factor`.

The method has only a dense form: on a full fine-tune it writes ``W_aligned + X``; on a LoRA
adapter the pipeline hands it ``s B A`` and writes the corrected model, or with ``--lora-rank R``
its best rank-R LoRA (docs/design.md §9, issue 22).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from csulora.linalg.geometry import DenseGeometry
from csulora.errors import InputError
from csulora.linalg.gram import moment_matrix
from csulora.linalg.lowrank import small_math
from csulora.methods.base import (
    CALIBRATION,
    CorrectionMethod,
    MethodConfig,
    Tuning,
    require_number,
)
from csulora.methods.common import finish_dense_report, method_report
from csulora.methods.registry import register
from csulora.types import DenseModuleInput, DenseModuleResult, ModuleCalibration

# -- the published constants (safedelta_runner.py / run_safedelta.py) -----------------------------
PUBLISHED_S = 0.1  # run_safedelta.main(scale=0.1); scripts/purebad_safedelta.sh uses 0.11
DAMPING = 0.01  # adjust_delta(percdamp=0.01): delta = 1 % of the mean diagonal of H
BLOCK_COLUMNS = 2048  # run_safedelta passes blocksize=2048 (adjust_delta's own default is 1024)
SUB_BLOCK_COLUMNS = 4  # sub_block_size: columns updated together, without compensating each other
ROW_UNIT = 4096  # scale = self.rows / 4096
BUDGET_DIVISOR = 2.0  # s = s / 2, "2 = 4096 / blocksize=2048" (fixed whatever blocksize)
EXCLUDED_SHARE = 0.15  # sorted_indices[0 : -int(0.15 * numel)]: the most sensitive 15 % never kept

# -- ours ------------------------------------------------------------------------------------------
# Columns compensated lazily inside a block: the sweep applies a sub-block's errors to the rest of
# its 128-column chunk at once and a chunk's errors to the rest of the block at once (the same
# sums, ordered differently: fewer passes over memory than compensating the whole block per
# sub-block).
_CHUNK_COLUMNS = 128
_LOSS_ROWS = 1024  # rows of a block turned into float64 losses at a time (bounded temporaries)


@dataclass(frozen=True)
class SafetyFactor:
    """``H``'s damped inverse, factorised once per Gram (q/k/v share one).

    ``U``: n x n upper triangular with ``H^-1 = U^T U`` (after the dead-input fix and damping), in
    the dtype the sweep runs in. ``sensitivity``: ``t_j = 1 / U_jj^2`` (float64, from the float64
    factor). ``dead``: inputs whose diagonal was 0.
    """

    U: Tensor
    sensitivity: Tensor
    dead: int

    @property
    def n(self) -> int:
        return int(self.U.shape[0])


def safety_factor(H: Tensor, *, dtype: torch.dtype = torch.float32, damping: float = DAMPING) -> SafetyFactor:
    """The factor of step 2 for a Gram ``H`` (any positive scale; see the module docstring).

    The published route (``cholesky(H)``, ``cholesky_inverse``, ``cholesky(H^-1, upper=True)``),
    in float64 whatever ``dtype`` the sweep takes ``U`` in: about 4 n^3 / 3 flops, and two n x n
    float64 matrices at a time (each step's input is freed). ValueError for a non-square,
    non-finite or indefinite ``H``.
    """
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"Safe Delta needs a square Gram, got shape {list(H.shape)}")
    work = H.detach().to(device="cpu", dtype=torch.float64, copy=True)
    if not bool(torch.isfinite(work).all()):
        raise ValueError("the Gram contains NaN or Inf")
    diagonal = work.diagonal()
    dead = diagonal == 0
    diagonal[dead] = 1.0
    diagonal.add_(damping * float(diagonal.mean()))
    chol, info = torch.linalg.cholesky_ex(work)
    del work, diagonal
    if int(info) != 0:
        raise ValueError("the damped Gram is not positive definite (is it positive semi-definite?)")
    inverse = torch.cholesky_inverse(chol)
    del chol
    upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
    del inverse
    if int(info) != 0:
        raise ValueError("the inverse of the damped Gram is not positive definite in float64 (is H finite and PSD?)")
    sensitivity = upper.diagonal().square().reciprocal()
    U = upper.to(dtype)
    return SafetyFactor(U=U, sensitivity=sensitivity, dead=int(dead.sum()))


@dataclass(frozen=True)
class SafeDeltaStats:
    """What one module's sweep did: entries kept (fine-tuned values) out of all, per block too."""

    kept: int
    entries: int
    kept_per_block: tuple[int, ...] = field(default=())

    @property
    def kept_share(self) -> float:
        return self.kept / self.entries if self.entries else 0.0


def block_budget(sensitivity: Tensor, s: float, rows: int) -> float:
    """``tau = mean(t) * (s / 2) * (rows / 4096)`` for one block's sensitivities (step 3)."""
    return float(sensitivity.mean()) * (s / BUDGET_DIVISOR) * (rows / ROW_UNIT)


def kept_entries(residual: Tensor, sensitivity: Tensor, s: float) -> Tensor:
    """The entries of one block kept at their fine-tuned value (step 3): a bool m x c mask.

    ``residual``: ``R = dW - X`` on the block's columns at the block's start; ``sensitivity``:
    ``t`` of those columns. The order is ``t`` ascending, ties by (row, column); the longest
    prefix of it within the budget, never reaching into the last ``int(0.15 m c)`` entries, is
    kept. Whole columns are kept or not except in the one tie group where the prefix ends, so
    the work is per column, plus the entries of that group.
    """
    m, c = residual.shape
    t = sensitivity.to(torch.float64)
    budget = block_budget(t, s, m)
    eligible = m * c - int(EXCLUDED_SHARE * (m * c))
    order = torch.argsort(t, stable=True)
    _, group_sizes = torch.unique_consecutive(t[order], return_counts=True)
    column_loss = _column_square_sums(residual) * t
    group_ends = torch.cumsum(group_sizes, 0)
    group_loss = torch.cumsum(column_loss[order], 0)[group_ends - 1]
    # groups wholly within the budget; the next one holds the end of the prefix
    whole = int(torch.searchsorted(group_loss, torch.tensor([budget], dtype=torch.float64), right=True))
    prefix = m * int(group_ends[whole - 1]) if whole else 0
    if whole < len(group_sizes):
        start = int(group_ends[whole - 1]) if whole else 0
        columns = order[start : start + int(group_sizes[whole])]
        spent = float(group_loss[whole - 1]) if whole else 0.0
        prefix += _entries_within(residual[:, columns], t[columns], budget - spent)
    return _prefix_mask(order, group_sizes, min(prefix, eligible), m)


def _column_square_sums(residual: Tensor) -> Tensor:
    """``sum_i R_ij^2`` per column in float64, ``_LOSS_ROWS`` rows at a time."""
    total = torch.zeros(residual.shape[1], dtype=torch.float64)
    for start in range(0, residual.shape[0], _LOSS_ROWS):
        total += residual[start : start + _LOSS_ROWS].to(torch.float64).square().sum(0)
    return total


def _entries_within(residual: Tensor, t: Tensor, budget: float) -> int:
    """How many entries of one tie group, in (row, column) order, fit in what is left of the budget."""
    if budget < 0.0:
        return 0
    losses = (residual.to(torch.float64).square() * t).reshape(-1)  # row-major: (row, column) order
    return int((torch.cumsum(losses, 0) <= budget).sum())


def _prefix_mask(order: Tensor, group_sizes: Tensor, prefix: int, m: int) -> Tensor:
    """The bool m x c mask of the first ``prefix`` entries of the order of :func:`kept_entries`."""
    mask = torch.zeros(m, len(order), dtype=torch.bool)
    start = 0
    for size in group_sizes.tolist():
        if prefix <= 0:
            break
        columns = order[start : start + size]
        full_rows, rest = divmod(min(prefix, m * size), size)
        mask[:full_rows, columns] = True
        if rest:
            mask[full_rows, columns[:rest]] = True
        prefix -= m * size
        start += size
    return mask


def safe_delta_(dW: Tensor, factor: SafetyFactor, s: float, *, block_columns: int = BLOCK_COLUMNS) -> SafeDeltaStats:
    """Replace ``dW`` (m x n, float32 or float64) by Safe Delta's corrected update ``X``, in place.

    ``factor``: :func:`safety_factor` of the module's Gram, in dW's dtype. ``block_columns``: the
    published 2048; other values only for tests (the budget keeps its fixed ``s / 2``).
    """
    m, n = dW.shape
    if factor.n != n:
        raise ValueError(f"the Gram is for {factor.n} inputs but the update has {n} columns")
    if not s >= 0.0:
        raise ValueError(f"s must be >= 0, got {s}")
    U = factor.U.to(dW.dtype)
    d = U.diagonal()
    first = min(block_columns, n)
    pending: Tensor | None = None  # compensation owed to columns first..n-1
    kept: list[int] = []
    for i1 in range(0, n, block_columns):
        i2 = min(i1 + block_columns, n)
        target = dW[:, i1:i2]
        X = torch.zeros(m, i2, dtype=dW.dtype) if pending is None else pending[:, i1 - first : i2 - first]
        mask = kept_entries(target - X, factor.sensitivity[i1:i2], s)
        kept.append(int(mask.sum()))
        _sweep_block_(target, X, mask, U[i1:i2, i1:i2], d[i1:i2])
        if i2 < n:  # X now holds the block's errors E
            if pending is None:
                pending = torch.mm(X, U[i1:i2, i2:]).neg_()
            else:
                pending[:, i2 - first :].addmm_(X, U[i1:i2, i2:], alpha=-1.0)
        del X
    return SafeDeltaStats(kept=sum(kept), entries=m * n, kept_per_block=tuple(kept))


def _sweep_block_(target: Tensor, X: Tensor, mask: Tensor, U: Tensor, d: Tensor) -> None:
    """Step 4 on one block: ``target`` (dW's columns) receives the result; ``X`` (the block's
    current values) ends holding the errors ``E`` the later blocks are compensated with."""
    count = target.shape[1]
    for c1 in range(0, count, _CHUNK_COLUMNS):
        c2 = min(c1 + _CHUNK_COLUMNS, count)
        # Products of 4 columns are too small for several threads: on a busy machine the thread
        # hand-offs cost far more than the arithmetic.
        with small_math():
            for g1 in range(c1, c2, SUB_BLOCK_COLUMNS):
                g2 = min(g1 + SUB_BLOCK_COLUMNS, c2)
                current = X[:, g1:g2]
                value = torch.where(mask[:, g1:g2], target[:, g1:g2], current)
                error = (current - value) / d[g1:g2]
                target[:, g1:g2] = value
                current.copy_(error)
                if g2 < c2:
                    X[:, g2:c2].addmm_(error, U[g1:g2, g2:c2], alpha=-1.0)
        if c2 < count:
            X[:, c2:].addmm_(X[:, c1:c2], U[c1:c2, c2:], alpha=-1.0)


def safe_delta_update(
    dW: Tensor, H: Tensor, s: float, *, block_columns: int = BLOCK_COLUMNS
) -> tuple[Tensor, SafeDeltaStats]:
    """Safe Delta on a copy of ``dW`` with a one-off factor of ``H`` (tests, benchmarks)."""
    out = dW.clone()
    stats = safe_delta_(out, safety_factor(H, dtype=dW.dtype), s, block_columns=block_columns)
    return out, stats


# -- the method's options and sweep ---------------------------------------------------------------
@dataclass(frozen=True)
class SafeDeltaConfig(MethodConfig):
    s: float = field(
        default=PUBLISHED_S,
        metadata={
            "help": "s >= 0: the safety-loss budget; each 2048-column block keeps fine-tuned entries up to "
            "(s/2)(rows/4096) x its mean sensitivity (larger keeps more; 0 reverts to the aligned weights)"
        },
    )

    def __post_init__(self) -> None:
        require_number("s", self.s, low=0.0)
        self._store_as("s", float)


# Weakest first: a larger s keeps more of the update. No s writes the update unchanged: even an
# unbounded budget reverts the 15 % most sensitive entries of every block, so identity is None.
SAFEDELTA_TUNING = Tuning(knob="s", grid=(1.0, 0.3, 0.1, 0.03, 0.01, 0.0), weaker_when_smaller=False, identity=None)


# -- the method ------------------------------------------------------------------------------------
@dataclass
class _Factors:
    """The factor of the last Gram group seen (q/k/v share one); held while the group's statistics live."""

    key: weakref.ref[ModuleCalibration] | None = None
    factor: SafetyFactor | None = None

    def get(self, calibration: ModuleCalibration, dtype: torch.dtype) -> SafetyFactor:
        if self.key is not None and self.key() is calibration and self.factor is not None:
            if self.factor.U.dtype == dtype:
                return self.factor
        self.factor = None  # drop the old factor before the new one is built
        self.factor = safety_factor(moment_matrix(calibration.harmful), dtype=dtype)
        self.key = weakref.ref(calibration)
        return self.factor


@dataclass(frozen=True)
class DenseRun:
    config: SafeDeltaConfig
    factors: _Factors


class SafeDelta(CorrectionMethod[SafeDeltaConfig]):
    """Safe Delta (dense form only: an adapter is corrected as ``s B A``, docs/design.md §9)."""

    name = "safedelta"
    pretty_name = "Safe Delta"
    paper_url = "https://arxiv.org/abs/2505.12038"
    config_cls = SafeDeltaConfig
    inputs = frozenset({CALIBRATION})
    tuning = SAFEDELTA_TUNING
    report_columns = (("kept_share", "kept", ".3f"),)

    def dense_run(self, config: SafeDeltaConfig, measures: Any = None) -> DenseRun:
        return DenseRun(config=config, factors=_Factors())

    def correct_dense(self, module: DenseModuleInput, config: SafeDeltaConfig | DenseRun) -> DenseModuleResult:
        run = config if isinstance(config, DenseRun) else self.dense_run(config)
        calibration = module.calibration
        if calibration is None:
            raise InputError(f"{module.name}: Safe Delta needs the module's activation statistics (S_h)")
        if calibration.n != module.shape[1]:
            raise InputError(
                f"{module.name}: activation statistics (group {calibration.group}) are for inputs of size "
                f"{calibration.n} but the update has {module.shape[1]} columns"
            )
        geometry = DenseGeometry(module)
        report: dict[str, Any] = method_report(geometry)  # before dW is overwritten
        dW = module.update
        if geometry.dw_is_zero:
            stats, update = SafeDeltaStats(kept=0, entries=dW.numel()), None
        else:
            stats = safe_delta_(dW, run.factors.get(calibration, dW.dtype), run.config.s)
            update = dW
        report.update(s=run.config.s, kept_share=stats.kept_share, calibration_group=calibration.group)
        return DenseModuleResult(name=module.name, update=update, report=finish_dense_report(report, update))


register(SafeDelta())
