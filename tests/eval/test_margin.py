from __future__ import annotations

import math

import pytest
import torch

from csulora.eval.margin import continuation_logprobs, mean_response_logprob, refusal_margin
from csulora.eval.splits import advbench_split
from csulora.io.modeling import load_model
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


def test_response_logprob_equals_generates_own_step_scores(tiny_world):
    """The log-prob of the model's own greedy answer, read back from its decoded *text*,
    is exactly what generate() scored at each step (same tokens, same positions): no
    re-tokenisation drift at the prompt/response boundary, no label shift, no padding
    effect in a mixed-length batch. A low value (the attacked adapter's "/" tokens sit
    near -4.9 while being the argmax) is then the model's own flat distribution at that
    step, not a misalignment of the metric.
    """
    from csulora.eval.generation import generate_responses, stop_token_ids
    from csulora.eval.margin import continuation_logprobs, mean_response_logprob
    from csulora.eval.tasks import date_task
    from csulora.io.modeling import load_model
    from csulora.training.data import chat_prompt_ids

    model, tokenizer = load_model(tiny_world.aligned, tiny_world.attacked, device="cpu", dtype=torch.float64)
    items = date_task("validation")[:6]
    prompts = [item["prompt"] for item in items] + ["Write a short poem about tea."]
    answers = generate_responses(model, tokenizer, prompts, batch_size=4, max_new_tokens=24, progress=False)
    stops = stop_token_ids(tokenizer)
    expected = []
    for prompt in prompts:
        head = chat_prompt_ids(tokenizer, prompt)
        out = model.generate(
            input_ids=torch.tensor([head]), max_new_tokens=24, do_sample=False, output_logits=True,
            return_dict_in_generate=True, eos_token_id=stops, pad_token_id=stops[0],
        )
        total = 0.0
        for step, token in zip(out.logits, out.sequences[0, len(head):].tolist()):
            if token in stops:
                break
            total += float(torch.log_softmax(step[0].double(), dim=-1)[token])
        expected.append(total)
    got = [s for s, _ in continuation_logprobs(model, tokenizer, prompts, answers, batch_size=3)]
    assert got == pytest.approx(expected, abs=1e-5)  # generate() keeps its logits in float32
    # Greedy answers score well above chance per token, and the mean agrees with the sums.
    own = [{"prompt": p, "response": a} for p, a in zip(prompts, answers)]
    mean = mean_response_logprob(model, tokenizer, own, batch_size=7)
    lengths = [n for _, n in continuation_logprobs(model, tokenizer, prompts, answers)]
    assert mean == pytest.approx(sum(e / n for e, n in zip(expected, lengths)) / len(prompts), abs=1e-5)
    assert mean > math.log(1.0 / tokenizer.vocab_size) / 2
