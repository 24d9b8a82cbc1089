"""The harmful prompts ``calibrate`` runs the aligned model on, and the overlap guard.

The default calibration set (docs/design.md §5c: "harmful prompts") is AdvBench's
``align`` split (the aligned model's own safety data) plus the project's ``requests``
set, which adds categories and phrasings AdvBench lacks (questions, role-play, terse
asks). Calibrating on a prompt that is later scored would flatter the correction, so a
calibration set is checked against the evaluation sets (AdvBench validation and test, airt,
the benign sets and the second harmful source ``objectives``) by normalised text
(:func:`csulora.eval.prompts.normalise_prompt`: lowercase, punctuation dropped,
whitespace collapsed)::

    prompts = calibration_harmful_prompts()
    check_disjoint(prompts, held_out_sets())
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from csulora.errors import InputError
from csulora.eval.prompts import Prompt, load_benign, load_requests, normalise_prompt
from csulora.eval.splits import advbench_split, airt_split, benign_split, objectives_split


def calibration_harmful_prompts() -> list[Prompt]:
    """AdvBench ``align`` (200) + ``requests`` (200); needs pyrit for AdvBench."""
    return advbench_split("align") + load_requests()


def held_out_sets() -> dict[str, list[Prompt]]:
    """The prompt sets a calibration set must not touch: validation and test sets by spec."""
    return {
        "advbench:validation": advbench_split("validation"),
        "advbench:test": advbench_split("test"),
        "airt:val": airt_split("airt-val"),
        "airt:test": airt_split("airt-test"),
        "benign": load_benign(),
        "benign:validation": benign_split("validation"),
        "benign:test": benign_split("test"),
        # The second harmful source (docs/second_source.md): built to share no prompt, exactly
        # or as a near-duplicate, with the default calibration set; this guards user sets too.
        "objectives:validation": objectives_split("validation"),
        "objectives:test": objectives_split("test"),
    }


def check_disjoint(calibration: Sequence[Prompt], others: Mapping[str, Sequence[Prompt]]) -> None:
    """InputError naming the first calibration prompt (in order) whose normalised text is in
    one of ``others`` (checked in mapping order) and that set; returns None when disjoint."""
    index = {name: {normalise_prompt(p.text): p for p in prompts} for name, prompts in others.items()}
    for prompt in calibration:
        key = normalise_prompt(prompt.text)
        for name, texts in index.items():
            if key in texts:
                raise InputError(
                    f"calibration prompt {prompt.id} ({_short(prompt.text)}) is also in {name} "
                    f"as {texts[key].id}: calibrate on prompts that are never scored"
                )


def _short(text: str, width: int = 60) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= width else flat[: width - 3] + "...")
