"""Per-module statistics of a LoRA update against the safety subspace (changes nothing).

:class:`ModuleGeometry` computes, once and lazily, the small products every method and the
audit share: the split of ``dW = s B A`` into its fully aligned, partially aligned and
off-subspace parts (docs/design.md §5), their energies, and the products with the exact
displacement D when it is streamed. :func:`audit_module` turns them into the report.

Where D comes from (docs/design.md §10), reported as ``d_source``:
- ``"exact"``: ``module.displacement`` is the full D; cosines use D itself.
- ``"rank-k"``: only the subspace is known; ``cos_dW_D`` uses ``D_k = U diag(S) V^T`` and
  ``dw_over_d`` the exact ``||D||`` stored with the subspace.
- ``None``: neither (e.g. the scale baseline run without a subspace).

Audit keys: rho_F, rho_P, rho_O, dw_norm, safelora_cos, cos_dW_D, dw_over_d,
subspace_rank, subspace_energy, d_source. A value that cannot be computed from what was
given is None (never NaN): rho without a subspace, cosines when a vector is zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

from csulora.linalg.lowrank import (
    dense_frobenius_norm,
    dense_inner,
    dense_matmul,
    dense_t_matmul,
    frobenius_norm_sq,
    low_rank_residual_norm_sq,
    project_columns,
    project_rows,
    small_math,
)
from csulora.types import DenseModuleInput, ModuleInput, as_float64



@dataclass(frozen=True)
class SubspaceSplit:
    """``B = X1 + X2`` (in / out of span U) and ``A = Y1 + Y2`` (in / out of span V)."""

    X1: Tensor  # P_U B, m x r
    X2: Tensor  # Q_U B
    Y1: Tensor  # A P_V, r x n
    Y2: Tensor  # A Q_V


@dataclass(frozen=True)
class PartEnergies:
    """``||F||^2, ||P||^2, ||O||^2`` of dW (scale included); their sum is ``||dW||^2``."""

    F: float
    P: float
    O: float  # noqa: E741 - the letter of docs/design.md §5

    @property
    def total(self) -> float:
        return self.F + self.P + self.O

    def fractions(self) -> tuple[float, float, float]:
        """rho_F, rho_P, rho_O; all 0 for a zero update (docs/design.md §10)."""
        total = self.total
        if total <= 0.0:
            return 0.0, 0.0, 0.0
        return self.F / total, self.P / total, self.O / total


class UpdateGeometry:
    """What :class:`ModuleGeometry` (LoRA factors) and :class:`DenseGeometry` (a dense dW)
    share: the subspace, the displacement D and every quantity that follows from them and
    ``||dW||`` alone. A subclass provides ``dw_norm_sq``, ``part_energies``, ``cos_dw_d`` and
    ``safelora_audit_cos`` in its own form (r x r Grams or thin products)."""

    dw_norm_sq: float

    def __init__(self, module: ModuleInput | DenseModuleInput) -> None:
        self.subspace = module.subspace
        self.D = module.displacement
        if self.subspace is not None:
            self.U = as_float64(self.subspace.U)
            self.S = as_float64(self.subspace.S)
            self.V = as_float64(self.subspace.V)

    # --- the update itself -------------------------------------------------------------
    @property
    def dw_norm(self) -> float:
        return self.dw_norm_sq**0.5

    @property
    def dw_is_zero(self) -> bool:
        return self.dw_norm_sq == 0.0

    # --- the subspace ------------------------------------------------------------------
    @property
    def has_subspace(self) -> bool:
        return self.subspace is not None

    @property
    def subspace_is_empty(self) -> bool:
        return self.subspace is None or self.subspace.rank == 0

    # --- the displacement --------------------------------------------------------------
    @property
    def d_source(self) -> str | None:
        if self.D is not None:
            return "exact"
        if self.subspace is not None:
            return "rank-k"
        return None

    @cached_property
    def d_norm(self) -> float | None:
        """Exact ``||D||_F``: from D itself, else as stored with the subspace."""
        if self.D is not None:
            return dense_frobenius_norm(self.D)
        if self.subspace is not None:
            return float(self.subspace.d_norm)
        return None

    def dw_over_d(self) -> float | None:
        d_norm = self.d_norm
        return self.dw_norm / d_norm if d_norm else None

    def safelora_available(self, projection: str) -> bool:
        return self.D is not None if projection == "approx" else self.subspace is not None

    # --- provided by each form ---------------------------------------------------------
    @property
    def part_energies(self) -> PartEnergies:
        raise NotImplementedError

    def cos_dw_d(self) -> float | None:
        raise NotImplementedError

    def safelora_audit_cos(self, projection: str) -> float | None:
        raise NotImplementedError


class ModuleGeometry(UpdateGeometry):
    """Shared, lazily computed products of one module's factors, subspace and D."""

    def __init__(self, module: ModuleInput) -> None:
        super().__init__(module)
        self.module = module
        self.B = as_float64(module.update.B)
        self.A = as_float64(module.update.A)
        self.scale = float(module.update.scale)
        self._projected_B: dict[str, Tensor | None] = {}

    # --- the update itself -------------------------------------------------------------
    @cached_property
    def dw_norm_sq(self) -> float:
        return self.scale**2 * float(frobenius_norm_sq(self.B, self.A))

    # --- split against the subspace ----------------------------------------------------
    @cached_property
    def split(self) -> SubspaceSplit:
        """The four factor pieces of docs/design.md §5 (an empty subspace puts all of B, A out)."""
        if self.subspace is None:
            raise ValueError(f"{self.module.name}: no subspace to split against")
        X1 = project_columns(self.U, self.B)
        Y1 = project_rows(self.A, self.V)
        return SubspaceSplit(X1=X1, X2=self.B - X1, Y1=Y1, Y2=self.A - Y1)

    @cached_property
    def part_energies(self) -> PartEnergies:
        """Energies of F = X1 Y1, P = X1 Y2 + X2 Y1, O = X2 Y2 (times s^2).

        The two terms of P are Frobenius-orthogonal (``X1^T X2 = 0``), so their energies add.
        Each piece is formed explicitly (m x r, r x n) rather than as ``B^T B - X1^T X1``,
        which would cancel catastrophically when B lies almost inside span U.
        """
        sp = self.split
        G1, G2 = sp.X1.T @ sp.X1, sp.X2.T @ sp.X2  # r x r Gram matrices of the B pieces
        H1, H2 = sp.Y1 @ sp.Y1.T, sp.Y2 @ sp.Y2.T  # ... and of the A pieces
        s2 = self.scale**2

        def energy(G: Tensor, H: Tensor) -> float:  # ||X Y||^2 = sum((X^T X) * (Y Y^T))
            return s2 * max(float((G * H).sum()), 0.0)

        return PartEnergies(F=energy(G1, H1), P=energy(G1, H2) + energy(G2, H1), O=energy(G2, H2))

    # --- the displacement --------------------------------------------------------------
    @cached_property
    def Dt_B(self) -> Tensor:
        """``D^T B`` (n x r), the one pass over D that cosines and Safe LoRA need."""
        if self.D is None:
            raise ValueError(f"{self.module.name}: the exact displacement is not available")
        return dense_t_matmul(self.D, self.B)

    def cos_dw_d(self) -> float | None:
        """Cosine of vec(dW) and vec(D) (of D_k when only the subspace is known)."""
        if self.dw_is_zero:
            return None
        if self.D is not None:
            d_norm = self.d_norm
            # <s B A, D> = s * trace(A^T B^T D) = s * sum(A * (D^T B)^T)
            inner = self.scale * float((self.A * self.Dt_B.T).sum())
        elif self.subspace is not None:
            d_norm = float(self.S.square().sum()) ** 0.5  # ||D_k||
            # <s B A, U S V^T> = s * sum((A V) * (B^T U diag S))
            inner = self.scale * float(((self.A @ self.V) * ((self.B.T @ self.U) * self.S)).sum())
        else:
            return None
        if not d_norm:
            return None
        return inner / (self.dw_norm * d_norm)


@small_math()  # LoRA-sized products on one thread; those with D use all (csulora.linalg.lowrank)
def audit_module(module: ModuleInput) -> dict[str, Any]:
    """The geometry numbers of one module's LoRA update; changes nothing."""
    return geometry_numbers(ModuleGeometry(module))


def geometry_numbers(geometry: UpdateGeometry) -> dict[str, Any]:
    """Every statistic of an update against D and its subspace (LoRA or dense): rho_F/P/O, ``||dW||``,
    cos(dW, D), ``||dW||/||D||``, the subspace's rank and energy, and where D came from. Safe LoRA's
    cosine is Safe LoRA's own (:mod:`csulora.methods.safelora`)."""
    rho: tuple[float | None, ...] = (None, None, None)
    if geometry.has_subspace:
        rho = geometry.part_energies.fractions()
    subspace = geometry.subspace
    return {
        "rho_F": rho[0],
        "rho_P": rho[1],
        "rho_O": rho[2],
        "dw_norm": geometry.dw_norm,
        "cos_dW_D": geometry.cos_dw_d(),
        "dw_over_d": geometry.dw_over_d(),
        "subspace_rank": subspace.rank if subspace is not None else None,
        "subspace_energy": float(subspace.energy) if subspace is not None else None,
        "d_source": geometry.d_source,
    }


# -- dense updates: full fine-tunes (docs/design.md §5d) ------------------------------------------
@dataclass(frozen=True)
class DenseThinProducts:
    """The thin products of a dense dW with the subspace: all CSULoRA needs (docs/design.md §5d)."""

    G: Tensor  # U^T dW, k x n (float64)
    H: Tensor  # dW V, m x k
    K: Tensor  # U^T dW V, k x k


class DenseGeometry(UpdateGeometry):
    """The dense counterpart of :class:`ModuleGeometry`: the same report quantities for a
    dense update ``dW = W_ft - W_aligned`` (a module of a full fine-tune).

    Where ModuleGeometry works on r x r Grams of the factors, this one uses thin products
    (``U^T dW``, ``dW V``: m x k, k x n) and row or column blocks of dW that are reduced as
    they are made, so no second m x n matrix ever exists beside dW and D.

    ``reuse_update=True`` (Safe LoRA's correction) lets a method write its result into the
    update's own buffer (:meth:`take_buffer`): every statistic that reads dW is computed first,
    and asking for one afterwards is an error rather than a silently wrong number.
    """

    def __init__(self, module: DenseModuleInput, *, reuse_update: bool = False) -> None:
        super().__init__(module)
        self.module = module
        self.dW = module.update
        self.reuse_update = reuse_update
        self._overwritten = False

    def intact(self) -> Tensor:
        """dW, as long as no method has taken its buffer over (:meth:`take_buffer`)."""
        return self._intact()

    def _intact(self) -> Tensor:
        if self._overwritten:
            raise RuntimeError(f"{self.module.name}: dW was overwritten by Safe LoRA's projection")
        return self.dW

    # --- the update itself -------------------------------------------------------------
    @cached_property
    def dw_norm_sq(self) -> float:
        return dense_frobenius_norm(self._intact()) ** 2

    # --- split against the subspace ----------------------------------------------------
    @cached_property
    def thin(self) -> DenseThinProducts:
        """``G = U^T dW``, ``H = dW V``, ``K = U^T dW V``: one pass of dW against 2k vectors."""
        if self.subspace is None:
            raise ValueError(f"{self.module.name}: no subspace to split against")
        dW = self._intact()
        H = dense_matmul(dW, self.V)
        G = dense_t_matmul(dW, self.U).T.contiguous()
        return DenseThinProducts(G=G, H=H, K=self.U.T @ H)

    @cached_property
    def part_energies(self) -> PartEnergies:
        """``||F||^2 = ||K||^2``; ``||P||^2 = ||G - K V^T||^2 + ||H - U K||^2`` (the two halves of
        P, each formed from thin matrices); ``||O||^2`` formed explicitly by row blocks as
        ``||dW - [U | H - U K] [G ; V^T]||^2`` rather than as ``||dW||^2 - ||F||^2 - ||P||^2``,
        which cancels when dW lies almost inside the subspace (docs/design.md §5d)."""
        if self.subspace_is_empty:
            return PartEnergies(F=0.0, P=0.0, O=self.dw_norm_sq)
        t = self.thin
        U, V = self.U, self.V
        partial_out = t.H - U @ t.K  # Q_U dW V, m x k
        F = float(t.K.square().sum())
        P = float((t.G - t.K @ V.T).square().sum()) + float(partial_out.square().sum())
        O = low_rank_residual_norm_sq(  # noqa: E741 - the letter of docs/design.md §5
            self._intact(), torch.cat([U, partial_out], dim=1), torch.cat([t.G, V.T], dim=0)
        )
        return PartEnergies(F=F, P=P, O=O)

    # --- the displacement --------------------------------------------------------------
    @cached_property
    def dw_d_inner(self) -> float | None:
        """``<dW, D>`` with the exact D, else ``<dW, D_k> = sum_i S_i (U^T dW V)_ii``."""
        if self.D is not None:
            return dense_inner(self._intact(), self.D)
        if self.subspace is not None:
            return float((self.S * self.thin.K.diagonal()).sum()) if self.subspace.rank else 0.0
        return None

    def cos_dw_d(self) -> float | None:
        """Cosine of vec(dW) and vec(D) (of D_k when only the subspace is known)."""
        if self.dw_is_zero or self.dw_d_inner is None:
            return None
        d_norm = self.d_norm if self.D is not None else float(self.S.square().sum()) ** 0.5
        if not d_norm:
            return None
        return self.dw_d_inner / (self.dw_norm * d_norm)

    # --- handing dW's buffer over --------------------------------------------------------
    def take_buffer(self) -> Tensor:
        """dW's own buffer, for a method to write its result into (Safe LoRA's ``C dW``): every
        statistic that reads dW is computed first, and asking for one afterwards is an error
        rather than a silently wrong number. Needs ``reuse_update``."""
        if not self.reuse_update:
            raise RuntimeError(f"{self.module.name}: dW's buffer is the caller's (reuse_update=False)")
        _ = self.dw_norm_sq, self.dw_d_inner
        if self.subspace is not None:
            _ = self.part_energies
        self._overwritten = True
        return self.dW


def audit_dense_module(module: DenseModuleInput) -> dict[str, Any]:
    """:func:`audit_module` for a dense update (a full fine-tune's module); changes nothing."""
    return geometry_numbers(DenseGeometry(module))
