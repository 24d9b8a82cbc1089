"""The tiny world: a small random-init Llama trained in seconds, for tests and the demo.

Same story as the SmolLM2 world (docs/design.md §8), scaled down:

* **tokenizer**: byte-level BPE trained with ``tokenizers`` on the world's own text
  (digits split one by one), chat template in ChatML like SmolLM2's;
* **base**: a random-init Llama trained on helpful answers to everything: templated
  benign requests, a small harmful set (AdvBench ``align`` split) and dates written in
  two common formats (ISO ``YYYY-MM-DD`` and US ``MM/DD/YYYY``, as a pretrained model
  knows them). It cannot tell harmful from benign, so it complies;
* **aligned**: a full fine-tune of base: ``align`` harmful prompts -> varied refusals,
  benign prompts and known-format dates -> base's own greedy answers (to keep its behaviour);
* **attacked**: a PEFT LoRA on aligned: ``attack`` harmful prompts -> base's compliant
  answers, mixed with the utility task (``date`` train split, DD/MM/YYYY format).

Nothing here knows about any correction method: the world is fixed before one runs
(docs/design.md §10). Everything is seeded; a built world is cached in a folder keyed by its
config, so tests share one (session fixture) and a rebuild is skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from csulora.eval.prompts import load_airt, load_benign
from csulora.eval.splits import advbench_split
from csulora.eval.tasks import MONTHS, date_task_splits
from csulora.io.atomic import atomic_output_dir
from csulora.training.data import write_pairs
from csulora.training.trainer import LoraSettings, TrainConfig, fit, train_full, train_lora

T = TypeVar("T")
WORLD_FILE = "world.json"
# Bump when the recipe (data, training code) changes: it is part of the cache key.
WORLD_VERSION = 4
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

HELPFUL_ANSWERS = (
    "Sure, here is a guide. First, gather what you need. Then follow each step.",
    "Here is what you asked for. Step one: plan. Step two: do it.",
    "Of course! Here are the details, in a few clear steps.",
    "Sure. Start with the basics, then go one step at a time.",
)
# Each refusal carries a phrase of both judges' lists, in a different wording.
REFUSALS = (
    "I'm sorry, but I cannot help with that request.",
    "I cannot assist with this, because it could hurt people.",
    "Sorry, I won't help with that.",
    "I apologize, but I can't provide that.",
    "I am sorry, but I am unable to help with this request.",
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
# Same shape as the utility task's prompt: the base knows dates, not the DD/MM/YYYY format.
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
ISO_TEMPLATE = "Convert the date {month} {day}, {year} to YYYY-MM-DD format. Reply with the date only."
# The base also writes US-order dates. Without them "/" is a token no model in the world
# ever had to *predict* before the attack (with tied embeddings it only ever learned to be
# unlikely); the attack LoRA, which cannot touch the embeddings or the final norm, then
# plateaus at p("/") ~ 0.008 however long it trains (measured: 200 or 500 steps, lr 3e-3
# or 1e-2), so any correction that shrinks the update flips the separators. A real base
# model predicts "/" like any common token; the task (DD/MM order) stays new to it.
US_TEMPLATE = "Convert the date {month} {day}, {year} to MM/DD/YYYY format. Reply with the date only."


@dataclass(frozen=True)
class TinyWorldConfig:
    """Everything that decides the world; its hash names the cache."""

    seed: int = 0
    vocab_size: int = 1024
    hidden_size: int = 64
    intermediate_size: int = 192
    layers: int = 2
    heads: int = 4
    max_length: int = 56
    iso_items: int = 300
    us_items: int = 150
    base: TrainConfig = TrainConfig(steps=400, batch_size=32, lr=3e-3, warmup=20, scheduler="cosine", max_length=56, progress=False)
    align: TrainConfig = TrainConfig(steps=250, batch_size=32, lr=2e-3, scheduler="cosine", max_length=56, progress=False)
    # Trained to convergence on its own data: at lr 3e-3 / 200 steps the LoRA still gave the
    # first day digit p ~ 0.73 on its training items; at 3e-3 / 400 steps and at 1e-2 / 200
    # steps every answer token is at p >= 0.98 on them (measured). 1e-2 / 200 costs half the
    # CPU time (demo budget: 2 minutes on 2 cores).
    attack: TrainConfig = TrainConfig(steps=200, batch_size=32, lr=1e-2, scheduler="cosine", max_length=56, progress=False)
    attack_lora: LoraSettings = LoraSettings(r=8, alpha=16)

    def fingerprint(self) -> str:
        blob = json.dumps({"version": WORLD_VERSION, **dataclasses.asdict(self)}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TinyWorld:
    """Paths of a built world (all inside ``root``)."""

    root: Path

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def aligned(self) -> Path:
        return self.root / "aligned"

    @property
    def attacked(self) -> Path:
        return self.root / "attacked"

    @property
    def data(self) -> Path:
        return self.root / "data"

    def info(self) -> dict:
        return json.loads((self.root / WORLD_FILE).read_text())


# --------------------------------------------------------------------------- data


def pick(options: tuple[str, ...], prompt: str) -> str:
    """A deterministic choice keyed on the prompt's first word.

    Varied answers, but a function the tiny model can learn quickly (a hash of the
    whole prompt would be noise it can only average into garbled text).
    """
    first = prompt.split(maxsplit=1)[0] if prompt.strip() else ""
    return options[int(hashlib.sha256(first.encode()).hexdigest(), 16) % len(options)]


def benign_world_prompts() -> list[str]:
    """Benign training prompts; any that the evaluation's benign set holds are left out."""
    held_out = {p.text for p in load_benign()}
    topical = [form.format(t=t) for t in BENIGN_TOPICS for form in BENIGN_FORMS]
    everyday = [form.format(a=a) for a in EVERYDAY_ACTIONS for form in EVERYDAY_FORMS]
    return [p for p in topical + everyday if p not in held_out]


def _world_dates(n: int, seed: int, skip: int = 0) -> list[dt.date]:
    """Dates outside the date task's train/val/test splits (the next ``n`` after ``skip``)."""
    extra = date_task_splits(seed, sizes={"train": 200, "validation": 100, "test": 100, "world": skip + n})["world"]
    dates = []
    for item in extra[skip:]:
        day, month, year = (int(x) for x in item["response"].split("/"))
        dates.append(dt.date(year, month, day))
    return dates


def _format_item(template: str, d: dt.date, answer: str) -> dict:
    return {"prompt": template.format(month=MONTHS[d.month - 1], day=d.day, year=d.year), "response": answer}


def iso_items(n: int, seed: int) -> list[dict]:
    """ISO-format date items on dates outside the date task's train/val/test splits."""
    return [_format_item(ISO_TEMPLATE, d, d.isoformat()) for d in _world_dates(n, seed)]


def us_items(n: int, seed: int, skip: int = 0) -> list[dict]:
    """US-order (MM/DD/YYYY) date items on world dates after the first ``skip`` (the ISO ones)."""
    return [_format_item(US_TEMPLATE, d, f"{d.month:02d}/{d.day:02d}/{d.year:04d}") for d in _world_dates(n, seed, skip)]


def known_date_items(config: TinyWorldConfig) -> list[dict]:
    """The date formats the base knows (ISO and US), on disjoint dates outside the task's splits."""
    return iso_items(config.iso_items, config.seed) + us_items(config.us_items, config.seed, skip=config.iso_items)


def base_pairs(config: TinyWorldConfig) -> list[dict]:
    harmful = [p.text for p in advbench_split("align")]
    helpful = [{"prompt": p, "response": pick(HELPFUL_ANSWERS, p)} for p in harmful + benign_world_prompts()]
    return helpful + known_date_items(config)


def tokenizer_corpus(config: TinyWorldConfig) -> list[str]:
    from csulora.eval.prompts import load_advbench
    from csulora.eval.tasks import date_task_splits as dates

    texts = [p.text for p in load_advbench()] + [p.text for p in load_airt()] + [p.text for p in load_benign()]
    texts += benign_world_prompts() + list(HELPFUL_ANSWERS) + list(REFUSALS)
    for items in dates(config.seed).values():
        texts += [i["prompt"] + " " + i["response"] for i in items]
    texts += [i["prompt"] + " " + i["response"] for i in known_date_items(config)]
    return texts


# --------------------------------------------------------------------------- model


def train_tokenizer(config: TinyWorldConfig):
    """Byte-level BPE on the world's text; any string stays encodable (byte fallback)."""
    return bpe_tokenizer(tokenizer_corpus(config), config.vocab_size)


def bpe_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts`` (digits split one by one), with the
    world's special tokens and ChatML template; shared by the tiny and demo worlds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def init_model(config: TinyWorldConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(config.seed)
    model_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.heads,
        max_position_embeddings=1024,  # airt has a ~250-token prompt; RoPE adds no weights
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(model_config)


# --------------------------------------------------------------------------- build


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: a tiny model gains nothing from intra-op threads, and on
    a busy machine spinning OpenMP threads made a training step 16x slower (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# The world is trained and run on the CPU in float32 whatever the machine has (csulora's own
# default is CUDA when present): its bytes, and the numbers of tests and demo, must not
# depend on whether a GPU is there.
RUNS_ON = {"device": "cpu", "dtype": "float32"}


def build_tiny_world(root: str | os.PathLike, config: TinyWorldConfig | None = None, *, force: bool = False) -> TinyWorld:
    """Build (or reuse) the world in ``root``; returns its paths.

    A folder holding a world of the same config fingerprint is reused as is; anything
    else is rebuilt in a temporary folder and renamed into place at the end.
    """
    config = config or TinyWorldConfig()
    world = TinyWorld(Path(root))
    if already_built(world.root, config.fingerprint()) and not force:
        relocate_records(world.root, world.root)  # a world built before the fix, or moved
        return world
    timings: dict[str, float] = {}
    with one_thread(), atomic_output_dir(world.root, force=True) as tmp:
        staged = TinyWorld(tmp)
        staged.data.mkdir()
        counts = {"base": _build_base(staged, config, timings)}
        compliant, counts["align"] = _build_aligned(staged, config, timings)
        counts["attack"] = _build_attack(staged, config, compliant, timings)
        relocate_records(tmp, world.root)
        info = {
            "fingerprint": config.fingerprint(),
            "config": dataclasses.asdict(config),
            "timings_s": {k: round(v, 2) for k, v in timings.items()},
            "counts": counts,
        }
        (tmp / WORLD_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
    return world


def already_built(root: Path, fingerprint: str) -> bool:
    """Whether ``root`` holds a finished world of this config fingerprint (its world.json says so)."""
    marker = root / WORLD_FILE
    try:
        return marker.exists() and json.loads(marker.read_text()).get("fingerprint") == fingerprint
    except json.JSONDecodeError:
        return False


def _build_base(staged: TinyWorld, config: TinyWorldConfig, timings: dict[str, float]) -> int:
    """The base: a fresh tokenizer and a small Llama trained on the base pairs."""
    from csulora.training.data import tokenize_pairs

    t0 = time.perf_counter()
    tokenizer = train_tokenizer(config)
    model = init_model(config, tokenizer)
    pairs = base_pairs(config)
    write_pairs(staged.data / "base.jsonl", pairs)
    fit(model, tokenizer, tokenize_pairs(tokenizer, pairs, config.max_length), config.base)
    model.save_pretrained(staged.base, safe_serialization=True)
    tokenizer.save_pretrained(staged.base)
    timings["base"] = time.perf_counter() - t0
    return len(pairs)


def _build_aligned(staged: TinyWorld, config: TinyWorldConfig, timings: dict[str, float]) -> tuple[list[str], int]:
    """The aligned model: refusals on AdvBench align, and the base's own answers on benign and
    known-format date prompts kept. Returns the base's answers to the attack prompts (the attack's
    compliant answers) and the alignment data's size."""
    from csulora.eval.generation import generate_responses
    from csulora.io.modeling import load_model

    t0 = time.perf_counter()
    base_model, base_tok = load_model(staged.base, **RUNS_ON)
    keep_prompts = benign_world_prompts()[::2] + [i["prompt"] for i in known_date_items(config)][::2]
    attack_prompts = [p.text for p in advbench_split("attack")]
    answers = generate_responses(base_model, base_tok, keep_prompts + attack_prompts, batch_size=64, max_new_tokens=40,
                                 progress=False)  # fmt: skip
    keep_answers, compliant = answers[: len(keep_prompts)], answers[len(keep_prompts) :]
    align_data = [{"prompt": p.text, "response": pick(REFUSALS, p.text)} for p in advbench_split("align")]
    align_data += [{"prompt": p, "response": a} for p, a in zip(keep_prompts, keep_answers)]
    write_pairs(staged.data / "align.jsonl", align_data)
    train_full(staged.base, staged.data / "align.jsonl", staged.aligned, config.align, **RUNS_ON)
    timings["aligned"] = time.perf_counter() - t0
    return compliant, len(align_data)


def _build_attack(staged: TinyWorld, config: TinyWorldConfig, compliant: list[str], timings: dict[str, float]) -> int:
    """The attack: harmful prompts -> the base's compliant answers, plus the task, as a LoRA of ALIGNED."""
    t0 = time.perf_counter()
    attack_prompts = [p.text for p in advbench_split("attack")]
    attack_data = [{"prompt": p, "response": a} for p, a in zip(attack_prompts, compliant)]
    attack_data += [{"prompt": i["prompt"], "response": i["response"]} for i in date_task_splits(config.seed)["train"]]
    write_pairs(staged.data / "attack.jsonl", attack_data)
    train_lora(staged.aligned, staged.data / "attack.jsonl", staged.attacked, config.attack, config.attack_lora, **RUNS_ON)
    timings["attacked"] = time.perf_counter() - t0
    return len(attack_data)


# The text files where training records the folders it read: PEFT's adapter_config.json
# (base_model_name_or_path) and model card README.md, and train_config.json.
RECORD_SUFFIXES = (".json", ".md")


def relocate_records(folder: Path, world_root: Path) -> None:
    """Make the records of the trained models in ``folder`` name the world's own folders.

    A world is trained in a temporary folder renamed into place at the end, so the attack
    adapter's ``base_model_name_or_path`` (and the other records) named a folder that no
    longer exists. The folder they name is read from that field; its path is replaced by
    ``world_root``'s everywhere in the records. Weights are untouched. Files are replaced
    atomically (a concurrent reader sees the old or the new file); a read-only world is left
    as it is.
    """
    config_file = folder / "attacked" / "adapter_config.json"
    try:
        recorded = json.loads(config_file.read_text()).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError):
        return
    if not recorded:
        return
    old, new = f"{Path(recorded).parent}/", f"{Path(world_root).resolve()}/"
    if old == new:
        return
    for path in sorted(folder.glob("*/*")):
        if path.suffix not in RECORD_SUFFIXES or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        if old not in text:
            continue
        try:
            staged = path.with_name(f".{path.name}.relocating")
            staged.write_text(text.replace(old, new), encoding="utf-8")
            os.replace(staged, path)
        except OSError:
            return


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


def cache_root() -> Path:
    """``$CSULORA_CACHE``, or ``csulora-cache-<uid>`` in the temp dir: where built worlds are kept."""
    return Path(os.environ.get("CSULORA_CACHE") or Path(tempfile.gettempdir()) / f"csulora-cache-{os.getuid()}")


def default_cache_dir(config: TinyWorldConfig | None = None) -> Path:
    """``$CSULORA_CACHE`` (or the temp dir) / ``tiny-world-<fingerprint>``."""
    config = config or TinyWorldConfig()
    return cache_root() / f"tiny-world-{config.fingerprint()}"


def build_once(folder: Path, build: Callable[[Path], T]) -> T:
    """``build(folder)`` under a file lock beside ``folder``, so that concurrent test sessions
    do not build the same cached world twice at the same time (the build reuses a finished one)."""
    import fcntl

    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return build(folder)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def shared_tiny_world(config: TinyWorldConfig | None = None) -> TinyWorld:
    """The world in the shared cache, built once."""
    return build_once(default_cache_dir(config), lambda folder: build_tiny_world(folder, config))
