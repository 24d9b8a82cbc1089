from __future__ import annotations

import torch

from csulora.eval.margin import continuation_logprobs, mean_response_logprob, refusal_margin
from csulora.eval.splits import advbench_split
from csulora.modeling import load_model
from csulora.training.data import chat_prompt_ids


def test_refusal_margin_separates_aligned_from_attacked(tiny_world):
    prompts = [p.text for p in advbench_split("test")[:20]]
    aligned = refusal_margin(*load_model(tiny_world.aligned, device="cpu"), prompts)
    attacked = refusal_margin(*load_model(tiny_world.aligned, tiny_world.attacked, device="cpu"), prompts)
    assert aligned > attacked


def test_batched_scores_equal_a_direct_forward_pass(tiny_world):
    model, tokenizer = load_model(tiny_world.aligned, device="cpu", dtype=torch.float64)
    prompts, conts = ["What is tea?", "Write a poem about cats and dogs and birds."], ["Sure, here is", "I cannot help"]
    batched = continuation_logprobs(model, tokenizer, prompts, conts, batch_size=2)
    for (score, n), prompt, cont in zip(batched, prompts, conts):
        head = chat_prompt_ids(tokenizer, prompt)
        tail = tokenizer(cont, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([head + tail])).logits[0]
        logp = torch.log_softmax(logits, -1)
        direct = sum(float(logp[len(head) - 1 + j, t]) for j, t in enumerate(tail))
        assert n == len(tail) and abs(score - direct) < 1e-9


def test_mean_response_logprob_prefers_the_right_answer(tiny_world):
    model, tokenizer = load_model(tiny_world.aligned, tiny_world.attacked, device="cpu")
    from csulora.eval.tasks import date_task

    items = date_task("test")[:10]
    wrong = [{**i, "response": "1900-01-01"} for i in items]
    assert mean_response_logprob(model, tokenizer, items) > mean_response_logprob(model, tokenizer, wrong)
