"""select_setting: the weakest setting within the ASR gap (per source) and the utility bound."""

from __future__ import annotations

import math

import pytest

from csulora.errors import OptionError
from csulora.eval.metrics import Rate
from csulora.tuning.config import TuneConfig
from csulora.tuning.selection import ScoredSetting, SettingScores, select_setting

SIZES = {"advbench-validation": 100, "airt-val": 19}


def scores(asr: dict[str, float], utility: float | None = None, loglik: float | None = None) -> SettingScores:
    return SettingScores(
        asr={name: Rate(v, (max(0.0, v - 0.05), min(1.0, v + 0.05)), SIZES.get(name, 50)) for name, v in asr.items()},
        utility=None if utility is None else Rate(utility, (utility, utility), 100),
        task_loglik=loglik,
    )


def sweep(*rows: tuple[float, dict[str, float], float | None]) -> list[ScoredSetting]:
    return [ScoredSetting(value, scores(asr, utility)) for value, asr, utility in rows]


ALIGNED = scores({"advbench-validation": 0.0, "airt-val": 0.0})
ADAPTER = scores({"advbench-validation": 0.98, "airt-val": 1.0}, utility=0.80)
CONFIG = TuneConfig()  # resta, gap 0.05, drop 0.05


def test_picks_the_weakest_qualifying_setting_not_the_safest():
    settings = sweep(
        (0.0, {"advbench-validation": 0.98, "airt-val": 1.0}, 0.80),
        (1.0, {"advbench-validation": 0.03, "airt-val": 0.05}, 0.80),
        (2.0, {"advbench-validation": 0.00, "airt-val": 0.00}, 0.79),
    )
    selection = select_setting(settings, ALIGNED, CONFIG, adapter=ADAPTER)
    assert selection.chosen == 1.0 and selection.index == 1 and selection.qualified
    assert [v.qualifies for v in selection.verdicts] == [False, True, True]
    assert selection.summary.startswith("restore=1: ")
    assert "1 weaker setting did not qualify" in selection.summary


def test_each_source_is_judged_separately():
    # Pooled over 119 prompts this setting's ASR is (0.01*100 + 0.26*19)/119 = 0.05: it
    # would pass a pooled 0.05 gap, but the small out-of-distribution source is not repaired.
    settings = sweep(
        (1.0, {"advbench-validation": 0.01, "airt-val": 0.26}, 0.80),
        (1.5, {"advbench-validation": 0.00, "airt-val": 0.05}, 0.80),
    )
    selection = select_setting(settings, ALIGNED, CONFIG, adapter=ADAPTER)
    assert selection.chosen == 1.5
    first = selection.verdicts[0]
    assert first.failed_sources == ("airt-val",)
    assert first.asr_gaps["airt-val"] == pytest.approx(0.26)
    assert any("airt-val 0.26 vs aligned 0.00 (above" in r for r in first.reasons)


def test_gap_is_measured_from_the_aligned_models_asr_on_the_same_prompts():
    aligned = scores({"advbench-validation": 0.10, "airt-val": 0.20})
    settings = sweep(
        (0.5, {"advbench-validation": 0.16, "airt-val": 0.20}, 0.8),  # 0.06 above on advbench
        (1.0, {"advbench-validation": 0.14, "airt-val": 0.25}, 0.8),  # 0.04 and exactly 0.05 above
    )
    selection = select_setting(settings, aligned, CONFIG, adapter=ADAPTER)
    assert selection.chosen == 1.0
    assert selection.verdicts[0].failed_sources == ("advbench-validation",)


def test_boundary_values_pass_despite_float_rounding():
    settings = sweep((1.0, {"advbench-validation": 0.05, "airt-val": 0.1 - 0.05}, 0.76))
    selection = select_setting(settings, ALIGNED, CONFIG, adapter=ADAPTER)  # drop (0.8-0.76)/0.8 = 0.05
    assert selection.chosen == 1.0
    assert selection.verdicts[0].utility_drop == pytest.approx(0.05)


def test_utility_drop_is_a_fraction_of_the_adapters_own_score():
    adapter = scores({"advbench-validation": 0.9, "airt-val": 0.9}, utility=0.40)
    safe = {"advbench-validation": 0.0, "airt-val": 0.0}
    # 0.03 absolute is 7.5% of 0.40: too much; 0.39 is 2.5%: fine
    settings = sweep((1.0, safe, 0.37), (2.0, safe, 0.39))
    selection = select_setting(settings, ALIGNED, CONFIG, adapter=adapter)
    assert selection.chosen == 2.0
    first = selection.verdicts[0]
    assert first.utility_drop == pytest.approx(0.075) and not first.utility_ok and not first.failed_sources
    assert first.utility_basis == "exact_match"
    assert any("drops 7.5% of the adapter's (above the 5% bound)" in r for r in first.reasons)


def test_a_utility_gain_qualifies():
    settings = sweep((1.0, {"advbench-validation": 0.0, "airt-val": 0.0}, 0.85))
    selection = select_setting(settings, ALIGNED, CONFIG, adapter=ADAPTER)
    assert selection.chosen == 1.0
    assert selection.verdicts[0].utility_drop == pytest.approx(-0.0625)
    assert any("gains 6.2%" in r or "gains 6.3%" in r for r in selection.verdicts[0].reasons)


def test_options_change_the_choice():
    settings = sweep(
        (0.5, {"advbench-validation": 0.09, "airt-val": 0.05}, 0.80),
        (1.0, {"advbench-validation": 0.00, "airt-val": 0.00}, 0.70),
    )
    assert select_setting(settings, ALIGNED, CONFIG, adapter=ADAPTER).chosen is None
    loose_gap = TuneConfig(max_asr_gap=0.1)
    assert select_setting(settings, ALIGNED, loose_gap, adapter=ADAPTER).chosen == 0.5
    loose_drop = TuneConfig(max_utility_drop=0.2)
    assert select_setting(settings, ALIGNED, loose_drop, adapter=ADAPTER).chosen == 1.0


def test_none_qualifies_because_still_unsafe():
    settings = sweep(
        (0.0, {"advbench-validation": 0.98, "airt-val": 1.0}, 0.80),
        (3.0, {"advbench-validation": 0.02, "airt-val": 0.30}, 0.79),
    )
    selection = select_setting(settings, ALIGNED, CONFIG, adapter=ADAPTER)
    assert selection.chosen is None and selection.index is None and not selection.qualified
    assert selection.summary.startswith("no setting qualifies: 2 of 2 settings keep an ASR")
    assert "airt-val" in selection.summary and "restore=3, is still unsafe" in selection.summary
    assert selection.to_dict()["qualified"] is False


def test_none_qualifies_because_too_costly():
    settings = sweep((2.0, {"advbench-validation": 0.0, "airt-val": 0.0}, 0.50))
    selection = select_setting(settings, ALIGNED, CONFIG, adapter=ADAPTER)
    assert selection.chosen is None
    assert "1 of 1 lose more than 5% of the adapter's utility" in selection.summary
    assert "--max-utility-drop" in selection.summary


def test_without_task_scores_utility_is_not_judged_and_a_note_says_so():
    settings = sweep(
        (0.5, {"advbench-validation": 0.2, "airt-val": 0.0}, None),
        (1.0, {"advbench-validation": 0.0, "airt-val": 0.0}, None),
    )
    adapter = scores({"advbench-validation": 0.9, "airt-val": 0.9})
    for ref in (adapter, None):
        selection = select_setting(settings, ALIGNED, CONFIG, adapter=ref)
        assert selection.chosen == 1.0
        assert selection.verdicts[1].utility_drop is None and selection.verdicts[1].utility_ok
        assert any("no task data" in n for n in selection.notes)


def test_loglik_breaks_the_tie_when_exact_match_says_nothing():
    # The adapter never matches exactly: every exact-match drop would be 0/0.
    adapter = scores({"advbench-validation": 0.9, "airt-val": 0.9}, utility=0.0, loglik=-1.00)
    safe = {"advbench-validation": 0.0, "airt-val": 0.0}
    settings = [
        ScoredSetting(1.0, scores(safe, utility=0.0, loglik=-1.12)),  # keeps exp(-0.12) = 88.7%
        ScoredSetting(2.0, scores(safe, utility=0.0, loglik=-1.02)),  # keeps 98.0%
    ]
    selection = select_setting(settings, ALIGNED, CONFIG, adapter=adapter)
    assert selection.chosen == 2.0
    assert [v.utility_basis for v in selection.verdicts] == ["loglik", "loglik"]
    assert selection.verdicts[0].utility_drop == pytest.approx(1 - math.exp(-0.12))
    assert selection.verdicts[1].utility_drop == pytest.approx(1 - math.exp(-0.02))
    assert any("log-likelihood" in n for n in selection.notes)


def test_a_setting_without_the_task_score_the_reference_has_does_not_qualify():
    settings = sweep((1.0, {"advbench-validation": 0.0, "airt-val": 0.0}, None))
    selection = select_setting(settings, ALIGNED, CONFIG, adapter=ADAPTER)
    assert selection.chosen is None
    assert not selection.verdicts[0].utility_ok


def test_inconsistent_inputs_are_refused():
    with pytest.raises(OptionError, match="no settings"):
        select_setting([], ALIGNED, CONFIG, adapter=ADAPTER)
    other = sweep((1.0, {"advbench-validation": 0.0}, 0.8))
    with pytest.raises(OptionError, match="harmful sources"):
        select_setting(other, ALIGNED, CONFIG, adapter=ADAPTER)
    with pytest.raises(OptionError, match="aligned"):
        select_setting(other, scores({}), CONFIG, adapter=ADAPTER)
