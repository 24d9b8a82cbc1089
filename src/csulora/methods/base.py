"""The one interface every post-hoc correction method implements (docs/design.md §9).

A method sees one module at a time (a :class:`~csulora.types.ModuleInput`: the LoRA
factors, the module's safety subspace, the exact displacement D when streamed from
base/aligned, the activation statistics when calibrated) and returns corrected factors
plus a per-module report. Methods that need a global decision (Safe LoRA's number mode
picks the N lowest cosines over all modules) override :meth:`CorrectionMethod.correct`,
which receives the whole stream.

A method also describes itself, so nothing outside its own file needs to know it:
its name and paper, its config dataclass (the CLI flags and their help), which inputs it
needs, and how ``csulora tune`` sweeps it (:class:`Tuning`: the knob, the default grid
weakest first, the knob value that leaves the adapter unchanged). Adding a method is one
file plus one line in ``registry.py``.

LoRA factors and subspaces are float64 on CPU (cheap at LoRA sizes; keeps reruns exact);
the exact displacement D, when present, is float32 (m x n can be large; products with
it are taken in its own precision, see ``csulora.linalg.lowrank``: bf16/fp16 are accepted and
converted by blocks of rows, a float64 D as in tests gives float64 products). The callers
(``csulora.pipeline.api``) convert on the way in and cast back to the adapter's dtype on the way out.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from abc import ABC
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Generic, TypeVar


from csulora.errors import OptionError
from csulora.types import (
    DenseModuleInput,
    DenseModuleResult,
    ModuleInput,
    ModuleResult,
)

# What a method may need besides the adapter (``CorrectionMethod.inputs``).
SUBSPACE = "subspace"  # the top-k safety subspace of D (a cache, or computed from base/aligned)
DISPLACEMENT = "displacement"  # the exact, full D (streamed from --base/--aligned)
CALIBRATION = "calibration"  # activation statistics of the aligned model, from `csulora calibrate`
# Activation statistics of the fine-tuned model (the update applied) on harmful prompts followed by
# harmful answers, from `csulora calibrate ALIGNED --update UPDATE --pairs FILE` (Antidote's, issue 22).
UPDATE_STATISTICS = "update_statistics"
ALIGNED_WEIGHT = "aligned_weight"  # W_aligned beside a dense dW (Antidote prunes W_ft itself)
INPUT_KINDS = (SUBSPACE, DISPLACEMENT, CALIBRATION, UPDATE_STATISTICS, ALIGNED_WEIGHT)


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


@dataclass(frozen=True)
class Tuning:
    """How ``csulora tune`` sweeps a method: one knob, from weakest to strongest.

    ``grid``: the default values, weakest (closest to the uncorrected adapter) first.
    ``weaker_when_smaller``: orders a user's grid the same way (False for scaling, where
    factor 1 is the adapter itself). ``identity``: the knob value at which the method
    writes the adapter unchanged (None when no value does), so tune scores it once.
    ``fixed``: options the sweep forces (Safe LoRA's threshold acts in threshold mode only).
    """

    knob: str
    grid: tuple[float, ...]
    weaker_when_smaller: bool = True
    identity: float | None = None
    fixed: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def order_weakest_first(self, values: Iterable[float]) -> tuple[float, ...]:
        return tuple(sorted(values, reverse=not self.weaker_when_smaller))


@dataclass(frozen=True)
class Preset:
    """A named variant of a method, declared once by the method itself: the rows beside its own
    sweep that the demo and the benchmark tables show (docs/design.md §9).

    ``options`` are held fixed; ``swept`` True sweeps the method's knob with them (CSULoRA with
    the alignment restored), False is one fixed setting (Safe LoRA's published default).
    """

    name: str  # the row's name, e.g. "safelora-default"
    options: Mapping[str, Any]
    swept: bool = True
    help: str = ""


ConfigT = TypeVar("ConfigT", bound=MethodConfig)


class CorrectionMethod(ABC, Generic[ConfigT]):
    """A post-hoc correction of LoRA adapters (one small class per module in methods/)."""

    name: ClassVar[str]  # registry key and --method value
    pretty_name: ClassVar[str]
    paper_url: ClassVar[str | None] = None
    config_cls: type[ConfigT]
    # Inputs the method needs with its default options (see needs(); INPUT_KINDS).
    inputs: ClassVar[frozenset[str]] = frozenset({SUBSPACE})
    # How tune sweeps it; None: tune cannot sweep this method.
    tuning: ClassVar[Tuning | None] = None
    # True when the method's guarantee holds only if every adapted module is corrected (the
    # calibrated method, docs/design.md §5c): the API then refuses --targets that leave one out.
    corrects_every_module: ClassVar[bool] = False
    # The method's own per-module report columns, shown after the common ones in `correct`'s
    # table: (report key, column title, format). Every key must be in the method's reports.
    report_columns: ClassVar[tuple[tuple[str, str, str], ...]] = ()
    # Named variants shown beside the method's own sweep (:class:`Preset`).
    presets: ClassVar[tuple[Preset, ...]] = ()
    # A baseline every method must beat (docs/design.md §5b): `csulora demo` runs these beside
    # tune's default method and lists the others as not run there.
    baseline: ClassVar[bool] = False

    # -- what the method needs ---------------------------------------------------------
    def needs(self, config: ConfigT) -> frozenset[str]:
        """Inputs needed with these options (override when an option changes them)."""
        return self.inputs

    def needs_subspace(self, config: ConfigT) -> bool:
        return SUBSPACE in self.needs(config)

    def needs_displacement(self, config: ConfigT) -> bool:
        return DISPLACEMENT in self.needs(config)

    def needs_calibration(self, config: ConfigT) -> bool:
        return CALIBRATION in self.needs(config)

    def needs_update_statistics(self, config: ConfigT) -> bool:
        return UPDATE_STATISTICS in self.needs(config)

    def check_sources(
        self, config: ConfigT, *, has_displacement: bool, has_subspace: bool, has_calibration: bool = False,
        has_update_statistics: bool = False,
    ) -> None:
        """Raise OptionError (before any tensor is read) when an input the config needs is missing.

        ``has_displacement``: the exact D will be streamed (--base/--aligned given);
        ``has_subspace``: a subspace will be available (a cache, or computed from base/aligned);
        ``has_calibration``: a calibration file was given; ``has_update_statistics``: statistics of
        the fine-tuned model were given.
        """
        if self.needs_update_statistics(config) and not has_update_statistics:
            raise OptionError(
                f"{self.pretty_name} needs the fine-tuned model's activation statistics: give --update-statistics "
                "FILE (written by `csulora calibrate ALIGNED --update UPDATE --pairs PAIRS.jsonl -o FILE`, UPDATE "
                "the adapter or full fine-tune corrected here)"
            )
        if self.needs_displacement(config) and not has_displacement:
            raise OptionError(f"{self.pretty_name} needs the exact D: give --base/--aligned")
        if self.needs_subspace(config) and not has_subspace:
            raise OptionError(
                f"{self.pretty_name} needs the safety subspace: give --subspace or --base/--aligned"
            )
        if self.needs_calibration(config) and not has_calibration:
            raise OptionError(
                f"{self.pretty_name} needs activation statistics: give --calibration FILE "
                "(written by `csulora calibrate`), or to tune, --calibration-task DATA (it calibrates first)"
            )

    # -- how tune sweeps it -------------------------------------------------------------
    def is_identity(self, config: ConfigT) -> bool:
        """Whether these options write the adapter's update exactly as it is."""
        tuning = self.tuning
        if tuning is None or tuning.identity is None:
            return False
        return getattr(config, tuning.knob) == tuning.identity

    def tune_options(self, *, has_displacement: bool) -> dict[str, Any]:
        """Options tune sets by default for the sources it has (Safe LoRA: its projection)."""
        return {}

    # -- the correction -----------------------------------------------------------------
    @property
    def has_factored_form(self) -> bool:
        """Whether the method corrects LoRA factors (``correct_module``/``correct``); a method with only
        a dense form (Safe Delta) corrects an adapter as the dense update ``s B A`` it makes."""
        cls = type(self)
        return cls.correct_module is not CorrectionMethod.correct_module or cls.correct is not CorrectionMethod.correct

    def correct_module(self, module: ModuleInput, config: ConfigT) -> ModuleResult:
        """Correct one module independently of the others (the factored form)."""
        raise OptionError(f"--method {self.name} ({self.pretty_name}) has no factored form")

    def correct(self, modules: Iterable[ModuleInput], config: ConfigT) -> Iterator[ModuleResult]:
        """Correct a stream of modules; override for methods with a global decision."""
        for module in modules:
            yield self.correct_module(module, config)

    def summary(self, results: Sequence[ModuleResult], config: ConfigT) -> dict[str, Any]:
        """Global (whole-adapter) report fields computed from all results; {} by default.

        Safe LoRA returns its Pdst and the cosine threshold it used here. Reads only each
        result's ``report``, so it serves dense results (:class:`DenseModuleResult`) too.
        """
        return {}

    # -- the dense form: full fine-tunes (docs/design.md §5d) ----------------------------------
    # A method corrects a full fine-tune's module through ``correct_dense`` (its own file, beside
    # its LoRA form). The API streams one DenseModuleInput at a time and writes W_aligned + X.
    @property
    def has_dense_form(self) -> bool:
        return type(self).correct_dense is not CorrectionMethod.correct_dense

    def correct_dense(self, module: DenseModuleInput, config: Any) -> DenseModuleResult:
        """Correct one module of a full fine-tune (``dW = W_ft - W_aligned``, dense).

        May overwrite ``module.update`` in place (see :class:`DenseModuleInput`).
        """
        raise OptionError(self.no_dense_form_message())

    def no_dense_form_message(self) -> str:
        return f"--method {self.name} ({self.pretty_name}) has no dense form: it corrects LoRA adapters only, not full checkpoints"

    def check_dense_options(self, config: ConfigT) -> None:
        """OptionError (before any tensor is read) for a method or option with no dense meaning."""
        if not self.has_dense_form:
            raise OptionError(self.no_dense_form_message())

    def dense_inputs(self, config: ConfigT, *, has_displacement: bool) -> frozenset[str]:
        """What the dense form needs streamed, given whether the exact D is available."""
        return self.needs(config)

    def needs_dense_first_pass(self, config: ConfigT) -> bool:
        """Whether the dense form needs a global decision first (Safe LoRA's number mode).

        Dense updates are too large to keep while a whole-model decision is made, so the API
        streams the modules twice: :meth:`dense_first_pass` measures each one, and
        :meth:`dense_run` turns the measures into what :meth:`correct_dense` sees on the second.
        """
        return False

    def dense_first_pass(self, module: DenseModuleInput, config: ConfigT) -> Any:
        raise NotImplementedError

    def dense_run(self, config: ConfigT, measures: Mapping[str, Any] | None = None) -> Any:
        """What :meth:`correct_dense` receives for every module of one run (built once per run).

        The config itself by default; a plan from the first pass's ``measures`` (Safe LoRA's
        number mode), or state shared across modules (the calibrated method's factorisations).
        """
        return config


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
