"""Batched greedy generation with left padding and the model's chat template.

Prompts are sorted by length before batching (less padding, and the longest batch runs
first so an out-of-memory error shows at once), then answers are put back in input
order. Greedy decoding with a fixed ``max_new_tokens`` makes the output a function of
the weights and the prompts only; padding changes nothing beyond float rounding (the
tests check batched == one-at-a-time in float64).

A prompt may come with a **stop rule** (settled prefix text -> bool, e.g. a judge's
``verdict_fixed``; issue 21): once it holds, that row stops and its answer is the text
judged, marked ``truncated``. A stopped row stays in the batch -- transformers (>= 4.39)
takes a per-row bool from a stopping criterion, pads finished rows and ends the batch
once every row is done -- so the padded shapes never change and the other rows' logits
are bitwise those of a run without rules.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from csulora.training.data import chat_prompt_ids
from csulora.training.framing import Framing, per_prompt

DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_NEW_TOKENS = 64  # docs/design.md §10: one default for harmful, benign and task prompts

# Prefix text of an answer -> True once generating more of it cannot change what it is used for.
StopRule = Callable[[str], bool]

# Decoding an incomplete UTF-8 sequence (a byte-level token that splits a character)
# gives U+FFFD, which the next token may turn into a real character.
REPLACEMENT_CHAR = "\ufffd"
# ``clean_up_tokenization_spaces`` applies 10 replacements in turn (" ." -> ".", " n't" ->
# "n't", ...), each pattern at most 4 characters: text appended after a prefix can change
# at most 3 more of the prefix's last characters per replacement, so 30 in all.
CLEANUP_REACH = 30


def stop_token_ids(tokenizer) -> list[int]:
    """EOS plus the chat end-of-turn token when the vocabulary has one."""
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid not in ids and tid >= 0:
            ids.append(tid)
    return ids


def left_pad(sequences: Sequence[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)


def decode_new_tokens(tokenizer, tokens: Sequence[int], stops: Sequence[int]) -> str:
    """Text of the generated tokens up to the first stop token."""
    out = []
    for t in tokens:
        if t in stops:
            break
        out.append(t)
    return tokenizer.decode(out, skip_special_tokens=True).strip()


def settled_text(tokenizer, tokens: Sequence[int]) -> str:
    """The decoded text of ``tokens`` that no later token can change.

    Byte-level BPE may split a character across tokens: the decoded prefix then ends in
    U+FFFD, which is dropped. With ``clean_up_tokenization_spaces`` the last few characters
    may still be rewritten, so they are held back. What is left is a prefix of the decoded
    text of every continuation of ``tokens`` (the tests check it token by token).
    """
    text = tokenizer.decode(list(tokens), skip_special_tokens=True).rstrip(REPLACEMENT_CHAR)
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        text = text[: max(len(text) - CLEANUP_REACH, 0)]
    return text


class StopRuleCriteria:
    """Per-row stopping criterion for ``model.generate``: row r stops once ``rules[r]`` holds.

    Called after every generated token with the whole ``input_ids``; it copies only the
    new column to the host and decodes only the rows that have a rule and still run
    (a row ends its watch at its first stop token: the EOS criterion ends it there).
    Duck-typed (transformers only calls it), so importing this module stays free of
    transformers. ``stopped_at[r]``: how many new tokens row r had when its rule fired.
    """

    def __init__(self, tokenizer, rules: Sequence[StopRule | None], prompt_width: int, stops: Sequence[int]):
        self.tokenizer = tokenizer
        self.rules = list(rules)
        self.prompt_width = prompt_width
        self.stops = frozenset(stops)
        self.tokens: list[list[int]] = [[] for _ in self.rules]
        self.watched = [r for r, rule in enumerate(self.rules) if rule is not None]
        self.stopped_at: list[int | None] = [None] * len(self.rules)
        self.done: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        if self.done is None:
            self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if not self.watched:
            return self.done
        new_count = input_ids.shape[1] - self.prompt_width
        last = input_ids[:, -1].tolist()
        still = []
        for row in self.watched:
            if last[row] in self.stops:
                continue  # ended by EOS / end of turn: complete, not truncated
            self.tokens[row].append(last[row])
            if self.rules[row](settled_text(self.tokenizer, self.tokens[row])):
                self.stopped_at[row] = new_count
                self.done[row] = True
            else:
                still.append(row)
        self.watched = still
        return self.done


@dataclass(frozen=True)
class Generations:
    """Answers in input order, with how each one ended.

    ``truncated[i]``: answer i was cut by its stop rule before EOS and before
    ``max_new_tokens`` (it is the start of the answer a run without rules gives).
    ``new_tokens[i]``: tokens the model generated for answer i (its stop token included).
    ``row_steps``: decoding steps summed over every row of every batch -- the work done,
    since a finished row keeps its place in the batch until the whole batch ends.
    """

    answers: list[str]
    truncated: list[bool]
    new_tokens: list[int]
    row_steps: int


def greedy_config(tokenizer, max_new_tokens: int):
    from transformers import GenerationConfig

    stops = stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    return GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=stops,
        temperature=None,
        top_p=None,
        top_k=None,
    )


def row_answer(
    tokenizer, tokens: list[int], stops: Sequence[int], stopped_at: int | None, max_new_tokens: int
) -> tuple[str, bool, int]:
    """(answer, truncated, generated tokens) of one row of a batch's output.

    A row its rule stopped before ``max_new_tokens`` is cut (even when it was the batch's
    last running row, so the batch ended with it): its answer is the settled text its rule
    judged, a prefix of what a run without rules gives, and the pad tokens after the stop
    are not counted. Otherwise the row ran to its first stop token (kept in the count) or
    to ``max_new_tokens``, exactly as without rules.
    """
    if stopped_at is not None and stopped_at < max_new_tokens:
        return settled_text(tokenizer, tokens[:stopped_at]).strip(), True, stopped_at
    length = next((k + 1 for k, t in enumerate(tokens) if t in stops), len(tokens))
    return decode_new_tokens(tokenizer, tokens[:length], stops), False, length


def stopping_list(criterion):
    from transformers import StoppingCriteriaList

    return StoppingCriteriaList([criterion])


@torch.inference_mode()
def generate_answers(
    model,
    tokenizer,
    prompts: list[str],
    *,
    stop_rules: Sequence[StopRule | None] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    progress: bool = True,
    desc: str = "generate",
    framing: Framing | Sequence[Framing] | None = None,
) -> Generations:
    """Greedy answers to ``prompts`` (one user turn each), in input order.

    ``stop_rules``: one per prompt (None: run to the end), see the module docstring;
    without any, generation runs exactly as before the rules existed. ``framing``: the chat
    form of every prompt, or one per prompt (None: plain; :mod:`csulora.training.framing`).
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be >= 1")
    rules = list(stop_rules) if stop_rules is not None else [None] * len(prompts)
    if len(rules) != len(prompts):
        raise ValueError(f"{len(rules)} stop rules for {len(prompts)} prompts")
    if not prompts:
        return Generations([], [], [], 0)
    device = next(model.parameters()).device
    encoded = [chat_prompt_ids(tokenizer, p, f) for p, f in zip(prompts, per_prompt(framing, len(prompts)))]
    order = sorted(range(len(prompts)), key=lambda i: (-len(encoded[i]), i))
    config = greedy_config(tokenizer, max_new_tokens)
    stops = stop_token_ids(tokenizer)
    answers, truncated, new_tokens = [""] * len(prompts), [False] * len(prompts), [0] * len(prompts)
    row_steps = 0
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=desc, unit="batch", disable=None if progress else True, leave=False):
        ids, mask = left_pad([encoded[i] for i in batch], config.pad_token_id, device)
        watch = StopRuleCriteria(tokenizer, [rules[i] for i in batch], ids.shape[1], stops)
        extra = {"stopping_criteria": stopping_list(watch)} if watch.watched else {}
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, **extra)
        generated = out[:, ids.shape[1] :].tolist()
        row_steps += len(batch) * (out.shape[1] - ids.shape[1])
        for row, i in enumerate(batch):
            answers[i], truncated[i], new_tokens[i] = row_answer(
                tokenizer, generated[row], stops, watch.stopped_at[row], max_new_tokens
            )
    return Generations(answers, truncated, new_tokens, row_steps)


def generate_responses(
    model,
    tokenizer,
    prompts: list[str],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    progress: bool = True,
    desc: str = "generate",
    framing: Framing | Sequence[Framing] | None = None,
) -> list[str]:
    """Greedy answers to ``prompts`` (one user turn each, under ``framing``), in input order, each run to its end."""
    return generate_answers(
        model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress, desc=desc,
        framing=framing,
    ).answers
