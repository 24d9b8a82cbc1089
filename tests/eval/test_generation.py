from __future__ import annotations

import torch

from csulora.eval.generation import generate_responses, left_pad
from csulora.eval.splits import advbench_split
from csulora.eval.tasks import date_task
from csulora.io.modeling import load_model

PROMPTS = [p.text for p in advbench_split("test")[:4]] + ["What is tea?", "Hi"] + [i["prompt"] for i in date_task("test")[:3]]


def test_batched_equals_one_at_a_time_in_float64(tiny_world):
    model, tokenizer = load_model(tiny_world.aligned, tiny_world.attacked, dtype=torch.float64, device="cpu")
    batched = generate_responses(model, tokenizer, PROMPTS, batch_size=len(PROMPTS), max_new_tokens=16, progress=False)
    single = generate_responses(model, tokenizer, PROMPTS, batch_size=1, max_new_tokens=16, progress=False)
    assert batched == single
    assert len(set(batched)) > 1  # prompts of different kinds get different answers


def test_generation_is_deterministic_and_keeps_input_order(tiny_world):
    model, tokenizer = load_model(tiny_world.aligned, device="cpu")
    first = generate_responses(model, tokenizer, PROMPTS, batch_size=5, max_new_tokens=12, progress=False)
    again = generate_responses(model, tokenizer, list(reversed(PROMPTS)), batch_size=3, max_new_tokens=12, progress=False)
    assert first == list(reversed(again))
    assert generate_responses(model, tokenizer, [], progress=False) == []


def test_left_padding_puts_tokens_on_the_right():
    ids, mask = left_pad([[5, 6, 7], [9]], pad_id=0, device="cpu")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
