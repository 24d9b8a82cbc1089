"""Which corrected rows the demo shows, read from the method registry (docs/design.md §9).

- One swept row per method ``csulora tune`` can sweep: its knob and default grid from the
  method's :class:`~csulora.methods.base.Tuning`, with the options tune forces and those it sets
  when base and aligned are given (:meth:`~csulora.methods.base.CorrectionMethod.tune_options`).
- One row per :class:`~csulora.methods.base.Preset` the method declares: swept over the same
  grid with the preset's options held, or one fixed setting (``swept=False``).

No method is named here: a method registered anywhere shows up, a new variant is a preset in
its method's file. The one row that is ``csulora tune`` with its defaults (tune's default method
over its own grid, no option held) decides the recommendation and keeps its whole grid. The
others are thinned when long, by one rule for all (:func:`thin_grid`); report.md lists every grid
that was thinned.

To keep ``make demo`` within 3 minutes on 2 cores, it runs tune's default method (the recommended
path) and the baselines every method must beat (``CorrectionMethod.baseline``, docs/design.md
§5b); every other registered method is listed in report.md as not run there, with the command
that runs it (:func:`not_run_here`). ``every_method=True`` plans them all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from csulora.methods import registry
from csulora.methods.base import UPDATE_STATISTICS, CorrectionMethod, Preset, Tuning
from csulora.tuning.config import DEFAULT_METHOD

# A grid of more points than this is swept at every other point, its first and last kept.
MAX_FULL_GRID = 6


@dataclass(frozen=True)
class RowSpec:
    """One corrected row: a registered method, the options held, and the knob values swept.

    ``grid`` (weakest first) is empty for a fixed row, whose ``options`` are the whole setting.
    ``default_grid``: the method's own grid, before thinning. ``recommends``: the row is
    ``csulora tune`` with its defaults, so its selection (when one qualifies) is recommended.
    """

    row: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)  # a dict, not a mapping proxy: rows go to worker processes
    grid: tuple[float, ...] = ()
    default_grid: tuple[float, ...] = ()
    recommends: bool = False
    help: str = ""

    @property
    def swept(self) -> bool:
        return bool(self.grid)

    @property
    def tuning(self) -> Tuning:
        tuning = registry.get_method(self.method).tuning
        assert tuning is not None, f"{self.method} describes no knob to sweep"
        return tuning

    @property
    def knob(self) -> str:
        return self.tuning.knob

    @property
    def grid_source(self) -> str:
        """How the grid came about: "default" (the method's), "thinned" (:func:`thin_grid`) or "given"."""
        if self.grid == self.default_grid:
            return "default"
        return "thinned" if self.grid == thin_grid(self.default_grid) else "given"

    def setting(self, value: float) -> dict[str, Any]:
        """The options of one grid value."""
        return {**self.options, self.knob: value}

    def settings(self) -> list[dict[str, Any]]:
        """Every option set this row corrects with (one for a fixed row)."""
        return [self.setting(v) for v in self.grid] if self.swept else [dict(self.options)]

    def with_grid(self, values: Sequence[float]) -> RowSpec:
        """The same row over other knob values (ordered weakest first), e.g. a shorter grid in a test."""
        from dataclasses import replace

        return replace(self, grid=self.tuning.order_weakest_first(values))


def thin_grid(grid: Sequence[float]) -> tuple[float, ...]:
    """Every other point of a grid longer than MAX_FULL_GRID, keeping the first and the last."""
    grid = tuple(grid)
    if len(grid) <= MAX_FULL_GRID:
        return grid
    kept = grid[::2]
    return kept if kept[-1] == grid[-1] else (*kept, grid[-1])


def method_row(method: CorrectionMethod) -> RowSpec:
    """The method's own sweep, as ``csulora tune --method NAME`` runs it."""
    tuning = method.tuning
    assert tuning is not None
    recommends = method.name == DEFAULT_METHOD
    # The recommending row is tune with its defaults and no --base (its command in report.md);
    # the others are corrected with base and aligned at hand, as `tune --base BASE` would.
    options = {**method.tune_options(has_displacement=not recommends), **tuning.fixed}
    grid = tuning.order_weakest_first(tuning.grid)
    return RowSpec(method.name, method.name, options, grid if recommends else thin_grid(grid), grid,
                   recommends=recommends, help=f"{method.pretty_name}, {tuning.knob} swept")  # fmt: skip


def preset_row(method: CorrectionMethod, preset: Preset) -> RowSpec:
    """A variant the method declares: its knob swept with the preset's options held, or one fixed setting."""
    if not preset.swept:
        return RowSpec(preset.name, method.name, dict(preset.options), help=preset.help)
    tuning = method.tuning
    if tuning is None:
        raise ValueError(f"{method.name}: preset {preset.name!r} is swept but the method describes no knob")
    options = {**method.tune_options(has_displacement=True), **preset.options, **tuning.fixed}
    grid = tuning.order_weakest_first(tuning.grid)
    return RowSpec(preset.name, method.name, options, thin_grid(grid), grid, help=preset.help)


def not_run_here(method: CorrectionMethod, *, every_method: bool = False) -> str | None:
    """Why the demo does not run a registered method (None: it does). The demo attaches corrected
    adapters and has the aligned model's statistics; a method that writes a corrected model (no
    factored form) or reads the fine-tuned model's statistics is listed in the report, not run.
    Unless ``every_method``, neither is a method that is neither tune's default nor a baseline
    (§5b): the demo stays short."""
    if not method.has_factored_form:
        return "its correction of an adapter is a whole model (no LoRA): run it with `csulora tune` or `make smol`"
    if UPDATE_STATISTICS in method.inputs:
        return "it reads the fine-tuned model's statistics (--update-statistics): run it with `make smol`"
    if not every_method and method.name != DEFAULT_METHOD and not method.baseline:
        return (
            "not run to keep the demo short (it runs tune's default method and the baselines of docs/design.md "
            f"§5b): run it on the demo world with `csulora tune --method {method.name}`"
        )
    return None


def not_run_methods(*, every_method: bool = False) -> dict[str, str]:
    """Every registered method the demo lists but does not run, with why."""
    return {
        name: why
        for name, method in registry.METHODS.items()
        if (why := not_run_here(method, every_method=every_method)) is not None
    }


def not_in_rows(rows: Sequence[RowSpec]) -> dict[str, str]:
    """The registered methods a given set of rows leaves out, with why (a run given its own rows)."""
    planned = {row.method for row in rows}
    return {
        name: not_run_here(method) or "not among this run's rows"
        for name, method in registry.METHODS.items()
        if name not in planned
    }


def plan_rows(*, every_method: bool = False) -> list[RowSpec]:
    """The demo's corrected rows, in registry order: each method's sweep, then its presets (the
    methods :func:`not_run_here` excludes are listed in the report instead).

    Every setting is validated by the method's own config before any model is read.
    """
    rows: list[RowSpec] = []
    for method in registry.METHODS.values():
        if not_run_here(method, every_method=every_method) is not None:
            continue
        if method.tuning is not None:
            rows.append(method_row(method))
        rows += [preset_row(method, preset) for preset in method.presets]
    for row in rows:
        for options in row.settings():
            registry.make_config(row.method, options)
    return rows


def needs_calibration(rows: Sequence[RowSpec]) -> bool:
    """Whether any row needs activation statistics (then the aligned model is calibrated once)."""
    return any(
        registry.get_method(row.method).needs_calibration(registry.make_config(row.method, options))
        for row in rows
        for options in row.settings()
    )
