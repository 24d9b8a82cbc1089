"""What several methods share, in one place: the per-module report they start from and finish,
and the restoration ``beta D_k`` written as LoRA factors (docs/design.md §5b, §10).

A method's report starts from the update's geometry (:func:`method_report`: every key of
``REPORT_KEYS``, the audit's numbers filled in, the method's own keys None) and ends with what
it wrote (:func:`finish_report`: norm and rank after). RESTA, CSULoRA's and the calibrated
method's ``--restore`` append the same factors (:func:`append_restoration`), so they write the
same bytes for the same beta.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from csulora.errors import InputError
from csulora.linalg.geometry import ModuleGeometry, UpdateGeometry, geometry_numbers
from csulora.linalg.lowrank import dense_frobenius_norm, frobenius_norm_sq
from csulora.types import REPORT_KEYS, LoraUpdate, ModuleInput, ModuleSubspace, as_float64

# The audit's numbers a correction report carries (its "before" side).
_FROM_GEOMETRY = ("rho_F", "rho_P", "rho_O", "cos_dW_D", "dw_over_d", "subspace_rank", "subspace_energy", "d_source")


def method_report(geometry: UpdateGeometry) -> dict[str, Any]:
    """A correction report (every key of ``REPORT_KEYS``) pre-filled with the update's geometry.

    Methods fill in their own keys (lam/c, projected, norms after, ranks, ...) on top; Safe LoRA's
    cosine is Safe LoRA's own (None in the other methods' reports, as for dense updates it costs
    ``2 m n min(m, n)`` flops).
    """
    numbers = geometry_numbers(geometry)
    report: dict[str, Any] = dict.fromkeys(REPORT_KEYS)
    report.update({key: numbers[key] for key in _FROM_GEOMETRY})
    report["dw_norm_before"] = numbers["dw_norm"]
    if isinstance(geometry, ModuleGeometry):
        report["rank_in"] = geometry.module.update.rank
    return report


def finish_report(report: dict[str, Any], update: LoraUpdate) -> dict[str, Any]:
    """Fill the keys every method reports about what it wrote: norm and rank after."""
    report.update(dw_norm_after=update_norm(update.B, update.A, update.scale), rank_out=update.rank)
    return report


def finish_dense_report(report: dict[str, Any], update: Tensor | None) -> dict[str, Any]:
    """The norm after of a dense result (``update is None``: unchanged, the norm before)."""
    after = report["dw_norm_before"] if update is None else dense_frobenius_norm(update)
    report.update(dw_norm_after=after)
    return report


def update_norm(B: Tensor, A: Tensor, scale: float) -> float:
    """``||s B A||_F`` in factored form."""
    return abs(scale) * float(frobenius_norm_sq(as_float64(B), as_float64(A))) ** 0.5


# -- adding the alignment back: beta D_k as LoRA factors (docs/design.md §5b) ------------------
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


def restoration_energy_fraction(geometry: UpdateGeometry, beta: float) -> float | None:
    """``||beta D_k||^2 / ||dW||^2``: energy added, relative to the input update's.

    None when dW == 0 (no reference energy); 0.0 when nothing is added.
    """
    subspace = geometry.subspace
    added = 0.0 if subspace is None else beta**2 * float(as_float64(subspace.S).square().sum())
    if geometry.dw_is_zero:
        return None if added > 0.0 else 0.0
    return added / geometry.dw_norm_sq
