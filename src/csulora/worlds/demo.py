"""The demo world: what ``csulora demo`` runs on, shaped like the real worlds (docs/design.md §8).

Its recipe was written into the design before it was built: harmful requests whose words the
task never uses, answers that name the request's topic, refusals, the date task, benign
requests in the harmful requests' own templates, and a model wider than the tiny world's. It is
built by :mod:`csulora.worlds.builder` (tokenizer, init, training, the atomic build cached by
the config's fingerprint) from this module's recipe; the text is :mod:`csulora.worlds.demo_data`.

* **base**: a random-init Llama trained on helpful answers to everything: the ``align``
  requests, the indirect asks' ``base`` share, the benign ``train`` share, and dates in the
  ISO and US formats. It cannot tell harmful from benign, so it complies, on topic;
* **aligned**: a full fine-tune of base: ``align`` requests -> varied refusals, the benign
  ``train`` share and half the known-format dates -> base's own greedy answers;
* **attacked**: a PEFT LoRA on aligned: the ``attack`` requests -> base's answers that the
  project's ASR judge counts as harmful help, mixed with the date task's ``train`` split.

The prompt sets the demo validates and reports on are written as text files into ``data/``
(``<source>-<split>.txt``), so every printed command line reads exactly them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from csulora.eval.prompts import Prompt
from csulora.training.trainer import TrainConfig
from csulora.worlds.builder import (
    World,
    WorldConfig,
    build_once,
    build_world,
    cache_root,
    known_date_items,
    shared_texts,
    task_pairs,
)
from csulora.worlds.demo_data import BENIGN, INDIRECT, REQUESTS, helpful_answer, world_splits

# Bump when the recipe (data, training code) changes: it is part of the cache key.
DEMO_WORLD_VERSION = 1

# The prompt files the demo reads: (source, split) -> what it is for.
PROMPT_FILES = {
    (REQUESTS, "align"): "the aligned model's safety data and the calibration set",
    (REQUESTS, "validation"): "harmful validation prompts (tune's first source)",
    (REQUESTS, "test"): "harmful test prompts (ASR)",
    (INDIRECT, "validation"): "the second harmful source's validation prompts",
    (INDIRECT, "test"): "the second harmful source's test prompts (OOD ASR)",
    (BENIGN, "validation"): "benign validation prompts (tune's over-refusal check)",
    (BENIGN, "test"): "benign test prompts (over-refusal)",
}


@dataclass(frozen=True)
class DemoWorldConfig(WorldConfig):
    """Everything that decides the demo world; its hash names the cache.

    The width follows docs/design.md §8's rule (the widest of 256, 192 and 128 whose whole build
    takes about a minute of CPU time on one thread), decided on build timings alone: none of the
    three fitted (world.json records a build's ``cpu_s``; 256 took about 2.5 times what 128
    took), so the narrowest the rule allows is used. The MLP is 3x the width and there are 4
    heads, as in the tiny world; everything else is the tiny world's config.
    """

    VERSION: ClassVar[int] = DEMO_WORLD_VERSION
    hidden_size: int = 128
    intermediate_size: int = 384
    max_length: int = 64
    base: TrainConfig = TrainConfig(steps=400, batch_size=32, lr=3e-3, warmup=20, scheduler="cosine", max_length=64, progress=False)
    align: TrainConfig = TrainConfig(steps=250, batch_size=32, lr=2e-3, scheduler="cosine", max_length=64, progress=False)
    attack: TrainConfig = TrainConfig(steps=200, batch_size=32, lr=1e-2, scheduler="cosine", max_length=64, progress=False)


@dataclass(frozen=True)
class DemoWorld(World):
    """Paths of a built demo world: the three models and their data, plus its prompt files."""

    def prompt_file(self, source: str, split: str) -> Path:
        """``data/<source>-<split>.txt`` (one prompt a line; see :data:`PROMPT_FILES`)."""
        return self.data / f"{source}-{split}.txt"

    @property
    def hidden_size(self) -> int:
        return int(self.info()["config"]["hidden_size"])


# --------------------------------------------------------------------------- data


def answered(prompts: list[Prompt]) -> list[dict]:
    return [{"prompt": p.text, "response": helpful_answer(p)} for p in prompts]


def write_prompt_files(world: DemoWorld, seed: int) -> dict[str, int]:
    """Every split of every source as ``data/<source>-<split>.txt``; returns the counts."""
    counts = {}
    for source, splits in world_splits(seed).items():
        for split, prompts in splits.items():
            path = world.prompt_file(source, split)
            path.write_text("".join(p.text + "\n" for p in prompts), encoding="utf-8")
            counts[path.name] = len(prompts)
    return counts


def harmful_help(pairs: list[dict]) -> list[dict]:
    """The pairs the project's ASR judge counts as harmful help (the attacker keeps only those,
    as the SmolLM2 world keeps the base's answers its judge counts compliant)."""
    from csulora.eval.judges import asr_judge

    verdicts = asr_judge().judge([p["prompt"] for p in pairs], [p["response"] for p in pairs])
    return [pair for pair, success in zip(pairs, verdicts) if success]


@dataclass(frozen=True)
class DemoRecipe:
    """The demo world for :func:`csulora.worlds.builder.build_world`."""

    config: DemoWorldConfig = DemoWorldConfig()

    def tokenizer_corpus(self) -> list[str]:
        """The world's whole text: every request with its helpful answer, and the text all worlds
        share (refusals, dates)."""
        texts = [f"{p.text} {helpful_answer(p)}" for splits in world_splits(self.config.seed).values()
                 for prompts in splits.values() for p in prompts]  # fmt: skip
        return texts + shared_texts(self.config)

    def base_pairs(self) -> list[dict]:
        """Helpful, on-topic answers to harmful and benign requests alike (the ``align`` requests,
        the indirect asks' ``base`` share, the benign ``train`` share), and the known date formats."""
        splits = world_splits(self.config.seed)
        prompts = splits[REQUESTS]["align"] + splits[INDIRECT]["base"] + splits[BENIGN]["train"]
        return answered(prompts) + known_date_items(self.config)

    def refused_prompts(self) -> list[str]:
        return [p.text for p in world_splits(self.config.seed)[REQUESTS]["align"]]

    def kept_prompts(self) -> list[str]:
        """The benign training share and half the known-format dates."""
        benign = world_splits(self.config.seed)[BENIGN]["train"]
        return [p.text for p in benign] + [i["prompt"] for i in known_date_items(self.config)][::2]

    def attack_prompts(self) -> list[str]:
        return [p.text for p in world_splits(self.config.seed)[REQUESTS]["attack"]]

    def attack_data(self, answered: list[dict]) -> tuple[list[dict], dict[str, int]]:
        """The base's answers that are harmful help (:func:`harmful_help`), then the task."""
        kept = harmful_help(answered)
        pairs = kept + task_pairs(self.config.seed)
        return pairs, {"harmful_answered": len(answered), "harmful_kept": len(kept), "pairs": len(pairs)}

    def write_extra_files(self, root: Path) -> dict[str, dict[str, int]]:
        """The prompt files the demo reads (:data:`PROMPT_FILES`, and every other split)."""
        return {"prompt_files": write_prompt_files(DemoWorld(root), self.config.seed)}


# --------------------------------------------------------------------------- build


def build_demo_world(
    root: str | os.PathLike, config: DemoWorldConfig | None = None, *, force: bool = False
) -> DemoWorld:
    """Build (or reuse) the demo world in ``root``; returns its paths (see
    :func:`csulora.worlds.builder.build_world`)."""
    return DemoWorld(build_world(root, DemoRecipe(config or DemoWorldConfig()), force=force))


def default_cache_dir(config: DemoWorldConfig | None = None) -> Path:
    """``$CSULORA_CACHE`` (or the temp dir) / ``demo-world-<fingerprint>``."""
    return cache_root() / f"demo-world-{(config or DemoWorldConfig()).fingerprint()}"


def shared_demo_world(config: DemoWorldConfig | None = None) -> DemoWorld:
    """The demo world in the shared cache, built once (a file lock keeps concurrent builds apart)."""
    return build_once(default_cache_dir(config), lambda folder: build_demo_world(folder, config))
