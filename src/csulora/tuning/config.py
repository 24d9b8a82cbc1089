"""What `csulora tune` sweeps and how it judges: the knob of each method and `TuneConfig`.

Every correction method has one knob that sets its strength (RESTA's restore beta,
CSULoRA's gamma, Safe LoRA's threshold, uniform scaling's factor). `tune` sweeps that
knob from the weakest setting -- the one closest to the uncorrected adapter -- to the
strongest, so "the first setting that qualifies" is also the one that changes the
adapter least. Everything here is validated before any tensor or model is read.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from csulora.errors import OptionError

# Same defaults as `csulora eval` (DESIGN §10: one generation default for every prompt
# set, and tune uses eval's). Kept here as a fallback so the pure parts import without
# the evaluation package; the runner asserts they agree.
DEFAULT_MAX_NEW_TOKENS = 64
DEFAULT_BATCH_SIZE = 32


@dataclass(frozen=True)
class KnobSpec:
    """The one option of a method that `tune` sweeps.

    ``weaker_when_smaller``: True when a smaller value is closer to the uncorrected
    adapter (restore 0, gamma 0, threshold -1 projects nothing); False for scaling, where
    factor 1 is the adapter itself.
    ``fixed``: options forced for the sweep to make sense (Safe LoRA's threshold only
    acts in threshold mode).
    """

    method: str
    knob: str
    default_grid: tuple[float, ...]
    weaker_when_smaller: bool
    fixed: Mapping[str, Any] = field(default_factory=dict)

    def order_weakest_first(self, values: Iterable[float]) -> tuple[float, ...]:
        return tuple(sorted(values, reverse=not self.weaker_when_smaller))


def _frange(start: float, stop: float, step: float) -> tuple[float, ...]:
    """Inclusive float range, rounded so 0.1 + 0.05 * k prints as written."""
    count = int(round((stop - start) / step)) + 1
    return tuple(round(start + step * i, 10) for i in range(count))


KNOBS: Mapping[str, KnobSpec] = MappingProxyType(
    {
        "resta": KnobSpec("resta", "restore", (0.0, 0.5, 1.0, 1.5, 2.0, 3.0), True),
        "csulora": KnobSpec("csulora", "gamma", (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0), True),
        "safelora": KnobSpec(
            "safelora", "threshold", _frange(0.1, 0.5, 0.05), True, fixed={"select": "threshold"}
        ),
        "scale": KnobSpec("scale", "factor", _frange(0.3, 1.0, 0.1)[::-1], False),
    }
)
TUNABLE_METHODS: tuple[str, ...] = tuple(KNOBS)
DEFAULT_METHOD = "resta"


def parse_grid(text: str) -> tuple[float, ...]:
    """Parse ``--grid "0,0.5,1"``; one-line OptionError on anything else."""
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or any(item == "" for item in items):
        raise OptionError(f"--grid: expected a comma-separated list of numbers, got {text!r}")
    values = []
    for item in items:
        try:
            values.append(float(item))
        except ValueError:
            raise OptionError(f"--grid: {item!r} is not a number") from None
    return tuple(values)


def _check_fraction(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0):
        raise OptionError(f"{name} must be a fraction in [0, 1], got {value!r}")


@dataclass(frozen=True)
class TuneConfig:
    """Options of one `tune` run; ``grid`` is stored weakest first after validation."""

    method: str = field(default=DEFAULT_METHOD, metadata={"help": "correction method whose knob is swept"})
    grid: tuple[float, ...] | None = field(
        default=None, metadata={"help": "knob values to try (default: the method's grid); sorted weakest first"}
    )
    max_asr_gap: float = field(
        default=0.05, metadata={"help": "largest ASR above the aligned model's, on each harmful source"}
    )
    max_utility_drop: float = field(
        default=0.05, metadata={"help": "largest task-score drop, as a fraction of the uncorrected adapter's"}
    )
    max_new_tokens: int = field(default=DEFAULT_MAX_NEW_TOKENS, metadata={"help": "greedy tokens per answer"})
    batch_size: int = field(default=DEFAULT_BATCH_SIZE, metadata={"help": "prompts per generation batch"})
    method_options: Mapping[str, Any] = field(
        default_factory=dict,
        metadata={"help": "fixed options of the method, e.g. {'restore': 1.0} for csulora"},
    )
    seed: int = field(default=0, metadata={"help": "seed of the bootstrap intervals"})
    stop_at_first: bool = field(
        default=False,
        metadata={"help": "stop at the first qualifying setting (faster; the stronger ones are then not scored)"},
    )

    def __post_init__(self) -> None:
        if self.method not in KNOBS:
            raise OptionError(f"--method: {self.method!r} cannot be tuned; choose one of {', '.join(KNOBS)}")
        spec = KNOBS[self.method]
        _check_fraction("--max-asr-gap", self.max_asr_gap)
        _check_fraction("--max-utility-drop", self.max_utility_drop)
        for name, value in (("--max-new-tokens", self.max_new_tokens), ("batch size", self.batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptionError(f"{name} must be a positive integer, got {value!r}")
        options = dict(self.method_options)
        if spec.knob in options:
            raise OptionError(
                f"{self.method}: {spec.knob} is the knob tune sweeps; give it with --grid, not as a fixed option"
            )
        for name, forced in spec.fixed.items():
            if name in options and options[name] != forced:
                raise OptionError(f"{self.method}: tune sweeps the {spec.knob} and needs {name}={forced!r}")
        grid = spec.default_grid if self.grid is None else tuple(self.grid)
        grid = _check_grid(grid)
        object.__setattr__(self, "grid", spec.order_weakest_first(grid))
        object.__setattr__(self, "method_options", MappingProxyType(options))
        # Fail now, before any model is read, on values the method itself refuses: the
        # fixed options first (with the weakest default knob), then every grid value.
        build_method_config(self.method, spec.order_weakest_first(spec.default_grid)[0], options, knob_from_grid=False)
        for value in self.grid:
            build_method_config(self.method, value, options)

    @property
    def knob(self) -> str:
        return KNOBS[self.method].knob

    def setting_options(self, value: float) -> dict[str, Any]:
        """The full option set of one setting: fixed options, forced ones, the knob value."""
        spec = KNOBS[self.method]
        return {**self.method_options, **spec.fixed, spec.knob: value}

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "knob": self.knob,
            "grid": list(self.grid or ()),
            "max_asr_gap": self.max_asr_gap,
            "max_utility_drop": self.max_utility_drop,
            "max_new_tokens": self.max_new_tokens,
            "batch_size": self.batch_size,
            "method_options": {**dict(self.method_options), **KNOBS[self.method].fixed},
            "seed": self.seed,
            "stop_at_first": self.stop_at_first,
        }


def _check_grid(grid: tuple[float, ...]) -> tuple[float, ...]:
    if not grid:
        raise OptionError("--grid: the grid is empty; give at least one value")
    clean = []
    for value in grid:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise OptionError(f"--grid: {value!r} is not a finite number")
        clean.append(float(value))
    seen = set()
    for value in clean:
        if value in seen:
            raise OptionError(f"--grid: {value:g} is listed twice")
        seen.add(value)
    return tuple(clean)


def build_method_config(method: str, value: float, options: Mapping[str, Any], *, knob_from_grid: bool = True) -> Any:
    """Construct the method's own config for one grid value, so its range checks run.

    Errors name the grid value when it is the knob that is out of range.
    """
    from csulora.methods.registry import make_config

    spec = KNOBS[method]
    kwargs = {**dict(options), **spec.fixed, spec.knob: value}
    try:
        return make_config(method, kwargs)
    except OptionError as exc:
        if not knob_from_grid:
            raise
        raise OptionError(f"--grid {value:g}: {exc}") from None
