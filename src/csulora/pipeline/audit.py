"""The audit's rows and summary: each target module's geometry against the safety subspace.

The numbers come from the update's geometry (:mod:`csulora.linalg.geometry`: the same products
every method reads), module by module on the pipeline's stream; a full checkpoint also gets
every untargeted tensor's relative change from the aligned model (docs/design.md §5d).
"""

from __future__ import annotations

from typing import Any

from csulora.linalg.geometry import DenseGeometry, ModuleGeometry, geometry_numbers
from csulora.linalg.lowrank import small_math
from csulora.methods.safelora import audit_cosine
from csulora.pipeline.correction import Correction
from csulora.pipeline.reports import mean_of, untargeted_summary, weighted_rho
from csulora.pipeline.updates import CheckpointUpdate
from csulora.types import DenseModuleInput, ModuleInput


def audit_rows(audit: Correction, *, progress: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """One row per target (report order) and, for a checkpoint, the untargeted tensors' records."""
    projection = safelora_projection(audit)
    rows = []
    for module in audit.inputs(audit.modules, progress=progress, desc="audit"):
        rows.append({"module": module.name, **audit_numbers(module, projection)})
    untargeted = None
    if isinstance(audit.update, CheckpointUpdate):
        untargeted = [audit.update.untargeted(name) for name in audit.update.untargeted_names(audit.modules)]
    return rows, untargeted


@small_math()  # LoRA-sized products on one thread; those with D use all (csulora.linalg.lowrank)
def audit_numbers(module: ModuleInput | DenseModuleInput, projection: str) -> dict[str, Any]:
    """One module's geometry and the published Safe LoRA cosine (the audit's "would Safe LoRA
    project it" column), for a LoRA or a dense update."""
    geometry = DenseGeometry(module) if isinstance(module, DenseModuleInput) else ModuleGeometry(module)
    return {**geometry_numbers(geometry), "safelora_cos": audit_cosine(geometry, projection)}


def safelora_projection(audit: Correction) -> str:
    """Safe LoRA's published ``C = D D^T/||D||`` with the exact D, else ``U U^T`` from the cache."""
    return "approx" if audit.refs.has_displacement else "exact"


def audit_summary(audit: Correction, rows: list[dict[str, Any]], untargeted: list[dict[str, Any]] | None) -> dict[str, Any]:
    summary = {
        "modules": len(rows),
        **weighted_rho(rows, "dw_norm"),
        "mean_cos_dW_D": mean_of(row.get("cos_dW_D") for row in rows),
        "min_safelora_cos": min((r["safelora_cos"] for r in rows if r.get("safelora_cos") is not None), default=None),
        "safelora_projection": safelora_projection(audit),
    }
    if untargeted is not None:
        summary.update(untargeted_summary(untargeted, reset_others=False))
    return summary
