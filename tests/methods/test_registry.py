"""The method registry: one place for names, help, choices and config construction."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from csulora.errors import OptionError
from csulora.methods import METHODS, get_method, make_config, option_names, register, tunable_methods
from csulora.methods.base import CorrectionMethod, MethodConfig
from tests.toy_methods import Dampen


def method_files() -> list[str]:
    """The method files of csulora/methods (every file but the interface, registry and helpers)."""
    import csulora.methods as package
    from pathlib import Path

    folder = Path(package.__file__).parent
    return sorted(p.stem for p in folder.glob("*.py") if p.stem not in ("__init__", "base", "registry", "common"))


def test_every_method_file_registers_itself_and_nothing_else_does():
    """A method is its own file plus one import line: the registry itself imports no method."""
    import csulora.methods.registry as registry_module
    from pathlib import Path

    registered = {type(m).__module__.rsplit(".", 1)[1] for m in METHODS.values()}
    assert registered == set(method_files())
    assert "import" not in "".join(
        line for line in Path(registry_module.__file__).read_text().splitlines() if "csulora.methods." in line
        and "base" not in line
    )
    for name, method in METHODS.items():
        assert isinstance(method, CorrectionMethod)
        assert method.name == name and method.pretty_name
        assert issubclass(method.config_cls, MethodConfig)
        assert get_method(name) is method


def test_unknown_method_lists_the_choices():
    with pytest.raises(OptionError, match=", ".join(METHODS)):
        get_method("dare")


def test_every_option_has_help_and_choices_are_enforced():
    for method in METHODS.values():
        hints = typing.get_type_hints(method.config_cls)
        for field in dataclasses.fields(method.config_cls):
            assert field.metadata.get("help"), (method.name, field.name)
            assert field.name in hints
            for choice in field.metadata.get("choices", []):
                make_config(method, {field.name: choice, **({"factor": 0.5} if method.name == "scale" else {})})
            if "choices" in field.metadata:
                with pytest.raises(OptionError):
                    make_config(method, {field.name: "no-such-choice", **({"factor": 0.5} if method.name == "scale" else {})})


def test_flag_names_match_the_cli_contract():
    assert option_names(get_method("csulora")) == ("gamma", "schedule", "rank_mode", "restore")
    assert option_names(get_method("safelora")) == ("select", "num_layers", "threshold", "projection")
    assert option_names(get_method("scale")) == ("factor",)
    assert option_names(get_method("resta")) == ("restore",)


def test_make_config_keeps_defaults_for_options_not_given():
    config = make_config("csulora", {"gamma": 2.0, "restore": None, "num_layers": None})
    assert config.to_dict() == {"gamma": 2.0, "schedule": "energy", "rank_mode": "exact", "restore": 0.0}
    assert make_config("resta", {"restore": None}).restore == 1.0


def test_make_config_refuses_options_of_other_methods():
    with pytest.raises(OptionError, match="--gamma does not apply to --method safelora"):
        make_config("safelora", {"gamma": 1.0})


def test_numpy_scalars_from_a_sweep_grid_are_stored_as_plain_numbers():
    import numpy as np

    config = make_config("safelora", {"num_layers": np.int64(3), "threshold": np.float32(0.25)})
    assert type(config.num_layers) is int and type(config.threshold) is float
    assert type(make_config("csulora", {"gamma": np.float64(2)}).gamma) is float
    assert type(make_config("scale", {"factor": 1}).factor) is float


# -- a new method is one class plus one register() call -----------------------------------------
@pytest.fixture
def toy_method():
    method = register(Dampen())
    try:
        yield method
    finally:
        METHODS.pop(method.name)


@pytest.mark.usefixtures("keyword_asr")  # the tiny attack shows only to keywords
def test_a_registered_toy_method_is_tuned_without_touching_tuning(toy_method, tiny_world, tune_data, tmp_path):
    from csulora.tuning.config import TuneConfig
    from csulora.tuning.runner import tune_adapter

    assert "toy-dampen" in tunable_methods()
    w, d = tiny_world, tune_data
    config = TuneConfig(method="toy-dampen", max_new_tokens=16, max_utility_drop=1.0)
    result = tune_adapter(
        w.attacked, tmp_path / "tuned", aligned=w.aligned, base=w.base, config=config,
        harmful=[str(d["advbench"]), str(d["airt"])], task=str(d["task"]), progress=False,
    )  # fmt: skip
    rows = result.record["settings"]
    assert [row["value"] for row in rows] == [0.0, 1.0]
    assert rows[0]["same_as_adapter"]  # the identity setting is not generated again
    # strength 1 deletes the adapter: the aligned model's own answers, so it qualifies
    assert rows[1]["scores"]["asr"] == result.record["aligned"]["asr"]
    assert result.qualified and result.chosen_params == {"strength": 1.0}


def test_registering_a_second_method_of_the_same_name_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register(get_method("resta").__class__())
