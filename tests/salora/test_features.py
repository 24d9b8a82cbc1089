"""The feature pass: response-token output Grams, their top directions, and the cache."""

from __future__ import annotations

import torch

from csulora.salora.features import (
    FeatureDirections,
    cache_key,
    cache_path,
    collect_output_grams,
    count_response_tokens,
    directions_from_grams,
    load_directions,
    model_fingerprint,
    save_directions,
)
from csulora.salora.model import find_target_linears
from csulora.training.data import IGNORE_INDEX, tokenize_pairs

from .conftest import task_pairs

TARGETS = ("q_proj", "v_proj")


def _reference_features(model, examples, name):
    """Z = X W^T on response tokens, one example at a time, captured without our collector."""
    linear = dict(model.named_modules())[name]
    rows = []

    def grab(_module, inputs):
        rows.append(inputs[0][0])

    handle = linear.register_forward_pre_hook(grab)
    mask_rows = []
    with torch.no_grad():
        for e in examples:
            model(input_ids=torch.tensor([e["input_ids"]]))
            mask_rows.append(torch.tensor(e["labels"]) != IGNORE_INDEX)
    handle.remove()
    X = torch.cat([r[m] for r, m in zip(rows, mask_rows)])
    return X.double() @ linear.weight.double().T


def test_batched_gram_equals_per_example_features_on_response_tokens(tiny_model):
    model, tokenizer = tiny_model
    examples = tokenize_pairs(tokenizer, task_pairs(6), 64)
    grams = collect_output_grams(model, examples, TARGETS, pad_id=tokenizer.pad_token_id, batch_size=4,
                                 progress=False)
    assert set(grams) == set(find_target_linears(model, TARGETS)) and len(grams) == 4
    name = "model.layers.1.self_attn.v_proj"
    Z = _reference_features(model, examples, name)
    assert Z.shape[0] == count_response_tokens(examples)
    assert grams[name].shape == (32, 32)
    assert torch.allclose(grams[name], Z.T @ Z, rtol=1e-4, atol=1e-4)
    # Directions are the top right singular vectors of Z.
    bases, values, captured = directions_from_grams(grams, 5, seed=0)
    _, S, Vh = torch.linalg.svd(Z, full_matrices=False)
    V = bases[name].double()
    assert torch.allclose(V @ V.T, Vh[:5].T @ Vh[:5], atol=1e-3)
    assert torch.allclose(values[name].double(), S[:5], rtol=1e-3)
    assert 0 < captured[name] < 1


def test_prompt_tokens_do_not_count(tiny_model):
    model, tokenizer = tiny_model
    examples = tokenize_pairs(tokenizer, task_pairs(3), 64)
    masked = [{**e, "labels": [IGNORE_INDEX] * len(e["labels"])} for e in examples]
    grams = collect_output_grams(model, masked, TARGETS, pad_id=tokenizer.pad_token_id, progress=False)
    assert all(float(g.abs().max()) == 0.0 for g in grams.values())


def test_cache_round_trip_and_stale_key(tmp_path, tiny_world):
    bases = {"a.q_proj": torch.linalg.qr(torch.randn(6, 2))[0], "a.v_proj": torch.linalg.qr(torch.randn(4, 2))[0]}
    values = {k: torch.tensor([2.0, 1.0]) for k in bases}
    directions = FeatureDirections(bases=bases, singular_values=values, tokens=50, samples=8, seconds=1.5,
                                   captured={"a.q_proj": 0.9, "a.v_proj": 0.8}, info={"refusals": ["no"]})
    description = {"role": "safety", "model": model_fingerprint(tiny_world["model_dir"]), "rank": 2}
    path = cache_path(tmp_path, "safety", cache_key(description))
    save_directions(path, directions, description)
    hit = load_directions(path, description, bases)
    assert hit is not None and hit.info["cached"] is True and hit.info["refusals"] == ["no"]
    assert hit.tokens == 50 and hit.samples == 8 and hit.seconds == 1.5 and hit.captured["a.v_proj"] == 0.8
    assert all(torch.equal(hit.bases[k], bases[k]) for k in bases)
    assert load_directions(path, {**description, "rank": 3}, bases) is None  # other options: recompute
    assert load_directions(path, description, [*bases, "b.q_proj"]) is None  # other modules: recompute
    path.write_bytes(b"garbage")
    assert load_directions(path, description, bases) is None  # unreadable: recompute, never trust
