"""Training data: JSONL of {prompt, response}, tokenized with the chat template.

The prompt side is the chat template with the assistant header (exactly what generation
feeds the model), the response side is the answer plus the end-of-turn token, so the
model learns to stop. Labels are -100 on the prompt tokens: the loss is on the response.
Generation (eval) and the refusal margin tokenize the same way (:func:`chat_prompt_ids`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from csulora.errors import InputError
from csulora.io.jsonl import read_jsonl, write_jsonl
from csulora.training.framing import PLAIN, Framing, render_prompt

IGNORE_INDEX = -100


def load_pairs(path: str | Path) -> list[dict]:
    """Read ``{"prompt": str, "response": str}`` records; extra fields are kept."""
    file = Path(path)
    pairs = []
    for lineno, record in read_jsonl(file):
        for key in ("prompt", "response"):
            if not isinstance(record.get(key), str):
                raise InputError(f"{file}:{lineno}: missing or non-string field {key!r}")
        if not record["prompt"].strip():
            raise InputError(f"{file}:{lineno}: empty 'prompt'")
        pairs.append(record)
    if not pairs:
        raise InputError(f"{file}: no records (empty file)")
    return pairs


def write_pairs(path: str | Path, pairs: Sequence[dict]) -> Path:
    """Write pairs as JSONL (atomically), keeping only ``prompt`` and ``response``."""
    return write_jsonl(path, ({"prompt": p["prompt"], "response": p["response"]} for p in pairs))


def chat_prompt_text(tokenizer, prompt: str, framing: Framing = PLAIN) -> str:
    """The chat template applied to one user turn (under ``framing``: :mod:`csulora.training.framing`),
    ending with the assistant header; a model without a template continues plain text."""
    return render_prompt(tokenizer, prompt, framing)


def chat_prompt_ids(tokenizer, prompt: str, framing: Framing = PLAIN) -> list[int]:
    return tokenizer(chat_prompt_text(tokenizer, prompt, framing), add_special_tokens=False)["input_ids"]


def response_ids(tokenizer, response: str, *, with_eos: bool = True) -> list[int]:
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if with_eos and tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return ids


def tokenize_pairs(tokenizer, pairs: Sequence[dict], max_length: int) -> list[dict]:
    """input_ids, attention_mask and labels (-100 on prompt tokens) for each pair.

    Too long: the response is cut first (keeping at least one token), then the prompt
    loses its left end, so every example still trains on something.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    examples = []
    for pair in pairs:
        prompt = chat_prompt_ids(tokenizer, pair["prompt"])
        answer = response_ids(tokenizer, pair["response"])
        if len(prompt) + len(answer) > max_length:
            answer = answer[: max(1, max_length - len(prompt))]
            prompt = prompt[len(prompt) - (max_length - len(answer)) :]
        ids = prompt + answer
        examples.append(
            {
                "input_ids": ids,
                "attention_mask": [1] * len(ids),
                "labels": [IGNORE_INDEX] * len(prompt) + answer,
            }
        )
    return examples
