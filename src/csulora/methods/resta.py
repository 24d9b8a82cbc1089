"""RESTA, rank-k: add the alignment back, ``X = dW + beta * D_k`` (docs/design.md §5b).

Bhardwaj et al. (2024) add the full displacement D to the fine-tuned weights; full-rank
D is no LoRA. Its top-k part ``D_k = U_k diag(S_k) V_k^T`` from the safety subspace is: an
exact LoRA of rank r + k, by appending ``U_k diag(sqrt(S_k)) * sqrt(beta/|s|)`` (times the
sign of s) to B and ``diag(sqrt(S_k)) V_k^T * sqrt(beta/|s|)`` to A, so that with the
adapter's own scaling s the product is ``beta * D_k``. The CSULoRA method reuses
:func:`~csulora.methods.common.append_restoration` for its ``restore`` knob, so both write the same bytes.

Dense form (a full fine-tune, docs/design.md §5d): the output is a dense weight anyway, so
RESTA is the published one, ``W_ft + beta D`` with the exact D when it is streamed
(``--base``), and ``W_ft + beta D_k`` from a subspace cache alone; the report's
``restore_source`` says which.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


from csulora.linalg.geometry import DenseGeometry, ModuleGeometry
from csulora.errors import InputError
from csulora.linalg.lowrank import add_low_rank_, small_math
from csulora.methods.registry import register
from csulora.methods.base import (
    DISPLACEMENT,
    SUBSPACE,
    CorrectionMethod,
    MethodConfig,
    Tuning,
    require_number,
)
from csulora.methods.common import (
    append_restoration,
    restoration_energy_fraction,
    finish_dense_report,
    finish_report,
    method_report,
)
from csulora.types import (
    DenseModuleInput,
    DenseModuleResult,
    LoraUpdate,
    ModuleInput,
    ModuleResult,
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


class Resta(CorrectionMethod[RestaConfig]):
    name = "resta"
    report_columns = (("restore_energy_added", "restore", ".3g"),)
    pretty_name = "RESTA (rank-k)"
    baseline = True  # docs/design.md §5b
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
        report: dict[str, Any] = method_report(geometry)
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


register(Resta())
