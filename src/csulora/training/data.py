"""Training data: JSONL of {prompt, response[, framing]}, tokenized with the chat template.

The prompt side is the chat template with the assistant header (exactly what generation
feeds the model), rendered under the pair's ``framing`` when it names one (a shipped framing's
name or a JSON framing file, :mod:`csulora.training.framing`; none: plain), so an attack taught
in a framing -- the identity shift's system message and user prefix -- is trained in the form
eval and tune put to the model (issue 24). The response side is the answer plus the end-of-turn token, so the
model learns to stop. Labels are -100 on the prompt tokens: the loss is on the response.
Generation (eval) and the refusal margin tokenize the same way (:func:`chat_prompt_ids`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from csulora.errors import InputError, OptionError
from csulora.io.jsonl import read_jsonl, write_jsonl
from csulora.training.framing import PLAIN, Framing, load_framing, render_prompt

IGNORE_INDEX = -100
FRAMING_FIELD = "framing"  # optional per pair: the chat form its prompt is rendered in


def load_pairs(path: str | Path) -> list[dict]:
    """Read ``{"prompt": str, "response": str[, "framing": str]}`` records; extra fields are kept.

    A ``framing`` must resolve (:func:`check_pair_framing`), so a typo fails before training."""
    file = Path(path)
    pairs = []
    for lineno, record in read_jsonl(file):
        for key in ("prompt", "response"):
            if not isinstance(record.get(key), str):
                raise InputError(f"{file}:{lineno}: missing or non-string field {key!r}")
        if not record["prompt"].strip():
            raise InputError(f"{file}:{lineno}: empty 'prompt'")
        check_pair_framing(record, f"{file}:{lineno}")
        pairs.append(record)
    if not pairs:
        raise InputError(f"{file}: no records (empty file)")
    return pairs


def check_pair_framing(record: dict, where: str) -> None:
    """InputError naming ``where`` when a pair's ``framing`` is not a string naming a framing."""
    if FRAMING_FIELD not in record:
        return
    ref = record[FRAMING_FIELD]
    if not isinstance(ref, str) or not ref.strip():
        raise InputError(f"{where}: field {FRAMING_FIELD!r} must be a framing name or a JSON framing file")
    try:
        load_framing(ref)
    except (InputError, OptionError) as exc:
        raise InputError(f"{where}: {exc}") from None


def pair_framing(pair: dict, resolved: dict[str, Framing]) -> Framing:
    """The framing a pair's prompt is rendered in (plain when it names none); ``resolved``
    remembers each named one, so a framing file is read once per call of :func:`tokenize_pairs`."""
    ref = pair.get(FRAMING_FIELD)
    if ref is None:
        return PLAIN
    if ref not in resolved:
        resolved[ref] = load_framing(ref)
    return resolved[ref]


def write_pairs(path: str | Path, pairs: Sequence[dict]) -> Path:
    """Write pairs as JSONL (atomically), keeping only ``prompt``, ``response`` and a ``framing``."""
    keep = ("prompt", "response", FRAMING_FIELD)
    return write_jsonl(path, ({k: p[k] for k in keep if k in p} for p in pairs))


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

    Each prompt is rendered under the pair's ``framing`` (none: plain). Too long: the response is
    cut first (keeping at least one token), then the prompt loses its left end, so every example
    still trains on something.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    examples = []
    resolved: dict[str, Framing] = {}
    for pair in pairs:
        prompt = chat_prompt_ids(tokenizer, pair["prompt"], pair_framing(pair, resolved))
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
