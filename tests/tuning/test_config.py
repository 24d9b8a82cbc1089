"""TuneConfig and grid parsing: defaults, weakest-first order, and one-line option errors."""

from __future__ import annotations

import pytest

from csulora.errors import OptionError
from csulora.methods.registry import get_method, tunable_methods
from csulora.tuning.config import DEFAULT_METHOD, TuneConfig, parse_grid


def test_default_grids_are_the_issue_grids_weakest_first():
    assert TuneConfig().method == DEFAULT_METHOD
    assert TuneConfig(method="resta").grid == (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
    assert TuneConfig(method="csulora").grid == (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
    assert TuneConfig(method="safelora").grid == (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5)
    # scaling: factor 1 is the adapter itself, so it is the weakest
    assert TuneConfig(method="scale").grid == (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)


def test_user_grid_is_sorted_weakest_first():
    assert TuneConfig(method="resta", grid=(2, 0.5, 1)).grid == (0.5, 1.0, 2.0)
    assert TuneConfig(method="scale", grid=(0.5, 1.0, 0.7)).grid == (1.0, 0.7, 0.5)


def test_knobs_and_setting_options():
    assert {m: get_method(m).tuning.knob for m in tunable_methods()}.items() >= {
        "resta": "restore",
        "csulora": "gamma",
        "safelora": "threshold",
        "scale": "factor",
    }.items()
    config = TuneConfig(method="csulora", method_options={"restore": 1.5})
    assert config.setting_options(4.0) == {"restore": 1.5, "gamma": 4.0}
    # Safe LoRA's threshold only acts in threshold mode, so tune forces it
    assert TuneConfig(method="safelora").setting_options(0.3) == {"select": "threshold", "threshold": 0.3}
    assert TuneConfig(method="safelora").to_dict()["method_options"] == {"select": "threshold"}


def test_parse_grid():
    assert parse_grid("0, 0.5,1") == (0.0, 0.5, 1.0)
    assert parse_grid("-1") == (-1.0,)
    for bad in ("", "  ", "1,,2", "1,", "a,1", "1;2"):
        with pytest.raises(OptionError, match="--grid"):
            parse_grid(bad)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"grid": ()}, "empty"),
        ({"grid": (1.0, 1.0)}, "twice"),
        ({"grid": (float("nan"),)}, "finite"),
        ({"grid": (float("inf"),)}, "finite"),
        ({"method": "resta", "grid": (0.0, -0.5)}, "-0.5"),  # RESTA beta < 0
        ({"method": "scale", "grid": (1.0, 1.5)}, "1.5"),  # factor outside [0, 1]
        ({"method": "scale", "grid": (-0.1,)}, "-0.1"),
        ({"method": "csulora", "grid": (-1.0,)}, "-1"),  # gamma < 0
        ({"method": "csulora", "method_options": {"restore": -1.0}}, "restore"),
        ({"method": "safelora", "grid": (0.2, 1.5)}, "1.5"),  # threshold outside [-1, 1]
        ({"method": "nonsense"}, "cannot be tuned"),
        ({"method": "resta", "method_options": {"restore": 1.0}}, "knob"),
        ({"method": "safelora", "method_options": {"select": "number"}}, "select"),
        ({"method": "csulora", "method_options": {"no_such_option": 1}}, "does not apply"),
        ({"method": "all", "grid": (1.0,)}, "--grid is refused with --method all"),
        ({"method": "all", "method_options": {"restore": 1.0}}, "fixed options"),
        ({"max_asr_gap": 1.5}, "--max-asr-gap"),
        ({"max_fluency_loss": -0.1}, "max_fluency_loss"),
        ({"max_fluency_loss": float("inf")}, "max_fluency_loss"),
        ({"max_asr_gap": -0.01}, "--max-asr-gap"),
        ({"max_utility_drop": float("nan")}, "--max-utility-drop"),
        ({"max_new_tokens": 0}, "--max-new-tokens"),
        ({"batch_size": 0}, "batch size"),
    ],
)
def test_bad_options_raise_one_line_option_errors(kwargs, match):
    with pytest.raises(OptionError, match=match) as info:
        TuneConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_config_is_frozen():
    config = TuneConfig()
    with pytest.raises(AttributeError):
        config.method = "scale"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.method_options["restore"] = 1.0  # type: ignore[index]


def test_generation_defaults_are_evals():
    from csulora.eval import generation

    config = TuneConfig()
    assert (config.max_new_tokens, config.batch_size) == (
        generation.DEFAULT_MAX_NEW_TOKENS,
        generation.DEFAULT_BATCH_SIZE,
    )


def test_all_sweeps_every_tunable_method_over_its_default_grid():
    config = TuneConfig(method="all", max_asr_gap=0.1)
    assert config.is_all and config.grid is None
    configs = config.method_configs()
    assert [c.method for c in configs] == list(tunable_methods())
    for c in configs:
        assert c.grid == TuneConfig(method=c.method).grid and c.max_asr_gap == 0.1 and not c.is_all
    assert TuneConfig(method="resta").method_configs() == (TuneConfig(method="resta"),)
    assert config.to_dict()["methods"] == list(tunable_methods())
    with pytest.raises(OptionError, match="method_configs"):
        config.knob
