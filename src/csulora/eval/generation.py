"""Batched greedy generation with left padding and the model's chat template.

Prompts are sorted by length before batching (less padding, and the longest batch runs
first so an out-of-memory error shows at once), then answers are put back in input
order. Greedy decoding with a fixed ``max_new_tokens`` makes the output a function of
the weights and the prompts only; padding changes nothing beyond float rounding (the
tests check batched == one-at-a-time in float64).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from csulora.training.data import chat_prompt_ids

DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_NEW_TOKENS = 64  # docs/design.md §10: one default for harmful, benign and task prompts


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


def decode_new_tokens(tokenizer, tokens: torch.Tensor, stops: list[int]) -> str:
    """Text of the generated tokens up to the first stop token."""
    out = []
    for t in tokens.tolist():
        if t in stops:
            break
        out.append(t)
    return tokenizer.decode(out, skip_special_tokens=True).strip()


@torch.inference_mode()
def generate_responses(
    model,
    tokenizer,
    prompts: list[str],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    progress: bool = True,
    desc: str = "generate",
) -> list[str]:
    """Greedy answers to ``prompts`` (one user turn each), in input order."""
    from transformers import GenerationConfig

    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be >= 1")
    if not prompts:
        return []
    device = next(model.parameters()).device
    encoded = [chat_prompt_ids(tokenizer, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (-len(encoded[i]), i))
    stops = stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=stops,
        temperature=None,
        top_p=None,
        top_k=None,
    )
    answers: list[str] = [""] * len(prompts)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=desc, unit="batch", disable=None if progress else True, leave=False):
        ids, mask = left_pad([encoded[i] for i in batch], pad_id, device)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        for row, i in enumerate(batch):
            answers[i] = decode_new_tokens(tokenizer, out[row, ids.shape[1] :], stops)
    return answers
