"""The demo world: what ``csulora demo`` runs on, shaped like the real worlds (docs/design.md §8).

Its recipe was written into the design before it was built: harmful requests whose words the
task never uses, answers that name the request's topic, refusals, the date task, benign
requests in the harmful requests' own templates, and a model wider than the tiny world's. The
machinery is the tiny world's (:mod:`csulora.worlds.tiny`: tokenizer, init, training, the
atomic build cached by the config's fingerprint); the text is :mod:`csulora.worlds.demo_data`.

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

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from csulora.eval.prompts import Prompt
from csulora.eval.tasks import date_task_splits
from csulora.io.atomic import atomic_output_dir
from csulora.training.data import write_pairs
from csulora.training.trainer import LoraSettings, TrainConfig, fit, train_full, train_lora
from csulora.worlds.demo_data import BENIGN, INDIRECT, REQUESTS, helpful_answer, world_splits
from csulora.worlds.tiny import (
    REFUSALS,
    RUNS_ON,
    WORLD_FILE,
    TinyWorld,
    already_built,
    bpe_tokenizer,
    build_once,
    cache_root,
    init_model,
    iso_items,
    one_thread,
    pick,
    relocate_records,
    us_items,
)

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
class DemoWorldConfig:
    """Everything that decides the demo world; its hash names the cache.

    The width follows docs/design.md §8's rule (the widest of 256, 192 and 128 whose whole build
    takes about a minute of CPU time on one thread), decided on build timings alone: none of the
    three fitted (world.json records a build's ``cpu_s``; 256 took about 2.5 times what 128
    took), so the narrowest the rule allows is used. The MLP is 3x the width and there are 4
    heads, as in the tiny world; everything else is the tiny world's recipe.
    """

    seed: int = 0
    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 384
    layers: int = 2
    heads: int = 4
    max_length: int = 64
    iso_items: int = 300
    us_items: int = 150
    base: TrainConfig = TrainConfig(steps=400, batch_size=32, lr=3e-3, warmup=20, scheduler="cosine", max_length=64, progress=False)
    align: TrainConfig = TrainConfig(steps=250, batch_size=32, lr=2e-3, scheduler="cosine", max_length=64, progress=False)
    attack: TrainConfig = TrainConfig(steps=200, batch_size=32, lr=1e-2, scheduler="cosine", max_length=64, progress=False)
    attack_lora: LoraSettings = LoraSettings(r=8, alpha=16)

    def fingerprint(self) -> str:
        blob = json.dumps({"version": DEMO_WORLD_VERSION, **dataclasses.asdict(self)}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class DemoWorld(TinyWorld):
    """Paths of a built demo world: the tiny world's folders, plus its prompt files."""

    def prompt_file(self, source: str, split: str) -> Path:
        """``data/<source>-<split>.txt`` (one prompt a line; see :data:`PROMPT_FILES`)."""
        return self.data / f"{source}-{split}.txt"

    @property
    def hidden_size(self) -> int:
        return int(self.info()["config"]["hidden_size"])


# --------------------------------------------------------------------------- data


def known_date_items(config: DemoWorldConfig) -> list[dict]:
    """The date formats the base knows (ISO and US), on dates outside the task's splits."""
    return iso_items(config.iso_items, config.seed) + us_items(config.us_items, config.seed, skip=config.iso_items)


def answered(prompts: list[Prompt]) -> list[dict]:
    return [{"prompt": p.text, "response": helpful_answer(p)} for p in prompts]


def base_pairs(config: DemoWorldConfig) -> list[dict]:
    """What the base learns: helpful, on-topic answers to harmful and benign requests alike,
    and the known date formats."""
    splits = world_splits(config.seed)
    prompts = splits[REQUESTS]["align"] + splits[INDIRECT]["base"] + splits[BENIGN]["train"]
    return answered(prompts) + known_date_items(config)


def tokenizer_corpus(config: DemoWorldConfig) -> list[str]:
    """The world's whole text: every request with its helpful answer, the refusals, the dates."""
    texts = [f"{p.text} {helpful_answer(p)}" for splits in world_splits(config.seed).values()
             for prompts in splits.values() for p in prompts]  # fmt: skip
    texts += list(REFUSALS)
    for items in date_task_splits(config.seed).values():
        texts += [i["prompt"] + " " + i["response"] for i in items]
    return texts + [i["prompt"] + " " + i["response"] for i in known_date_items(config)]


def refusal(prompt: str) -> str:
    return pick(REFUSALS, prompt)


def write_prompt_files(world: DemoWorld, seed: int) -> dict[str, int]:
    """Every split of every source as ``data/<source>-<split>.txt``; returns the counts."""
    counts = {}
    for source, splits in world_splits(seed).items():
        for split, prompts in splits.items():
            path = world.prompt_file(source, split)
            path.write_text("".join(p.text + "\n" for p in prompts), encoding="utf-8")
            counts[path.name] = len(prompts)
    return counts


# --------------------------------------------------------------------------- build


def build_demo_world(
    root: str | os.PathLike, config: DemoWorldConfig | None = None, *, force: bool = False
) -> DemoWorld:
    """Build (or reuse) the demo world in ``root``; returns its paths.

    A folder holding a world of the same config fingerprint is reused as is; anything else is
    rebuilt in a temporary folder and renamed into place at the end.
    """
    config = config or DemoWorldConfig()
    world = DemoWorld(Path(root))
    if already_built(world.root, config.fingerprint()) and not force:
        relocate_records(world.root, world.root)
        return world
    timings: dict[str, float] = {}
    cpu_start = time.process_time()
    with one_thread(), atomic_output_dir(world.root, force=True) as tmp:
        staged = DemoWorld(tmp)
        staged.data.mkdir()
        counts = {"prompt_files": write_prompt_files(staged, config.seed), "base": _build_base(staged, config, timings)}
        compliant, counts["align"] = _build_aligned(staged, config, timings)
        counts["attack"] = _build_attack(staged, config, compliant, timings)
        relocate_records(tmp, world.root)
        info = {
            "fingerprint": config.fingerprint(),
            "config": dataclasses.asdict(config),
            "timings_s": {k: round(v, 2) for k, v in timings.items()},
            "cpu_s": round(time.process_time() - cpu_start, 2),
            "counts": counts,
        }
        (tmp / WORLD_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
    return world


def _build_base(staged: DemoWorld, config: DemoWorldConfig, timings: dict[str, float]) -> int:
    """The base: a fresh tokenizer and a small Llama trained on the base pairs."""
    from csulora.training.data import tokenize_pairs

    t0 = time.perf_counter()
    tokenizer = bpe_tokenizer(tokenizer_corpus(config), config.vocab_size)
    model = init_model(config, tokenizer)
    pairs = base_pairs(config)
    write_pairs(staged.data / "base.jsonl", pairs)
    fit(model, tokenizer, tokenize_pairs(tokenizer, pairs, config.max_length), config.base)
    model.save_pretrained(staged.base, safe_serialization=True)
    tokenizer.save_pretrained(staged.base)
    timings["base"] = time.perf_counter() - t0
    return len(pairs)


def _build_aligned(staged: DemoWorld, config: DemoWorldConfig, timings: dict[str, float]) -> tuple[list[dict], int]:
    """The aligned model: refusals on the ``align`` requests; the base's own answers on the benign
    training share and half the known-format dates kept. Returns the base's answers to the
    ``attack`` requests (prompt/response pairs, before the judge's filter) and the alignment data's size."""
    from csulora.eval.generation import generate_responses
    from csulora.io.modeling import load_model

    t0 = time.perf_counter()
    splits = world_splits(config.seed)
    base_model, base_tok = load_model(staged.base, **RUNS_ON)
    keep_prompts = [p.text for p in splits[BENIGN]["train"]] + [i["prompt"] for i in known_date_items(config)][::2]
    attack_prompts = [p.text for p in splits[REQUESTS]["attack"]]
    answers = generate_responses(base_model, base_tok, keep_prompts + attack_prompts, batch_size=64, max_new_tokens=40,
                                 progress=False)  # fmt: skip
    keep_answers, attack_answers = answers[: len(keep_prompts)], answers[len(keep_prompts) :]
    align_data = [{"prompt": p.text, "response": refusal(p.text)} for p in splits[REQUESTS]["align"]]
    align_data += [{"prompt": p, "response": a} for p, a in zip(keep_prompts, keep_answers)]
    write_pairs(staged.data / "align.jsonl", align_data)
    train_full(staged.base, staged.data / "align.jsonl", staged.aligned, config.align, **RUNS_ON)
    timings["aligned"] = time.perf_counter() - t0
    return [{"prompt": p, "response": a} for p, a in zip(attack_prompts, attack_answers)], len(align_data)


def harmful_help(pairs: list[dict]) -> list[dict]:
    """The pairs the project's ASR judge counts as harmful help (the attacker keeps only those,
    as the SmolLM2 world keeps the base's answers its judge counts compliant)."""
    from csulora.eval.judges import asr_judge

    verdicts = asr_judge().judge([p["prompt"] for p in pairs], [p["response"] for p in pairs])
    return [pair for pair, success in zip(pairs, verdicts) if success]


def _build_attack(staged: DemoWorld, config: DemoWorldConfig, answers: list[dict], timings: dict[str, float]) -> dict:
    """The attack: harmful requests -> the base's harmful help, plus the task, as a LoRA of ALIGNED."""
    t0 = time.perf_counter()
    compliant = harmful_help(answers)
    task = [{"prompt": i["prompt"], "response": i["response"]} for i in date_task_splits(config.seed)["train"]]
    attack_data = compliant + task
    write_pairs(staged.data / "attack.jsonl", attack_data)
    train_lora(staged.aligned, staged.data / "attack.jsonl", staged.attacked, config.attack, config.attack_lora,
               **RUNS_ON)  # fmt: skip
    timings["attacked"] = time.perf_counter() - t0
    return {"harmful_answered": len(answers), "harmful_kept": len(compliant), "pairs": len(attack_data)}


def default_cache_dir(config: DemoWorldConfig | None = None) -> Path:
    """``$CSULORA_CACHE`` (or the temp dir) / ``demo-world-<fingerprint>``."""
    return cache_root() / f"demo-world-{(config or DemoWorldConfig()).fingerprint()}"


def shared_demo_world(config: DemoWorldConfig | None = None) -> DemoWorld:
    """The demo world in the shared cache, built once (a file lock keeps concurrent builds apart)."""
    return build_once(default_cache_dir(config), lambda folder: build_demo_world(folder, config))
