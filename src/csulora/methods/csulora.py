"""CSULoRA: the closest safe update, with optional restoration (docs/design.md §5, §5b).

``X* = argmin_X ||X - dW||^2 + lam_P ||Pi_P X||^2 + lam_O ||Pi_O X||^2 - 2 beta <X, D_k>``
has the closed form ``X* = F + beta D_k + c_P P + c_O O`` with ``c = 1 / (1 + lam)``: the
fully aligned part F is kept whole, the partially aligned part P and the off-subspace
part O are shrunk by penalties set from their relative energies (the ``schedule``), and
``restore = beta`` adds the rank-k displacement back (0 leaves CSULoRA unchanged,
byte for byte).

Written as a LoRA with the input's scaling s, from ``B = X1 + X2`` (in / out of span U)
and ``A = Y1 + Y2`` (in / out of span V):
- general case, rank <= 2r: ``B' = [X1 | X2]``, ``A' = [Y1 + c_P Y2 ; c_P Y1 + c_O Y2]``
  (rank k + r when k < r: ``X1 = U (U^T B)``, so ``B' = [U | X2]`` and ``U^T B`` moves into A');
- ``c_O == c_P^2``: exactly rank r, ``B' = X1 + c_P X2``, ``A' = Y1 + c_P Y2``;
- empty subspace (D == 0): everything is off-subspace, ``B' = c_O B``;
- ``gamma == 0`` or ``dW == 0``: the input factors unchanged;
then ``beta D_k`` appended (+k columns, see methods/resta.py). ``rank_mode="compress"``
keeps the best rank-r approximation of X* (rank r + k with restoration, docs/design.md §10) via
QR of the factors and an SVD of the small core, and reports the energy it dropped.

Dense form (a full fine-tune, docs/design.md §5d): the same ``X*``, no rank limit, from the
thin products ``G = U^T dW``, ``H = dW V``, ``K = U^T dW V``:
``X* = c_O dW + (c_P - c_O)(U G + H V^T) + (1 - 2 c_P + c_O) U K V^T (+ beta U S V^T)``,
written as ``c_O dW + L R`` with ``L`` m x 2k and ``R`` 2k x n, in dW's own buffer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from csulora.linalg.geometry import DenseGeometry, ModuleGeometry, UpdateGeometry
from csulora.errors import InputError, OptionError
from csulora.linalg.lowrank import add_low_rank_, best_rank_approx, small_math
from csulora.methods.registry import register
from csulora.methods.base import (
    Preset,
    CorrectionMethod,
    MethodConfig,
    Tuning,
    require_choice,
    require_number,
)
from csulora.methods.common import (
    append_restoration,
    finish_dense_report,
    finish_report,
    method_report,
    restoration_energy_fraction,
)
from csulora.types import DenseModuleInput, DenseModuleResult, LoraUpdate, ModuleInput, ModuleResult

SCHEDULES = ("energy", "ratio", "constant")
RANK_MODES = ("exact", "compress")
RATIO_EPS = 1e-3  # docs/design.md §10: lam_c = gamma * rho_c / (rho_F + eps)
# c_O and c_P^2 closer than this are treated as equal (rank-r form); the error this admits
# is at most 1e-12 * ||O||, far below the float32/bf16 precision of written adapters.
_RANK_R_TOLERANCE = 1e-12


@dataclass(frozen=True)
class CsuloraConfig(MethodConfig):
    gamma: float = field(
        default=1.0, metadata={"help": "penalty strength gamma >= 0 (0 keeps the update as is)"}
    )
    schedule: str = field(
        default="energy",
        metadata={
            "help": "penalties from the parts' relative energies: energy (gamma*rho), "
            "ratio (gamma*rho/(rho_F+1e-3)) or constant (gamma)",
            "choices": list(SCHEDULES),
        },
    )
    rank_mode: str = field(
        default="exact",
        metadata={
            "help": "exact: rank <= 2r (+k) factorisation; compress: best rank r (+k) approximation",
            "choices": list(RANK_MODES),
        },
    )
    restore: float = field(
        default=0.0,
        metadata={"help": "beta >= 0: add beta * D_k, the top-k alignment displacement (0: off)"},
    )

    def __post_init__(self) -> None:
        require_number("gamma", self.gamma, low=0.0)
        require_choice("schedule", self.schedule, SCHEDULES)
        require_choice("rank_mode", self.rank_mode, RANK_MODES)
        require_number("restore", self.restore, low=0.0)
        self._store_as("gamma", float)
        self._store_as("restore", float)


def penalties(
    rho: tuple[float, float, float], gamma: float, schedule: str, *, subspace_empty: bool
) -> tuple[float, float]:
    """``(lam_P, lam_O)`` for one module; ``ratio`` falls back to ``energy`` with no subspace."""
    rho_F, rho_P, rho_O = rho
    if schedule == "ratio" and subspace_empty:
        schedule = "energy"
    if schedule == "energy":
        return gamma * rho_P, gamma * rho_O
    if schedule == "ratio":
        return gamma * rho_P / (rho_F + RATIO_EPS), gamma * rho_O / (rho_F + RATIO_EPS)
    if schedule == "constant":
        return gamma, gamma
    raise ValueError(f"unknown schedule {schedule!r}")


def module_shrinkage(geometry: UpdateGeometry, config: CsuloraConfig) -> tuple[float, float, float, float]:
    """``(lam_P, lam_O, c_P, c_O)`` of one module, LoRA or dense: the schedule's penalties from
    its part energies and the shrink factors ``c = 1 / (1 + lam)``."""
    rho = geometry.part_energies.fractions()
    lam_P, lam_O = penalties(rho, float(config.gamma), config.schedule, subspace_empty=geometry.subspace_is_empty)
    return lam_P, lam_O, 1.0 / (1.0 + lam_P), 1.0 / (1.0 + lam_O)


def require_subspace(module: ModuleInput | DenseModuleInput) -> None:
    if module.subspace is None:
        raise InputError(f"{module.name}: CSULoRA needs the module's safety subspace")


def shrunk_factors(geometry: ModuleGeometry, c_P: float, c_O: float) -> tuple[Tensor, Tensor]:
    """Factors of ``F + c_P P + c_O O`` (scale s kept), in the smallest exact rank."""
    B, A = geometry.B, geometry.A
    if geometry.subspace_is_empty:
        return c_O * B, A
    sp = geometry.split
    if abs(c_O - c_P * c_P) <= _RANK_R_TOLERANCE:
        return sp.X1 + c_P * sp.X2, sp.Y1 + c_P * sp.Y2
    top = sp.Y1 + c_P * sp.Y2
    bottom = c_P * sp.Y1 + c_O * sp.Y2
    if geometry.U.shape[1] < B.shape[1]:
        # k < r: X1 = U (U^T B) has rank <= k, so write U itself and fold U^T B into A:
        # rank k + r instead of 2r, still exact.
        return torch.cat([geometry.U, sp.X2], dim=1), torch.cat([(geometry.U.T @ B) @ top, bottom], dim=0)
    return torch.cat([sp.X1, sp.X2], dim=1), torch.cat([top, bottom], dim=0)


def dense_closest_update_factors(
    geometry: DenseGeometry, c_P: float, c_O: float, beta: float
) -> tuple[Tensor, Tensor]:
    """``L`` (m x 2k), ``R`` (2k x n) with ``X* = c_O dW + L R`` (docs/design.md §5d).

    From ``F = U K V^T``, ``P = U G + H V^T - 2F``, ``O = dW - U G - H V^T + F``:
    ``X* = F + c_P P + c_O O + beta D_k = c_O dW + a (U G + H V^T) + b U K V^T + beta U S V^T``
    with ``a = c_P - c_O``, ``b = 1 - 2 c_P + c_O``, so ``L = [U | a H]`` and
    ``R = [a G + (b K + beta S) V^T ; V^T]``. An empty subspace gives empty factors (X* = c_O dW).
    """
    U, S, V, t = geometry.U, geometry.S, geometry.V, geometry.thin
    a, b = c_P - c_O, 1.0 - 2.0 * c_P + c_O
    top = a * t.G + (b * t.K + beta * torch.diag(S)) @ V.T
    return torch.cat([U, a * t.H], dim=1), torch.cat([top, V.T], dim=0)


class Csulora(CorrectionMethod[CsuloraConfig]):
    report_columns = (("c_P", "c_P", ".3f"), ("c_O", "c_O", ".3f"), ("restore_energy_added", "restore", ".3g"))
    presets = (
        Preset("csulora+restore", {"restore": 1.0}, help="gamma swept with the alignment displacement restored (beta 1)"),
    )
    name = "csulora"
    pretty_name = "CSULoRA"
    paper_url = None  # the paper's equations are not public; docs/design.md §5 is our formulation
    config_cls = CsuloraConfig
    tuning = Tuning(knob="gamma", grid=(0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0), identity=0.0)

    def is_identity(self, config: CsuloraConfig) -> bool:
        return config.gamma == 0.0 and config.restore == 0.0

    @small_math()  # LoRA-sized products: one thread (csulora.linalg.lowrank)
    def correct_module(self, module: ModuleInput, config: CsuloraConfig) -> ModuleResult:
        require_subspace(module)
        geometry = ModuleGeometry(module)
        report: dict[str, Any] = method_report(geometry)
        lam_P, lam_O, c_P, c_O = module_shrinkage(geometry, config)

        if geometry.dw_is_zero or (lam_P == 0.0 and lam_O == 0.0):
            B, A = geometry.B, geometry.A  # X* = dW exactly: keep the input bytes
        else:
            B, A = shrunk_factors(geometry, c_P, c_O)
        beta = float(config.restore)
        B, A = append_restoration(B, A, module, beta)

        dropped: float | None = None
        if config.rank_mode == "compress":
            target = module.update.rank + (geometry.subspace.rank if beta > 0.0 else 0)
            dropped = 0.0
            if B.shape[1] > target:
                approx = best_rank_approx(B, A, target)
                B, A, dropped = approx.B, approx.A, approx.fraction_dropped

        if B is geometry.B and A is geometry.A:
            update = module.update
        else:
            update = LoraUpdate(A=A, B=B, scale=module.update.scale)
        report.update(
            lam_P=lam_P,
            lam_O=lam_O,
            c_P=c_P,
            c_O=c_O,
            compress_energy_dropped=dropped,
            restore_energy_added=restoration_energy_fraction(geometry, beta),
        )
        return ModuleResult(name=module.name, update=update, report=finish_report(report, update))

    # --- dense form: full fine-tunes (docs/design.md §5d) ---------------------------------
    def check_dense_options(self, config: CsuloraConfig) -> None:
        super().check_dense_options(config)
        if config.rank_mode != "exact":
            raise OptionError(
                f"--rank-mode {config.rank_mode} does not apply to a full checkpoint: its dense update has no rank to keep"
            )

    def correct_dense(self, module: DenseModuleInput, config: CsuloraConfig) -> DenseModuleResult:
        """``X* = F + c_P P + c_O O (+ beta D_k)`` on a dense dW, in dW's own buffer."""
        require_subspace(module)
        geometry = DenseGeometry(module)
        report: dict[str, Any] = method_report(geometry)
        lam_P, lam_O, c_P, c_O = module_shrinkage(geometry, config)
        beta = float(config.restore)
        shrinks = not geometry.dw_is_zero and (lam_P != 0.0 or lam_O != 0.0)
        restores = beta > 0.0 and not geometry.subspace_is_empty
        update = None  # X* = dW exactly: the fine-tuned weight is written as is
        if shrinks or restores:
            cp, co = (c_P, c_O) if shrinks else (1.0, 1.0)
            L, R = dense_closest_update_factors(geometry, cp, co, beta)
            update = module.update if co == 1.0 else module.update.mul_(co)
            add_low_rank_(update, L, R)
        report.update(
            lam_P=lam_P,
            lam_O=lam_O,
            c_P=c_P,
            c_O=c_O,
            restore_energy_added=restoration_energy_fraction(geometry, beta),
        )
        return DenseModuleResult(name=module.name, update=update, report=finish_dense_report(report, update))


register(Csulora())
