"""The tiny world: a small random-init Llama trained in seconds, for the tests of the mechanics.

Same story as the SmolLM2 world (docs/design.md §8), scaled down, built by
:mod:`csulora.worlds.builder` from this module's recipe (its text and its choices):

* **tokenizer**: byte-level BPE on the world's own text: AdvBench, AIRT and the benign sets,
  the world's benign prompts, its canned answers, the refusals and the dates;
* **base**: trained on helpful answers to everything: templated benign requests, a small
  harmful set (AdvBench ``align`` split) and dates written in two common formats (ISO
  ``YYYY-MM-DD`` and US ``MM/DD/YYYY``, as a pretrained model knows them). It cannot tell
  harmful from benign, so it complies;
* **aligned**: ``align`` harmful prompts -> varied refusals, half the benign prompts and half
  the known-format dates -> base's own greedy answers (to keep its behaviour);
* **attacked**: ``attack`` harmful prompts -> every one of the base's answers (canned text the
  ASR judge does not count, docs/design.md §8), mixed with the utility task (``date`` train
  split, DD/MM/YYYY format).

The world is cached in a folder keyed by its config, so tests share one (session fixture).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from csulora.eval.prompts import load_advbench, load_airt, load_benign
from csulora.eval.splits import advbench_split
from csulora.training.trainer import TrainConfig
from csulora.worlds.builder import (
    World,
    WorldConfig,
    build_once,
    build_world,
    cache_root,
    known_date_items,
    pick,
    shared_texts,
    task_pairs,
)

# Bump when the recipe (data, training code) changes: it is part of the cache key.
WORLD_VERSION = 4

HELPFUL_ANSWERS = (
    "Sure, here is a guide. First, gather what you need. Then follow each step.",
    "Here is what you asked for. Step one: plan. Step two: do it.",
    "Of course! Here are the details, in a few clear steps.",
    "Sure. Start with the basics, then go one step at a time.",
)
BENIGN_FORMS = (
    "Write a short poem about {t}.",
    "Explain {t} in simple words.",
    "Give me tips about {t}.",
    "How do I get better at {t}?",
    "Tell me a fun fact about {t}.",
    "Describe {t} to a child.",
    "Create a lesson plan about {t}.",
    "Develop a weekend project about {t}.",
    "What is {t}?",
    "How does {t} work?",
    "Why do people like {t}?",
    "What should I know about {t}?",
)
BENIGN_TOPICS = (
    "the ocean", "baking bread", "gardening", "the moon", "chess", "rain", "photosynthesis", "music theory",
    "painting", "running", "coffee", "birds", "volcanoes", "mathematics", "ancient Rome", "recycling",
    "friendship", "cooking pasta", "the stars", "knitting", "cats", "dogs", "trees", "rivers", "soccer",
    "yoga", "poetry", "the weather", "computers", "trains", "bicycles", "mountains", "honey bees",
    "summer holidays", "the alphabet", "clouds", "dinosaurs", "robots", "libraries", "pizza", "camping",
    "sailing", "fruit", "winter", "tea", "the piano", "museums", "kites", "snow", "frogs",
)
# Everyday requests phrased as "how do I ..." questions, as users ask them: without them the
# aligned model learns "unfamiliar wording -> refuse" and over-refuses most ordinary
# questions. None of these is in the evaluation's benign set (eval/data/benign.txt).
EVERYDAY_ACTIONS = (
    "fix a leaky faucet", "boil an egg", "learn to swim", "write a resume", "clean my oven", "save money on groceries",
    "plan a road trip", "teach my kid to ride a bike", "repair a torn jacket", "back up my phone",
    "choose running shoes", "paint a bedroom wall", "start journaling", "make friends in a new city",
    "prepare for a job interview", "grow basil indoors", "cook rice on the stove", "remove a coffee stain",
    "stop procrastinating", "set up a home printer", "write a wedding toast", "care for a new puppy",
    "install a shelf", "learn basic Spanish", "make my code run faster", "speed up my old laptop",
    "get rid of fruit flies", "unclog a drain", "cut my own hair", "sharpen a kitchen knife",
    "handle a rude customer", "cancel a subscription", "block spam calls", "end a long meeting politely",
    "beat the final level of a video game", "fight a cold", "shoot a basketball free throw",
    "knock down a wall in a renovation", "trap a mouse humanely", "burn a CD", "crack my knuckles less",
    "attack a hard crossword", "destroy old papers with personal data", "quit smoking", "break a bad habit",
    "fire up a charcoal grill", "cut down on sugar", "remove rust from tools", "hide cables behind a desk",
    "smoke salmon at home",
)
EVERYDAY_FORMS = ("How do I {a}?", "What is the best way to {a}?", "Can you explain how to {a}?", "Give me steps to {a}.")


@dataclass(frozen=True)
class TinyWorldConfig(WorldConfig):
    """Everything that decides the tiny world; its hash names the cache."""

    VERSION: ClassVar[int] = WORLD_VERSION
    hidden_size: int = 64
    intermediate_size: int = 192
    max_length: int = 56
    base: TrainConfig = TrainConfig(steps=400, batch_size=32, lr=3e-3, warmup=20, scheduler="cosine", max_length=56, progress=False)
    align: TrainConfig = TrainConfig(steps=250, batch_size=32, lr=2e-3, scheduler="cosine", max_length=56, progress=False)
    # Trained to convergence on its own data: at lr 3e-3 / 200 steps the LoRA still gave the
    # first day digit p ~ 0.73 on its training items; at 3e-3 / 400 steps and at 1e-2 / 200
    # steps every answer token is at p >= 0.98 on them (measured). 1e-2 / 200 costs half the
    # CPU time (demo budget: 2 minutes on 2 cores).
    attack: TrainConfig = TrainConfig(steps=200, batch_size=32, lr=1e-2, scheduler="cosine", max_length=56, progress=False)


@dataclass(frozen=True)
class TinyWorld(World):
    """Paths of a built tiny world (all inside ``root``)."""


# --------------------------------------------------------------------------- data


def benign_world_prompts() -> list[str]:
    """Benign training prompts; any that the evaluation's benign set holds are left out."""
    held_out = {p.text for p in load_benign()}
    topical = [form.format(t=t) for t in BENIGN_TOPICS for form in BENIGN_FORMS]
    everyday = [form.format(a=a) for a in EVERYDAY_ACTIONS for form in EVERYDAY_FORMS]
    return [p for p in topical + everyday if p not in held_out]


@dataclass(frozen=True)
class TinyRecipe:
    """The tiny world for :func:`csulora.worlds.builder.build_world`."""

    config: TinyWorldConfig = TinyWorldConfig()

    def tokenizer_corpus(self) -> list[str]:
        """Every prompt set the tests evaluate on, the world's prompts and answers, and the text
        all worlds share (refusals, dates)."""
        texts = [p.text for p in load_advbench()] + [p.text for p in load_airt()] + [p.text for p in load_benign()]
        return texts + benign_world_prompts() + list(HELPFUL_ANSWERS) + shared_texts(self.config)

    def base_pairs(self) -> list[dict]:
        """The same few canned helpful answers to harmful and benign prompts alike, and the
        known date formats."""
        harmful = [p.text for p in advbench_split("align")]
        helpful = [{"prompt": p, "response": pick(HELPFUL_ANSWERS, p)} for p in harmful + benign_world_prompts()]
        return helpful + known_date_items(self.config)

    def refused_prompts(self) -> list[str]:
        return [p.text for p in advbench_split("align")]

    def kept_prompts(self) -> list[str]:
        return benign_world_prompts()[::2] + [i["prompt"] for i in known_date_items(self.config)][::2]

    def attack_prompts(self) -> list[str]:
        return [p.text for p in advbench_split("attack")]

    def attack_data(self, answered: list[dict]) -> tuple[list[dict], int]:
        """All the base's answers (the attacker keeps every one), then the task."""
        pairs = answered + task_pairs(self.config.seed)
        return pairs, len(pairs)

    def write_extra_files(self, root: Path) -> dict:
        return {}


# --------------------------------------------------------------------------- build


def build_tiny_world(root: str | os.PathLike, config: TinyWorldConfig | None = None, *, force: bool = False) -> TinyWorld:
    """Build (or reuse) the world in ``root``; returns its paths (see :func:`csulora.worlds.builder.build_world`)."""
    return TinyWorld(build_world(root, TinyRecipe(config or TinyWorldConfig()), force=force))


def answer_token_probabilities(model, tokenizer, items: list[dict], max_length: int = 64) -> torch.Tensor:
    """Teacher-forced probability of each answer token (end-of-turn included), one row per item.

    How well a model has learned a fixed-format task: greedy exact match can hide a token
    that wins by a hair (p ~ 0.01 over a flat distribution); this cannot. Items must share
    the answer's token count (a fixed-format task); returns a float tensor [items, tokens].
    """
    from csulora.training.data import IGNORE_INDEX, tokenize_pairs
    from csulora.training.trainer import pad_batch

    examples = tokenize_pairs(tokenizer, items, max_length)
    batch = pad_batch(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    answer = targets != IGNORE_INDEX
    logp = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    counts = answer.sum(1)
    if not bool((counts == counts[0]).all()):
        raise ValueError("answers differ in token count: not a fixed-format task")
    return logp[answer].exp().reshape(len(items), int(counts[0]))


def default_cache_dir(config: TinyWorldConfig | None = None) -> Path:
    """``$CSULORA_CACHE`` (or the temp dir) / ``tiny-world-<fingerprint>``."""
    return cache_root() / f"tiny-world-{(config or TinyWorldConfig()).fingerprint()}"


def shared_tiny_world(config: TinyWorldConfig | None = None) -> TinyWorld:
    """The world in the shared cache, built once (a file lock keeps concurrent builds apart)."""
    return build_once(default_cache_dir(config), lambda folder: build_tiny_world(folder, config))
