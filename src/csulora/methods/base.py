"""The one interface every post-hoc correction method implements.

A method sees one module at a time (a :class:`ModuleInput`: the LoRA factors, the
module's safety subspace and, when streamed from base/aligned, the exact displacement D)
and returns corrected factors plus a per-module report. Methods that need a global
decision (Safe LoRA's number mode picks the N lowest cosines over all modules) override
:meth:`CorrectionMethod.correct`, which receives the whole stream.

LoRA factors and subspaces are float64 on CPU (cheap at LoRA sizes; keeps reruns exact);
the exact displacement D, when present, is float32 (m x n can be large). The callers
(``csulora.api``) convert on the way in and cast back to the adapter's dtype on the way out.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor


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
        return int(self.B.shape[0]), int(self.A.shape[1])

    def dense(self) -> Tensor:
        """The m x n update. For tests and small reports only: never on a hot path."""
        return self.scale * (self.B @ self.A)


@dataclass(frozen=True)
class ModuleSubspace:
    """Top-k SVD of one module's alignment displacement ``D ~= U diag(S) V^T``.

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


@dataclass
class ModuleInput:
    """Everything a method may use for one target module."""

    name: str  # full module name, e.g. "model.layers.3.self_attn.v_proj"
    update: LoraUpdate
    subspace: ModuleSubspace | None = None
    # Exact D = W_aligned - W_base (m x n, float32) when streamed from --base/--aligned; None when
    # only a subspace cache was given (then methods use the rank-k part and say so).
    displacement: Tensor | None = None


@dataclass
class ModuleResult:
    """Corrected factors (same ``scale`` as the input) and the per-module report."""

    name: str
    update: LoraUpdate
    report: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MethodConfig:
    """Base for each method's options; subclasses validate in ``__post_init__``.

    Field metadata ``help`` is the CLI help text, so options and docs come from one place.
    """

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class CorrectionMethod(ABC):
    """A post-hoc correction of LoRA adapters (one small class per module in methods/)."""

    name: ClassVar[str]  # registry key and --method value
    pretty_name: ClassVar[str]
    paper_url: ClassVar[str | None] = None
    config_cls: ClassVar[type[MethodConfig]]

    def needs_subspace(self, config: MethodConfig) -> bool:
        """Whether the top-k subspace of D must be available (cache or computed)."""
        return True

    def needs_displacement(self, config: MethodConfig) -> bool:
        """Whether the exact, full D must be streamed (needs --base/--aligned)."""
        return False

    @abstractmethod
    def correct_module(self, module: ModuleInput, config: MethodConfig) -> ModuleResult:
        """Correct one module independently of the others."""

    def correct(self, modules: Iterable[ModuleInput], config: MethodConfig) -> Iterator[ModuleResult]:
        """Correct a stream of modules; override for methods with a global decision."""
        for module in modules:
            yield self.correct_module(module, config)


def as_float64(t: Tensor) -> Tensor:
    """Methods compute in float64: cheap at LoRA sizes, and it keeps reruns exact."""
    return t.detach().to(device="cpu", dtype=torch.float64)
