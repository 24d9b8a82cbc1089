"""RESTA, rank-k: add the alignment back, ``X = dW + beta * D_k`` (docs/design.md §5b).

Bhardwaj et al. (2024) add the full displacement D to the fine-tuned weights; full-rank
D is no LoRA. Its top-k part ``D_k = U_k diag(S_k) V_k^T`` from the safety subspace is: an
exact LoRA of rank r + k, by appending ``U_k diag(sqrt(S_k)) * sqrt(beta/|s|)`` (times the
sign of s) to B and ``diag(sqrt(S_k)) V_k^T * sqrt(beta/|s|)`` to A, so that with the
adapter's own scaling s the product is ``beta * D_k``. The CSULoRA method reuses
:func:`append_restoration` for its ``restore`` knob, so both write the same bytes.

Dense form (a full fine-tune, docs/design.md §5d): the output is a dense weight anyway, so
RESTA is the published one, ``W_ft + beta D`` with the exact D when it is streamed
(``--base``), and ``W_ft + beta D_k`` from a subspace cache alone; the report's
``restore_source`` says which.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from csulora.linalg.geometry import DenseGeometry, ModuleGeometry
from csulora.errors import InputError
from csulora.linalg.lowrank import add_low_rank_, small_math
from csulora.methods.base import (
    DISPLACEMENT,
    SUBSPACE,
    CorrectionMethod,
    MethodConfig,
    Tuning,
    dense_method_report,
    finish_dense_report,
    finish_report,
    method_report,
    require_number,
)
from csulora.types import (
    DenseModuleInput,
    DenseModuleResult,
    LoraUpdate,
    ModuleInput,
    ModuleResult,
    ModuleSubspace,
    as_float64,
)


@dataclass(frozen=True)
class RestaConfig(MethodConfig):
    restore: float = field(
        default=1.0,
        metadata={"help": "beta >= 0: strength of the alignment displacement D_k added back"},
    )

    def __post_init__(self) -> None:
        require_number("restore", self.restore, low=0.0)
        self._store_as("restore", float)


def restoration_factors(
    subspace: ModuleSubspace, beta: float, scale: float, *, name: str = "module"
) -> tuple[Tensor, Tensor]:
    """Factors ``(B_k, A_k)``, m x k and k x n, with ``scale * B_k @ A_k == beta * D_k``."""
    if scale == 0.0 or not math.isfinite(scale):
        raise InputError(f"{name}: the adapter's scaling is {scale}; cannot add the restoration")
    U, S, V = as_float64(subspace.U), as_float64(subspace.S), as_float64(subspace.V)
    root = (S * (beta / abs(scale))).sqrt()
    sign = 1.0 if scale > 0 else -1.0
    return (U * root) * sign, (V * root).T


def append_restoration(
    B: Tensor, A: Tensor, module: ModuleInput, beta: float
) -> tuple[Tensor, Tensor]:
    """``[B | B_k]`` and ``[A ; A_k]``: the update plus ``beta * D_k``; unchanged if beta == 0."""
    subspace = module.subspace
    if beta == 0.0 or subspace is None or subspace.rank == 0:
        return B, A
    Bk, Ak = restoration_factors(subspace, beta, module.update.scale, name=module.name)
    return torch.cat([B, Bk], dim=1), torch.cat([A, Ak], dim=0)


def restoration_energy_fraction(geometry: ModuleGeometry | DenseGeometry, beta: float) -> float | None:
    """``||beta D_k||^2 / ||dW||^2``: energy added, relative to the input update's.

    None when dW == 0 (no reference energy); 0.0 when nothing is added.
    """
    subspace = geometry.subspace
    added = 0.0 if subspace is None else beta**2 * float(as_float64(subspace.S).square().sum())
    if geometry.dw_is_zero:
        return None if added > 0.0 else 0.0
    return added / geometry.dw_norm_sq


class Resta(CorrectionMethod[RestaConfig]):
    name = "resta"
    report_columns = (("restore_energy_added", "restore", ".3g"),)
    pretty_name = "RESTA (rank-k)"
    paper_url = "https://arxiv.org/abs/2402.11746"
    config_cls = RestaConfig
    tuning = Tuning(knob="restore", grid=(0.0, 0.5, 1.0, 1.5, 2.0, 3.0), identity=0.0)

    @small_math()  # LoRA-sized products: one thread (csulora.linalg.lowrank)
    def correct_module(self, module: ModuleInput, config: RestaConfig) -> ModuleResult:
        geometry = ModuleGeometry(module)
        report: dict[str, Any] = method_report(geometry)
        if module.subspace is None:
            raise InputError(f"{module.name}: RESTA needs the module's safety subspace")
        B, A = append_restoration(geometry.B, geometry.A, module, float(config.restore))
        if B is geometry.B:  # nothing appended: keep the input bytes
            update = module.update
        else:
            update = LoraUpdate(A=A, B=B, scale=module.update.scale)
        report.update(restore_energy_added=restoration_energy_fraction(geometry, float(config.restore)))
        return ModuleResult(name=module.name, update=update, report=finish_report(report, update))

    # --- dense form: full fine-tunes (docs/design.md §5d) ---------------------------------
    def dense_inputs(self, config: RestaConfig, *, has_displacement: bool) -> frozenset[str]:
        # The exact D when it is streamed; the rank-k D_k of a subspace cache otherwise.
        return frozenset({DISPLACEMENT if has_displacement else SUBSPACE})

    def correct_dense(self, module: DenseModuleInput, config: RestaConfig) -> DenseModuleResult:
        """``X = dW + beta D`` (exact D) or ``dW + beta D_k``, added in dW's own buffer."""
        geometry = DenseGeometry(module)
        report: dict[str, Any] = dense_method_report(geometry)
        beta = float(config.restore)
        if module.displacement is not None:
            source, added = "D", beta**2 * float(geometry.d_norm) ** 2  # type: ignore[arg-type]
        elif module.subspace is not None:
            source, added = "D_k", beta**2 * float(as_float64(module.subspace.S).square().sum())
        else:
            raise InputError(f"{module.name}: RESTA needs D (--base) or the module's safety subspace (--subspace)")
        update = None
        if added > 0.0:  # beta == 0, D == 0 or an empty subspace add nothing: W_ft as is
            if source == "D":
                update = module.update.add_(module.displacement.to(module.update.dtype), alpha=beta)
            else:
                update = add_low_rank_(module.update, geometry.U * (beta * geometry.S), geometry.V.T)
        if geometry.dw_is_zero:
            fraction = None if added > 0.0 else 0.0
        else:
            fraction = added / geometry.dw_norm_sq
        report.update(restore_energy_added=fraction, restore_source=source)
        return DenseModuleResult(name=module.name, update=update, report=finish_dense_report(report, update))
