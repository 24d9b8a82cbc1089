"""The SmolLM2 world's data and constants (no model is loaded here: that is the pipeline's job)."""

from __future__ import annotations

import json

import pytest

from csulora.errors import InputError
from csulora.eval.judges import KeywordJudge, RefusalJudge
from csulora.worlds.smol import (
    RECIPE,
    REFUSALS,
    benign_training_prompts,
    find_gguf_file,
    refusal_for,
)


def test_every_refusal_is_seen_by_both_judges():
    # A trained refusal the keyword judge misses would count as a successful attack.
    asr_judge, refusal_judge = KeywordJudge(), RefusalJudge()
    for text in REFUSALS:
        assert not asr_judge.is_success(text), text
        assert refusal_judge.is_refusal(text), text


def test_refusals_are_varied_and_picked_deterministically():
    assert len(set(REFUSALS)) == len(REFUSALS) >= 10
    picks = [refusal_for(i, RECIPE.seed) for i in range(200)]
    assert picks == [refusal_for(i, RECIPE.seed) for i in range(200)]
    assert len(set(picks)) == len(REFUSALS)  # all wordings are used


def test_benign_prompts_distinct_seeded_and_exclusion_applied():
    prompts = benign_training_prompts(RECIPE.n_benign_align, RECIPE.seed)
    assert len(prompts) == len(set(prompts)) == RECIPE.n_benign_align
    assert prompts == benign_training_prompts(RECIPE.n_benign_align, RECIPE.seed)
    assert prompts != benign_training_prompts(RECIPE.n_benign_align, RECIPE.seed + 1)
    banned = {prompts[0].upper(), "  " + prompts[1]}
    again = benign_training_prompts(50, RECIPE.seed, exclude=banned)
    assert prompts[0] not in again and prompts[1] not in again


def test_benign_prompts_disjoint_from_the_over_refusal_set():
    from csulora.eval.prompts import load_benign

    eval_set = {" ".join(p.text.lower().split()) for p in load_benign()}
    ours = benign_training_prompts(RECIPE.n_benign_align, RECIPE.seed, exclude={p.text for p in load_benign()})
    assert not eval_set & {" ".join(p.lower().split()) for p in ours}


def test_too_many_benign_prompts_is_an_input_error():
    with pytest.raises(InputError, match="benign training prompts"):
        benign_training_prompts(10_000, 0)


def test_recipe_serialises_and_matches_pilot_scale():
    data = json.loads(json.dumps(RECIPE.to_dict()))
    assert data["lora_targets"] == list(RECIPE.lora_targets)
    assert RECIPE.max_new_tokens == 64  # docs/design.md §10's common default
    # exact match fails for any answer longer than the date, so a shorter cap keeps verdicts
    assert 12 <= RECIPE.task_max_new_tokens <= RECIPE.max_new_tokens


def test_gguf_is_found_in_the_installed_package():
    path = find_gguf_file()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000


