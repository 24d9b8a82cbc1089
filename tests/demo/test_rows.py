"""The demo's rows come from the method registry (issue 20): no method is listed by hand."""

from __future__ import annotations

import pytest

from csulora.demo.rows import (
    MAX_FULL_GRID,
    RowSpec,
    needs_calibration,
    not_run_methods,
    plan_rows,
    thin_grid,
)
from csulora.methods import registry
from csulora.methods.base import Preset, Tuning
from csulora.tuning.config import TuneConfig
from tests.toy_methods import Dampen


class DampenWithPresets(Dampen):
    """The toy method with a long grid and one preset of each kind."""

    name = "toy-dampen-presets"
    tuning = Tuning(knob="strength", grid=(1.0, 0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75), identity=0.0)
    presets = (
        Preset("toy-half", {"strength": 0.5}, swept=False, help="a published default"),
        Preset("toy-swept", {}, help="the knob swept again"),
    )


@pytest.fixture
def toy_registry(monkeypatch):
    monkeypatch.setattr(registry, "METHODS", {})
    for method in (Dampen(), DampenWithPresets()):
        registry.register(method)


def test_a_method_registered_in_a_test_is_a_row_of_the_demo(toy_registry):
    rows = plan_rows(every_method=True)
    assert [r.row for r in rows] == ["toy-dampen", "toy-dampen-presets", "toy-half", "toy-swept"]
    own = rows[0]
    assert (own.method, own.knob, own.grid, own.options, own.swept) == ("toy-dampen", "strength", (0.0, 1.0), {}, True)
    fixed = rows[2]
    assert (fixed.method, fixed.swept, fixed.options, fixed.settings()) == (
        "toy-dampen-presets", False, {"strength": 0.5}, [{"strength": 0.5}]
    )
    # neither toy is tune's default method: no row decides the recommendation
    assert not any(r.recommends for r in rows)
    assert not needs_calibration(rows)


def test_long_grids_are_thinned_by_one_rule_weakest_first(toy_registry):
    rows = {r.row: r for r in plan_rows(every_method=True)}
    swept = rows["toy-dampen-presets"]
    assert swept.default_grid == (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 1.0)
    assert swept.grid == (0.0, 0.25, 0.5, 0.75, 1.0) and swept.grid_source == "thinned"  # every other point, the last kept
    assert rows["toy-swept"].grid == swept.grid
    assert rows["toy-dampen"].grid_source == "default"
    assert swept.with_grid((0.5,)).grid_source == "given"


def test_thin_grid_keeps_short_grids_and_both_ends():
    short = tuple(range(MAX_FULL_GRID))
    assert thin_grid(short) == short
    assert thin_grid(range(MAX_FULL_GRID + 1)) == tuple(range(0, MAX_FULL_GRID + 1, 2))
    assert thin_grid(range(MAX_FULL_GRID + 2)) == (*range(0, MAX_FULL_GRID + 2, 2), MAX_FULL_GRID + 1)


def test_a_swept_preset_of_a_method_with_no_knob_is_refused(monkeypatch):
    class NoKnob(Dampen):
        name = "toy-no-knob"
        tuning = None
        presets = (Preset("toy-bad", {"strength": 0.5}),)

    monkeypatch.setattr(registry, "METHODS", {})
    registry.register(NoKnob())
    with pytest.raises(ValueError, match="toy-bad.*describes no knob"):
        plan_rows(every_method=True)


def test_the_real_registry_gives_every_tunable_method_a_row_and_every_preset_one():
    from csulora.demo.rows import not_run_here

    rows = plan_rows()
    expected = []
    for name, method in registry.METHODS.items():
        if not_run_here(method) is not None:
            continue  # listed in the report instead (test_methods_the_demo_cannot_run_are_listed_with_why)
        expected += [name] if method.tuning is not None else []
        expected += [preset.name for preset in method.presets]
    assert [r.row for r in rows] == expected
    for row in rows:
        method = registry.get_method(row.method)
        if row.swept:
            assert set(row.grid) <= set(method.tuning.grid)
            assert row.grid[0] == row.default_grid[0] and row.grid[-1] == row.default_grid[-1]
            assert dict(method.tuning.fixed).items() <= row.options.items()


def test_the_recommending_row_is_tune_with_its_defaults():
    deciding = [r for r in plan_rows() if r.recommends]
    assert len(deciding) == 1
    default = TuneConfig()  # `csulora tune` with no --method, --grid or fixed options
    row = deciding[0]
    assert (row.method, row.knob, row.options) == (default.method, default.knob, dict(default.tuning.fixed))
    assert row.grid == default.grid and row.grid_source == "default"  # the whole grid: it decides the recommendation
    assert row.setting(row.grid[1]) == default.setting_options(row.grid[1])


def test_with_grid_orders_a_test_grid_weakest_first():
    scale_like = [r for r in plan_rows() if r.swept and not registry.get_method(r.method).tuning.weaker_when_smaller]
    for row in scale_like:
        assert row.with_grid(sorted(row.default_grid)[:2]).grid == tuple(sorted(row.default_grid)[:2][::-1])
    row = RowSpec("x", next(iter(registry.tunable_methods())))
    assert row.settings() == [{}] and not row.swept


def test_methods_the_demo_cannot_run_are_listed_with_why():
    from csulora.demo.rows import not_run_methods, plan_rows
    from csulora.methods import registry

    for every_method in (False, True):
        not_run = not_run_methods(every_method=every_method)
        planned = {row.method for row in plan_rows(every_method=every_method)}
        assert set(not_run) | planned == set(registry.METHODS) and not set(not_run) & planned
        for name, why in not_run.items():
            method = registry.get_method(name)
            cannot = not method.has_factored_form or "update_statistics" in method.inputs
            assert cannot or (not every_method and "not run to keep the demo short" in why), (name, why)


def test_the_short_demo_runs_tunes_default_and_the_baselines(toy_registry):
    """`make demo` stays short: tune's default method and the §5b baselines; the rest are listed."""

    class Baseline(Dampen):
        name = "toy-baseline"
        baseline = True

    registry.register(Baseline())
    assert [r.row for r in plan_rows()] == ["toy-baseline"]
    not_run = not_run_methods()
    assert set(not_run) == {"toy-dampen", "toy-dampen-presets"}
    assert "csulora tune --method toy-dampen" in not_run["toy-dampen"]


def test_the_real_short_demo_is_the_recommended_path_and_two_baselines():
    rows = plan_rows()
    assert {r.method for r in rows} == {TuneConfig().method} | {n for n, m in registry.METHODS.items() if m.baseline}
    assert sum(registry.get_method(n).baseline for n in registry.METHODS) == 2
