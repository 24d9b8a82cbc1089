"""The value types every layer shares: one module's update, subspace, statistics and result.

This module is the bottom of the import graph: it imports torch and nothing of csulora, so
``io/``, ``subspace``, ``audit``, ``methods/`` and ``api`` can all use these types without
importing one another (docs/design.md §9).

Conventions (docs/design.md §2, §10): a LoRA update is ``dW = scale * B @ A`` with ``B``
m x r and ``A`` r x n (out x in, as transformers stores weights). Methods compute on
float64 CPU copies of the factors and subspaces (cheap at LoRA sizes, exact reruns); the
exact displacement ``D`` is float32 (m x n can be large).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

# Every correction method's per-module report has exactly these keys (None where one does
# not apply), so the API, the CLI table, the JSON files and the docs agree. A method may add
# its own keys on top (Safe LoRA: ``safelora_dist``; calibrated: the shares of the update's
# action it keeps).
REPORT_KEYS: tuple[str, ...] = (
    "rho_F",
    "rho_P",
    "rho_O",
    "lam_P",
    "lam_O",
    "c_P",
    "c_O",
    "safelora_cos",
    "projected",
    "dw_norm_before",
    "dw_norm_after",
    "rank_in",
    "rank_out",
    "compress_energy_dropped",
    "subspace_rank",
    "subspace_energy",
    "cos_dW_D",
    "dw_over_d",
    "restore_energy_added",
    "d_source",
)


def as_float64(t: Tensor) -> Tensor:
    """Methods compute in float64: cheap at LoRA sizes, and it keeps reruns exact."""
    return t.detach().to(device="cpu", dtype=torch.float64)


@dataclass(frozen=True)
class LoraUpdate:
    """One module's LoRA update ``dW = scale * B @ A`` (B: m x r, A: r x n)."""

    A: Tensor
    B: Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the weight this update applies to."""
        return int(self.B.shape[0]), int(self.A.shape[1])

    def dense(self) -> Tensor:
        """The m x n update. For tests and small reports only: never on a hot path."""
        return self.scale * (self.B @ self.A)


@dataclass(frozen=True)
class ModuleSubspace:
    """Top-k SVD of one module's alignment displacement ``D ~= U diag(S) V^T`` (docs/design.md §3).

    ``k == 0`` (D == 0, untouched by alignment) is a defined, empty subspace.
    """

    U: Tensor  # m x k, orthonormal columns
    S: Tensor  # k, descending
    V: Tensor  # n x k, orthonormal columns
    energy: float  # fraction of ||D||_F^2 captured by the k directions (0 when D == 0)
    d_norm: float  # exact ||D||_F, kept so norm ratios stay exact without D itself

    @property
    def rank(self) -> int:
        return int(self.S.shape[0])

    @property
    def is_empty(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class SecondMoment:
    """A normalised second-moment (Gram) matrix of one module's inputs (docs/design.md §5c).

    ``S = (1/N) sum x x^T`` over the calibration tokens, divided by its mean eigenvalue
    ``tr(S)/n`` so that the calibrated method's knob is scale-free. Stored either

    - dense: ``matrix`` (n x n, symmetric positive semi-definite), or
    - spiked: ``S = U diag(L) U^T + sigma2 (I - U U^T)`` with ``U`` n x k orthonormal and
      ``L`` its k largest eigenvalues; ``sigma2`` is the mean of the remaining eigenvalues
      (dropping it would leave the correction blind exactly where the tail lives).
    """

    n: int
    matrix: Tensor | None = None
    U: Tensor | None = None
    L: Tensor | None = None
    sigma2: float = 0.0
    tokens: int = 0  # calibration tokens the Gram was accumulated over

    def __post_init__(self) -> None:
        dense = self.matrix is not None
        spiked = self.U is not None and self.L is not None
        if dense == spiked:
            raise ValueError("SecondMoment: give either matrix (dense) or U and L (spiked)")

    @property
    def is_dense(self) -> bool:
        return self.matrix is not None

    @property
    def rank(self) -> int:
        """Stored eigenpairs (n for the dense form)."""
        return self.n if self.matrix is not None else int(self.L.shape[0])  # type: ignore[union-attr]


@dataclass(frozen=True)
class ModuleCalibration:
    """The activation statistics the calibrated method needs for one module (docs/design.md §5c).

    ``harmful`` (S_h): inputs on harmful prompts followed by the aligned model's own refusal;
    ``task`` (S_t): inputs on the adapter's task data, prompt + response. Modules that read
    the same tensor (q/k/v; gate/up) share one ``group`` and the same two matrices.

    The fine-tuned model's statistics (Antidote's, ``csulora calibrate ALIGNED --update``, an
    update-statistics file) have one set: ``harmful`` holds the inputs of the **fine-tuned**
    model on harmful prompts followed by harmful answers, and ``task`` is None (no task pass).
    """

    group: str
    harmful: SecondMoment
    task: SecondMoment | None

    @property
    def n(self) -> int:
        return self.harmful.n


@dataclass
class ModuleInput:
    """Everything a method may use for one target module."""

    name: str  # full module name, e.g. "model.layers.3.self_attn.v_proj"
    update: LoraUpdate
    subspace: ModuleSubspace | None = None
    # Exact D = W_aligned - W_base (m x n, float32) when streamed from --base/--aligned; None when
    # only a subspace cache was given (then methods use the rank-k part and say so).
    displacement: Tensor | None = None
    # Activation statistics (the calibrated method); None when no calibration file was given.
    calibration: ModuleCalibration | None = None
    # The fine-tuned model's statistics (Antidote: its ``harmful`` Gram); None unless given.
    update_statistics: ModuleCalibration | None = None


@dataclass
class ModuleResult:
    """Corrected factors (same ``scale`` as the input) and the per-module report."""

    name: str
    update: LoraUpdate
    report: dict[str, Any] = field(default_factory=dict)


# -- full fine-tunes: dense updates (docs/design.md §5d) --------------------------------------
@dataclass
class DenseModuleInput:
    """One target module of a full fine-tune: its dense update and what a method may use.

    ``update`` is ``dW = W_ft - W_aligned`` (m x n), float32 as streamed by the API (float64 in
    tests). It is handed over to the method: a method may overwrite it in place to build its
    result (memory stays at one m x n buffer per role); the caller never reads it afterwards.
    """

    name: str
    update: Tensor
    subspace: ModuleSubspace | None = None
    # Exact D = W_aligned - W_base (float32) when streamed from --base; None otherwise.
    displacement: Tensor | None = None
    calibration: ModuleCalibration | None = None
    update_statistics: ModuleCalibration | None = None  # as in ModuleInput
    # W_aligned (a memory-map view) for a method that needs the fine-tuned weight itself (Antidote).
    aligned_weight: Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.update.shape[0]), int(self.update.shape[1])


@dataclass
class DenseModuleResult:
    """A corrected dense update ``X`` (the written weight is ``W_aligned + X``) and its report.

    ``update is None`` means the method leaves the module as fine-tuned: the writer then
    copies ``W_ft`` byte for byte instead of recomputing ``W_aligned + dW`` in float32.
    """

    name: str
    update: Tensor | None
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def unchanged(self) -> bool:
        return self.update is None
