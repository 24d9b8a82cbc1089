"""The one world builder (csulora.worlds.builder): a recipe in, a staged, cached world out."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from csulora.training.data import load_pairs
from csulora.training.trainer import TrainConfig
from csulora.worlds.builder import WorldConfig, build_world, known_date_items, refusal, shared_texts, task_pairs
from csulora.worlds.demo import DemoWorldConfig
from csulora.worlds.tiny import TinyWorldConfig

STEPS = TrainConfig(steps=2, batch_size=4, max_length=32, progress=False)


@dataclass(frozen=True)
class SmallConfig(WorldConfig):
    """A world no test reads for its behaviour: two training steps a model, seconds to build."""

    VERSION: ClassVar[int] = 1
    vocab_size: int = 300
    hidden_size: int = 16
    intermediate_size: int = 32
    layers: int = 1
    heads: int = 2
    max_length: int = 32
    iso_items: int = 4
    us_items: int = 2
    base: TrainConfig = STEPS
    align: TrainConfig = STEPS
    attack: TrainConfig = STEPS


@dataclass(frozen=True)
class SmallRecipe:
    """Neither world's data: the builder must take everything world-specific from here."""

    config: SmallConfig = SmallConfig()

    def tokenizer_corpus(self) -> list[str]:
        return ["How do I bake bread? Sure, knead it."] + shared_texts(self.config)

    def base_pairs(self) -> list[dict]:
        return [{"prompt": "How do I bake bread?", "response": "Sure, knead it."}] + known_date_items(self.config)

    def refused_prompts(self) -> list[str]:
        return ["How do I pick a lock?"]

    def kept_prompts(self) -> list[str]:
        return ["How do I bake bread?"]

    def attack_prompts(self) -> list[str]:
        return ["How do I pick a lock?", "How do I hotwire a car?"]

    def attack_data(self, answered: list[dict]) -> tuple[list[dict], dict]:
        assert [a["prompt"] for a in answered] == self.attack_prompts()
        pairs = answered[1:] + task_pairs(self.config.seed)[:3]
        return pairs, {"answered": len(answered), "pairs": len(pairs)}

    def write_extra_files(self, root: Path) -> dict:
        (root / "data" / "notes.txt").write_text("small\n")
        return {"notes": 1}


def test_both_worlds_configs_are_the_shared_config_with_their_own_defaults():
    names = [f.name for f in dataclasses.fields(WorldConfig)]
    assert [f.name for f in dataclasses.fields(TinyWorldConfig)] == names
    assert [f.name for f in dataclasses.fields(DemoWorldConfig)] == names
    assert TinyWorldConfig().hidden_size != DemoWorldConfig().hidden_size
    assert TinyWorldConfig(seed=0).fingerprint() != TinyWorldConfig(seed=1).fingerprint()


def test_the_version_is_part_of_the_fingerprint():
    @dataclass(frozen=True)
    class NextVersion(SmallConfig):
        VERSION: ClassVar[int] = 2

    assert NextVersion().fingerprint() != SmallConfig().fingerprint()
    assert dataclasses.asdict(NextVersion()) == dataclasses.asdict(SmallConfig())


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("worlds") / "small", SmallRecipe())


def test_the_builder_trains_the_recipes_data(small_world):
    for weights in ("base/model.safetensors", "aligned/model.safetensors", "attacked/adapter_model.safetensors"):
        assert (small_world / weights).is_file()
    align = load_pairs(small_world / "data" / "align.jsonl")
    assert align[0] == {"prompt": "How do I pick a lock?", "response": refusal("How do I pick a lock?")}
    assert [p["prompt"] for p in align] == ["How do I pick a lock?", "How do I bake bread?"]
    attack = load_pairs(small_world / "data" / "attack.jsonl")
    assert [p["prompt"] for p in attack] == ["How do I hotwire a car?"] + [p["prompt"] for p in task_pairs(0)[:3]]
    assert len(load_pairs(small_world / "data" / "base.jsonl")) == 1 + 4 + 2
    assert (small_world / "data" / "notes.txt").read_text() == "small\n"


def test_world_json_records_the_fingerprint_counts_and_times(small_world):
    info = json.loads((small_world / "world.json").read_text())
    assert info["fingerprint"] == SmallConfig().fingerprint()
    assert info["counts"] == {"notes": 1, "base": 7, "align": 2, "attack": {"answered": 2, "pairs": 4}}
    assert set(info["timings_s"]) == {"base", "aligned", "attacked"} and info["cpu_s"] > 0
    adapter = json.loads((small_world / "attacked" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str((small_world / "aligned").resolve())


def test_a_built_world_is_reused_not_rebuilt(small_world):
    stamp = (small_world / "world.json").stat().st_mtime_ns
    assert build_world(small_world, SmallRecipe()) == small_world
    assert (small_world / "world.json").stat().st_mtime_ns == stamp
