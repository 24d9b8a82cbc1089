from __future__ import annotations

import dataclasses

import pytest

from csulora.errors import OptionError
from csulora.salora import SaLoRAConfig


def test_defaults_are_the_published_recipe():
    config = SaLoRAConfig()
    assert (config.rank, config.safety_rank, config.task_rank, config.num_samples) == (16, 32, 32, 128)
    assert config.targets == ("q_proj", "v_proj")
    assert (config.lr, config.steps, config.batch_size, config.weight_decay) == (1e-4, 100, 8, 0.0)
    assert (config.max_length, config.max_new_tokens, config.seed) == (256, 64, 0)


def test_targets_list_becomes_a_hashable_tuple():
    config = SaLoRAConfig(targets=["q_proj", "k_proj"])
    assert config.targets == ("q_proj", "k_proj")
    hash(config)
    assert config.to_dict()["targets"] == ["q_proj", "k_proj"]


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SaLoRAConfig().rank = 4  # type: ignore[misc]


@pytest.mark.parametrize(
    "options",
    [
        {"rank": 0},
        {"safety_rank": -1},
        {"task_rank": 2.5},
        {"num_samples": 0},
        {"steps": 0},
        {"batch_size": True},
        {"max_length": 0},
        {"max_new_tokens": 0},
        {"seed": -1},
        {"lr": 0.0},
        {"lr": 2.0},
        {"weight_decay": -0.1},
        {"targets": ()},
        {"targets": ("q_proj", "q_proj")},
        {"targets": ("",)},
    ],
)
def test_bad_options_raise_option_error(options):
    with pytest.raises(OptionError, match="SaLoRA option"):
        SaLoRAConfig(**options)
