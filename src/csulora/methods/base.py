"""The one interface every post-hoc correction method implements.

A method sees one module at a time (a :class:`ModuleInput`: the LoRA factors, the
module's safety subspace and, when streamed from base/aligned, the exact displacement D)
and returns corrected factors plus a per-module report. Methods that need a global
decision (Safe LoRA's number mode picks the N lowest cosines over all modules) override
:meth:`CorrectionMethod.correct`, which receives the whole stream.

LoRA factors and subspaces are float64 on CPU (cheap at LoRA sizes; keeps reruns exact);
the exact displacement D, when present, is float32 (m x n can be large; products with
it are taken in its own precision, see ``csulora.linalg``: bf16/fp16 are accepted and
converted by blocks of rows, a float64 D as in tests gives float64 products). The callers
(``csulora.api``) convert on the way in and cast back to the adapter's dtype on the way out.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from csulora.errors import OptionError

# Every method's per-module report has exactly these keys (None where one does not apply),
# so the API, the CLI table, the JSON files and the docs agree. Safe LoRA adds one more,
# ``safelora_dist`` (its Pdst term), see methods/safelora.py.
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

    def _store_as(self, field_name: str, kind: type) -> None:
        """Store a validated number as a plain ``float``/``int`` (numpy scalars from a
        sweep grid would otherwise leak into JSON reports); frozen, hence object.__setattr__."""
        object.__setattr__(self, field_name, kind(getattr(self, field_name)))


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

    def check_sources(self, config: MethodConfig, *, has_displacement: bool, has_subspace: bool) -> None:
        """Raise OptionError (before any tensor is read) when an input the config needs is missing.

        ``has_displacement``: the exact D will be streamed (--base/--aligned given);
        ``has_subspace``: a subspace will be available (a cache, or computed from base/aligned).
        """
        if self.needs_displacement(config) and not has_displacement:
            raise OptionError(f"{self.pretty_name} needs the exact D: give --base/--aligned")
        if self.needs_subspace(config) and not has_subspace:
            raise OptionError(
                f"{self.pretty_name} needs the safety subspace: give --subspace or --base/--aligned"
            )

    @abstractmethod
    def correct_module(self, module: ModuleInput, config: MethodConfig) -> ModuleResult:
        """Correct one module independently of the others."""

    def correct(self, modules: Iterable[ModuleInput], config: MethodConfig) -> Iterator[ModuleResult]:
        """Correct a stream of modules; override for methods with a global decision."""
        for module in modules:
            yield self.correct_module(module, config)

    def summary(self, results: Sequence[ModuleResult], config: MethodConfig) -> dict[str, Any]:
        """Global (whole-adapter) report fields computed from all results; {} by default.

        Safe LoRA returns its Pdst and the cosine threshold it used here.
        """
        return {}


def as_float64(t: Tensor) -> Tensor:
    """Methods compute in float64: cheap at LoRA sizes, and it keeps reruns exact."""
    return t.detach().to(device="cpu", dtype=torch.float64)


def flag_name(field_name: str) -> str:
    """The CLI spelling of a config field: ``rank_mode`` -> ``--rank-mode``."""
    return "--" + field_name.replace("_", "-")


def require_number(
    field_name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    integer: bool = False,
) -> None:
    """OptionError unless ``value`` is a finite number (an int if ``integer``) in [low, high]."""
    ok_type = isinstance(value, numbers.Integral if integer else numbers.Real)
    if not ok_type or isinstance(value, bool) or not math.isfinite(float(value)):
        kind = "an integer" if integer else "a number"
        raise OptionError(f"{flag_name(field_name)} must be {kind}, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = {
            (True, True): f"in [{low}, {high}]",
            (True, False): f">= {low}",
            (False, True): f"<= {high}",
        }[(low is not None, high is not None)]
        raise OptionError(f"{flag_name(field_name)} must be {bounds}, got {value!r}")


def require_choice(field_name: str, value: Any, choices: Sequence[str]) -> None:
    """OptionError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise OptionError(
            f"{flag_name(field_name)} must be one of {', '.join(choices)}, got {value!r}"
        )
