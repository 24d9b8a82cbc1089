"""Safe LoRA (Hsu et al., NeurIPS 2024) with the published semantics (docs/design.md §4).

Per module, with ``C = D D^T / ||D||`` ("approx", the published projection, needs the
exact D) or ``C = U U^T`` ("exact", the top-k safety subspace):
- ``cos`` = cosine of vec(C B A) and vec(B A), rounded to 5 decimals as the published code
  does (``numpy.round``), from r x r Gram matrices;
- the module is projected, ``B <- C B`` (only lora_B changes), when ``cos <= t``;
  ``C B = D (D^T B) / ||D||`` is taken without any m x m matrix;
- threshold mode: t = ``threshold``; number mode: t = the ``num_layers``-th smallest
  cosine over all modules (all of them when there are fewer), so ties project more;
- ``Pdst`` = mean over modules of ``1 / (1 + ||B_new - C B||)``.

Report: every module's report has ``safelora_cos``, ``projected`` and ``safelora_dist``
(its Pdst term); :meth:`SafeLora.summary` returns the global ``pdst``, the threshold
``safelora_threshold`` actually used, and counts.

Documented deviations, where the published code divides by zero or relies on torch's
eps-guarded cosine: a module with D == 0 (or an empty subspace under "exact") or with
dW == 0 is left unchanged, its cosine is None, it takes no part in the number-mode ranking
and no part in Pdst. A zero ``C B A`` against a non-zero ``B A`` has cosine 0.0 (as torch).

How the API says D is unavailable: ``ModuleInput.displacement is None``. The "approx"
projection then raises OptionError; :meth:`check_sources` raises the same before any
tensor is read.

Dense form (a full fine-tune, docs/design.md §5d): ``dW <- C dW`` on the selected modules
(``W_aligned + C dW``), ``W_ft`` on the others, with ``cos = cos(vec(C dW), vec(dW))`` and
``C dW = D (D^T dW) / ||D||`` taken by blocks (still no m x m matrix beyond ``min(m, n)^2``).
Number mode is a global decision and a dense update is too large to keep, so the API streams
twice: :meth:`SafeLora.dense_first_pass` measures every module, then the second stream
projects the selected ones (:class:`DensePlan`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import Tensor

from csulora.linalg.geometry import DenseGeometry, ModuleGeometry, UpdateGeometry
from csulora.linalg.lowrank import (
    add_low_rank_,
    dense_matmul,
    frobenius_inner,
    frobenius_norm_sq,
    low_rank_residual_norm_sq,
    outer_gram_blocks,
    project_columns,
)
from csulora.errors import InputError, OptionError
from csulora.linalg.lowrank import small_math
from csulora.methods.registry import register
from csulora.methods.base import (
    Preset,
    DISPLACEMENT,
    SUBSPACE,
    CorrectionMethod,
    MethodConfig,
    Tuning,
    require_choice,
    require_number,
)
from csulora.methods.common import (
    finish_dense_report,
    finish_report,
    method_report,
)
from csulora.types import DenseModuleInput, DenseModuleResult, LoraUpdate, ModuleInput, ModuleResult

SELECT_MODES = ("number", "threshold")
APPROX_NEEDS_D = (
    "Safe LoRA approx needs the exact D: use --projection exact or give --base/--aligned"
)


# -- Safe LoRA's projection and cosine (docs/design.md §4, §5d) ----------------------------------
SAFELORA_PROJECTIONS = ("approx", "exact")
COSINE_DECIMALS = 5  # the published Safe LoRA code rounds every cosine to 5 decimals


def round_cosine(value: float) -> float:
    """Round as the published code does (``numpy.round(x, 5)``: round-half-even of x*1e5)."""
    return float(np.round(value, COSINE_DECIMALS))


def projection_defined(geometry: UpdateGeometry, projection: str) -> bool:
    """Whether C exists: the exact D for "approx" (and D != 0), a non-empty subspace for "exact"."""
    if projection not in SAFELORA_PROJECTIONS:
        raise ValueError(f"unknown Safe LoRA projection {projection!r}")
    if projection == "approx":
        return geometry.D is not None and bool(geometry.d_norm)
    return not geometry.subspace_is_empty


def projected_factor(geometry: ModuleGeometry, projection: str) -> Tensor | None:
    """``C B`` for Safe LoRA's C; None where C is undefined (D == 0, an empty subspace).

    approx: ``C = D D^T / ||D||`` applied as ``D (D^T B) / ||D||`` (no m x m matrix);
    exact: ``C = U U^T`` (the top-k subspace, idempotent).
    """
    if not projection_defined(geometry, projection):
        return None
    if projection == "approx":
        return dense_matmul(geometry.D, geometry.Dt_B) / geometry.d_norm
    return project_columns(geometry.U, geometry.B)


def factored_cosine(geometry: ModuleGeometry, projected_B: Tensor | None) -> float | None:
    """The published cosine of vec(C B A) and vec(B A), rounded to 5 decimals.

    From r x r Gram matrices; the scale s cancels. None where C is undefined or dW == 0 (the
    published code yields NaN / torch's eps-guarded 0 there). A zero ``C B A`` against a
    non-zero ``B A`` gives 0.0, as torch's cosine_similarity does.
    """
    if projected_B is None or geometry.dw_is_zero:
        return None
    B, A = geometry.B, geometry.A
    inner = float(frobenius_inner(projected_B, A, B, A))
    norm_cba = float(frobenius_norm_sq(projected_B, A)) ** 0.5
    norm_ba = float(frobenius_norm_sq(B, A)) ** 0.5
    if norm_cba == 0.0 or norm_ba == 0.0:
        return 0.0
    return round_cosine(inner / (norm_cba * norm_ba))


@dataclass(frozen=True)
class DenseSafeLora:
    """Safe LoRA's measurement of one dense update: cosine (rounded), Pdst term, ``C dW``."""

    cos: float | None
    dist: float | None
    projected: Tensor | None  # C dW, written into dW's own buffer; None unless asked to write


def audit_cosine(geometry: UpdateGeometry, projection: str) -> float | None:
    """The audit's ``safelora_cos`` of an update, LoRA or dense; None without what C needs."""
    if isinstance(geometry, DenseGeometry):
        return measure_dense(geometry, projection).cos
    if not projection_defined(geometry, projection):
        return None
    return factored_cosine(geometry, projected_factor(geometry, projection))  # type: ignore[arg-type]


def measure_dense(geometry: DenseGeometry, projection: str, *, write: bool = False) -> DenseSafeLora:
    """Safe LoRA on a dense update (docs/design.md §5d); ``write``: ``C dW`` into dW's own buffer.

    approx: ``C dW = D (D^T dW) / ||D||`` by blocks (:func:`outer_gram_blocks`), whose inner
    product with dW and norm give ``cos = <DD^T dW, dW> / (||DD^T dW|| ||dW||)`` (``||D||``
    cancels); exact: ``C dW = U G`` with ``cos = ||G|| / ||dW||``. ``dist`` is the Pdst term
    ``1 / (1 + ||dW - C dW||)``. None where C is undefined or dW == 0 (docs/design.md §10).
    """
    if not projection_defined(geometry, projection) or geometry.dw_is_zero:
        return DenseSafeLora(cos=None, dist=None, projected=None)
    dW = geometry.take_buffer() if write else geometry.intact()
    if projection == "approx":
        return _dense_approx(geometry, dW, write)
    return _dense_exact(geometry, dW, write)


def _dense_approx(geometry: DenseGeometry, dW: Tensor, write: bool) -> DenseSafeLora:
    d_norm = float(geometry.d_norm)  # type: ignore[arg-type]
    inner = norm_sq = gap_sq = 0.0
    for index, block in outer_gram_blocks(geometry.D, dW):  # blocks of D D^T dW, each read before written
        part = dW[index].to(block.dtype)
        inner += float((block * part).sum(dtype=torch.float64))
        norm_sq += float(block.square().sum(dtype=torch.float64))
        gap_sq += float((part - block / d_norm).square().sum(dtype=torch.float64))
        if write:
            dW[index] = block / d_norm
    cos = 0.0 if norm_sq == 0.0 else round_cosine(inner / (norm_sq**0.5 * geometry.dw_norm))
    return DenseSafeLora(cos=cos, dist=1.0 / (1.0 + gap_sq**0.5), projected=dW if write else None)


def _dense_exact(geometry: DenseGeometry, dW: Tensor, write: bool) -> DenseSafeLora:
    G = geometry.thin.G
    g_norm = float(G.square().sum()) ** 0.5
    gap_sq = low_rank_residual_norm_sq(dW, geometry.U, G)
    cos = 0.0 if g_norm == 0.0 else round_cosine(g_norm / geometry.dw_norm)
    projected = None
    if write:
        dW.zero_()
        projected = add_low_rank_(dW, geometry.U, G)  # U (U^T dW), written over dW
    return DenseSafeLora(cos=cos, dist=1.0 / (1.0 + gap_sq**0.5), projected=projected)


@dataclass(frozen=True)
class SafeLoraConfig(MethodConfig):
    select: str = field(
        default="number",
        metadata={
            "help": "number: project the --num-layers lowest-cosine modules (ties project "
            "more); threshold: project every module with cosine <= --threshold",
            "choices": list(SELECT_MODES),
        },
    )
    num_layers: int = field(
        default=10, metadata={"help": "modules to project in number mode (>= 1)"}
    )
    threshold: float = field(
        default=0.5, metadata={"help": "cosine threshold of threshold mode, in [-1, 1]"}
    )
    projection: str = field(
        default="approx",
        metadata={
            "help": "approx: the published C = D D^T/||D|| (needs --base/--aligned); "
            "exact: C = U U^T of the safety subspace",
            "choices": list(SAFELORA_PROJECTIONS),
        },
    )

    def __post_init__(self) -> None:
        require_choice("select", self.select, SELECT_MODES)
        require_number("num_layers", self.num_layers, low=1, integer=True)
        require_number("threshold", self.threshold, low=-1.0, high=1.0)
        require_choice("projection", self.projection, SAFELORA_PROJECTIONS)
        self._store_as("num_layers", int)
        self._store_as("threshold", float)


@dataclass
class _Measured:
    """What phase 1 keeps per module: the factors, ``C B`` (m x r) and the report.

    ``dist_unprojected`` is the module's Pdst term should it stay unprojected,
    ``1 / (1 + ||B - C B||)`` (a projected module's is 1): with it, number mode can drop
    ``C B`` as soon as the module can no longer be among the lowest cosines.
    """

    name: str
    update: LoraUpdate
    projected_B: Tensor | None
    cos: float | None
    report: dict[str, Any]
    dist_unprojected: float | None


class SafeLora(CorrectionMethod[SafeLoraConfig]):
    name = "safelora"
    report_columns = (("safelora_cos", "cos_SL", ".4f"), ("projected", "proj", ""))
    presets = (
        Preset("safelora-default", {"select": "number", "num_layers": 10}, swept=False,
               help="the published default: the 10 lowest-cosine modules projected"),
    )  # fmt: skip
    pretty_name = "Safe LoRA"
    paper_url = "https://arxiv.org/abs/2405.16833"
    config_cls = SafeLoraConfig
    inputs = frozenset({DISPLACEMENT})  # the published projection (approx) needs the exact D
    # The threshold acts in threshold mode only; a lower threshold projects fewer modules.
    # No threshold is the identity for sure (a cosine of exactly -1 would still project).
    tuning = Tuning(
        knob="threshold",
        grid=(0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5),
        fixed=MappingProxyType({"select": "threshold"}),
    )

    def needs(self, config: SafeLoraConfig) -> frozenset[str]:
        return frozenset({DISPLACEMENT if config.projection == "approx" else SUBSPACE})

    def check_sources(
        self, config: SafeLoraConfig, *, has_displacement: bool, has_subspace: bool, has_calibration: bool = False,
        has_update_statistics: bool = False,
    ) -> None:
        if self.needs_displacement(config) and not has_displacement:
            raise OptionError(APPROX_NEEDS_D)
        super().check_sources(
            config, has_displacement=has_displacement, has_subspace=has_subspace, has_calibration=has_calibration,
            has_update_statistics=has_update_statistics,
        )

    def tune_options(self, *, has_displacement: bool) -> dict[str, Any]:
        # The published projection needs the full D; from a subspace cache only the exact one works.
        return {"projection": "approx" if has_displacement else "exact"}

    # --- one module (threshold semantics) -----------------------------------------------
    def correct_module(self, module: ModuleInput, config: SafeLoraConfig) -> ModuleResult:
        """Threshold-mode decision for one module (number mode needs :meth:`correct`)."""
        return self._finish(self._measure(module, config), float(config.threshold))

    # --- the whole stream --------------------------------------------------------------
    def correct(
        self, modules: Iterable[ModuleInput], config: SafeLoraConfig
    ) -> Iterator[ModuleResult]:
        if config.select == "threshold":
            for module in modules:
                yield self.correct_module(module, config)
            return
        # Number mode: one pass over the stream (D is read once); the threshold is known when
        # every cosine is. It can only fall as modules arrive (the N-th smallest of more
        # cosines), so a module above the running one is never projected and its C B
        # (m x r) is dropped at once: memory stays flat in depth (docs/benchmarks.md).
        measured: list[_Measured] = []
        for module in modules:
            latest = self._measure(module, config)
            latest.update = _held(latest.update)  # until the threshold is known
            measured.append(latest)
            running = number_mode_threshold([m.cos for m in measured], config.num_layers)
            for item in measured:
                if item.projected_B is not None and not _selected(item.cos, running):
                    item.projected_B = None
        threshold = number_mode_threshold([m.cos for m in measured], config.num_layers)
        for item in measured:
            item.update = _released(item.update)
            yield self._finish(item, threshold)

    def summary(self, results: Sequence[ModuleResult], config: SafeLoraConfig) -> dict[str, Any]:
        """Global fields: ``pdst``, ``safelora_threshold`` (t used), counts."""
        cosines = [r.report.get("safelora_cos") for r in results]
        if config.select == "threshold":
            threshold: float | None = float(config.threshold)
        else:
            threshold = number_mode_threshold(cosines, config.num_layers)
        dists = [r.report["safelora_dist"] for r in results if r.report.get("safelora_dist") is not None]
        return {
            "pdst": sum(dists) / len(dists) if dists else None,
            "safelora_threshold": threshold,
            "num_projected": sum(1 for r in results if r.report.get("projected")),
            "num_modules": len(results),
            "num_undefined": sum(1 for c in cosines if c is None),
        }

    # --- dense form: full fine-tunes (docs/design.md §5d) ---------------------------------
    def needs_dense_first_pass(self, config: SafeLoraConfig) -> bool:
        return config.select == "number"

    def dense_first_pass(self, module: DenseModuleInput, config: SafeLoraConfig) -> DenseSafeLora:
        """Number mode, first stream: the module's cosine and Pdst term (changes nothing)."""
        _check_dense_module(module, config)
        return measure_dense(DenseGeometry(module), config.projection)

    def dense_run(
        self, config: SafeLoraConfig, measures: Mapping[str, DenseSafeLora] | None = None
    ) -> SafeLoraConfig | DensePlan:
        if measures is None:  # threshold mode decides per module
            return config
        threshold = number_mode_threshold([m.cos for m in measures.values()], config.num_layers)
        return DensePlan(config=config, threshold=threshold, measured=dict(measures))

    def correct_dense(
        self, module: DenseModuleInput, config: SafeLoraConfig | DensePlan
    ) -> DenseModuleResult:
        """Project the module (``dW <- C dW``, in dW's own buffer) when its cosine is <= t."""
        plan = config if isinstance(config, DensePlan) else None
        options = plan.config if plan is not None else config
        if plan is None and options.select != "threshold":
            raise ValueError("Safe LoRA number mode on a full fine-tune needs the first stream (dense_first_pass)")
        _check_dense_module(module, options)
        threshold = plan.threshold if plan is not None else float(options.threshold)
        geometry = DenseGeometry(module, reuse_update=True)
        report: dict[str, Any] = method_report(geometry)
        known = plan.measured.get(module.name) if plan is not None else None
        if known is not None and not _selected(known.cos, threshold):
            measured = known  # not selected: the first stream's numbers stand, dW is not touched again
        else:
            measured = measure_dense(geometry, options.projection, write=True)
        projected = _selected(measured.cos, threshold)
        update = measured.projected if projected else None
        report.update(
            safelora_cos=measured.cos,
            projected=projected,
            safelora_dist=1.0 if projected else measured.dist,
        )
        return DenseModuleResult(name=module.name, update=update, report=finish_dense_report(report, update))

    # --- helpers -------------------------------------------------------------------------
    @small_math()  # LoRA-sized products on one thread; the two with D use all (csulora.linalg.lowrank)
    def _measure(self, module: ModuleInput, config: SafeLoraConfig) -> _Measured:
        if config.projection == "approx" and module.displacement is None:
            raise OptionError(APPROX_NEEDS_D)
        if config.projection == "exact" and module.subspace is None:
            raise InputError(f"{module.name}: Safe LoRA exact needs the module's safety subspace")
        geometry = ModuleGeometry(module)
        report = method_report(geometry)
        projected_B = projected_factor(geometry, config.projection)
        cos = report["safelora_cos"] = factored_cosine(geometry, projected_B)
        dist = None
        if cos is not None and projected_B is not None:
            dist = 1.0 / (1.0 + float(torch.linalg.vector_norm(geometry.B - projected_B)))
        return _Measured(
            name=module.name,
            update=module.update,
            projected_B=projected_B,
            cos=cos,
            report=report,
            dist_unprojected=dist,
        )

    @small_math()
    def _finish(self, item: _Measured, threshold: float | None) -> ModuleResult:
        projected = _selected(item.cos, threshold)
        update = item.update
        dist = item.dist_unprojected
        if projected:
            assert item.projected_B is not None
            update = LoraUpdate(A=update.A, B=item.projected_B, scale=update.scale)
            dist = 1.0  # B' = C B: no gap
        report = dict(item.report)
        report.update(projected=projected, safelora_dist=dist)
        return ModuleResult(name=item.name, update=update, report=finish_report(report, update))


@dataclass(frozen=True)
class DensePlan:
    """Number mode on a full fine-tune, decided after the first stream: the threshold used and
    each module's measured cosine and Pdst term (so unselected modules are not measured twice)."""

    config: SafeLoraConfig
    threshold: float | None
    measured: Mapping[str, DenseSafeLora]


def number_mode_threshold(cosines: Sequence[float | None], num_layers: int) -> float | None:
    """The ``num_layers``-th smallest defined cosine (the largest if there are fewer)."""
    defined = sorted(c for c in cosines if c is not None)
    if not defined:
        return None
    return defined[min(num_layers, len(defined)) - 1]



def _held(update: LoraUpdate) -> LoraUpdate:
    """The factors number mode holds for every module until the threshold is known.

    float32 wherever that is exact (an fp32, fp16 or bf16 adapter, as read): the float64
    copies were 10 MB per 7B layer at r = 16, most of Safe LoRA's growth in depth
    (docs/benchmarks.md, issue 15). :func:`_released` gives back the very same float64 values
    (and the very same object when nothing was narrowed).
    """
    A, B = _float32_if_exact(update.A), _float32_if_exact(update.B)
    return update if A is update.A and B is update.B else LoraUpdate(A=A, B=B, scale=update.scale)


def _released(update: LoraUpdate) -> LoraUpdate:
    """The held factors as the methods' contract has them: float64 (the same object if they are)."""
    if update.A.dtype == update.B.dtype == torch.float64:
        return update
    return LoraUpdate(A=update.A.to(torch.float64), B=update.B.to(torch.float64), scale=update.scale)


def _float32_if_exact(tensor: Tensor) -> Tensor:
    if tensor.dtype != torch.float64:
        return tensor
    narrowed = tensor.to(torch.float32)
    return narrowed if torch.equal(narrowed.to(torch.float64), tensor) else tensor


def _selected(cos: float | None, threshold: float | None) -> bool:
    """Whether a module is projected: its cosine is defined and at most the threshold."""
    return cos is not None and threshold is not None and cos <= threshold


def _check_dense_module(module: DenseModuleInput, config: SafeLoraConfig) -> None:
    if config.projection == "approx" and module.displacement is None:
        raise OptionError(APPROX_NEEDS_D)
    if config.projection == "exact" and module.subspace is None:
        raise InputError(f"{module.name}: Safe LoRA exact needs the module's safety subspace")


register(SafeLora())
