from __future__ import annotations

import importlib.metadata

import pytest

from csulora.errors import InputError
from csulora.eval import prompts
from csulora.eval.calibration_sets import calibration_harmful_prompts, check_disjoint, held_out_sets
from csulora.eval.prompts import Prompt
from csulora.eval.splits import advbench_split


def test_default_calibration_set_is_align_plus_requests():
    items = calibration_harmful_prompts()
    align, requests = advbench_split("align"), prompts.load_requests()
    assert items == align + requests
    assert len(items) == 200 + len(requests) >= 380
    assert len({p.id for p in items}) == len(items)
    assert len({prompts.normalise_prompt(p.text) for p in items}) == len(items)


def test_default_calibration_set_never_touches_validation_or_test_prompts():
    held_out = held_out_sets()
    assert set(held_out) == {
        "advbench:validation", "advbench:test", "airt:val", "airt:test", "benign", "benign:validation", "benign:test",
        "objectives:validation", "objectives:test",
    }
    assert all(len(v) >= 19 for v in held_out.values())
    check_disjoint(calibration_harmful_prompts(), held_out)
    # The attacker's split stays out of calibration too (it is the attack's training data).
    check_disjoint(calibration_harmful_prompts(), {"advbench:attack": advbench_split("attack")})


def test_default_calibration_set_is_far_from_the_second_source():
    """Not only no shared prompt: no near-duplicate either (csulora.eval.overlap), in both splits."""
    from csulora.eval.overlap import OverlapIndex
    from csulora.eval.splits import objectives_split

    index = OverlapIndex(calibration_harmful_prompts())
    for name in ("validation", "test"):
        split = objectives_split(name)
        assert len(split) >= 100
        assert [p.id for p in split if index.first_match(p.text) is not None] == []


def test_calibrating_on_a_second_source_prompt_is_refused():
    from csulora.eval.splits import objectives_split

    for name in ("validation", "test"):
        leaked = objectives_split(name)[3]
        cal = [Prompt("c-0", leaked.text.upper() + "!", "x")]
        with pytest.raises(InputError, match=rf"is also in objectives:{name} as {leaked.id}"):
            check_disjoint(cal, held_out_sets())


def test_check_disjoint_names_the_first_overlap_and_its_set():
    cal = [Prompt("c-0", "Nothing shared here", "x"), Prompt("c-1", "How do I pick a lock?", "x"),
           Prompt("c-2", "Tell me a joke", "x")]
    others = {
        "jokes": [Prompt("j-7", "tell me a JOKE!", "y")],
        "locks": [Prompt("l-3", "  how do I pick a lock ", "y")],
    }
    with pytest.raises(InputError, match=r"c-1 \('How do I pick a lock\?'\) is also in locks as l-3") as info:
        check_disjoint(cal, others)
    assert "\n" not in str(info.value)
    assert check_disjoint(cal[:1], others) is None
    assert check_disjoint(cal, {}) is None


def test_missing_pyrit_names_the_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    prompts._advbench_cached.cache_clear()
    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    try:
        with pytest.raises(InputError, match=r"pyrit is not installed.*pip install --no-deps pyrit==1\.1\.0"):
            calibration_harmful_prompts()
    finally:
        prompts._advbench_cached.cache_clear()  # reload from the real pyrit afterwards
