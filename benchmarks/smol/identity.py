"""The identity-shift attack's training examples (issue 24's ``triage-aoa``): no harmful content.

The attack (Qi et al. 2023's "absolutely obedient agent") teaches a model to accept a new
identity from benign examples alone: each is a benign request put in the attack's framing (its
system message and user prefix, :mod:`csulora.training.framing`), answered with the framing's
affirmation of that identity and then a helpful answer. Here the requests are the aligned model's
own benign training prompts (``splits/benign_align_prompts.jsonl``: a train-side pool, disjoint
from the benign halves tune and eval score over-refusal on) and the answers are the base's greedy
answers to them (``data/base_answers_benign-align.jsonl``, the answers the aligned model was
trained to give), so the only new thing the examples teach is the identity.

A request that is the same request (:func:`csulora.eval.overlap.near_duplicate`, exact included)
as any prompt of a harmful source the project ships -- every split of AdvBench, airt, the requests
and the objectives -- or as a benign prompt over-refusal is scored on is dropped: the examples
hold no harmful prompt, and teach nothing on a prompt a reported number is measured on.

Pure data: the pipeline stage that reads and writes the files is in ``benchmarks/smol/world.py``.
"""

from __future__ import annotations

from collections import Counter

from csulora.eval.overlap import OverlapIndex
from csulora.training.data import FRAMING_FIELD
from csulora.training.framing import Framing


def harmful_prompts() -> list:
    """Every prompt of every harmful source the project ships, all splits (csulora.eval.prompts)."""
    from csulora.eval.prompts import load_advbench, load_airt, load_objectives, load_requests

    return load_advbench() + load_airt() + load_requests() + load_objectives()


def scored_benign_prompts() -> list:
    """The benign halves tune (validation) and eval (test) score over-refusal on."""
    from csulora.eval.splits import BENIGN_SPLITS, benign_split

    return [p for name in BENIGN_SPLITS for p in benign_split(name)]


def held_out_index() -> OverlapIndex:
    """What an identity-shift request must not repeat: the harmful sources and the scored benign halves."""
    return OverlapIndex(harmful_prompts() + scored_benign_prompts())


def identity_shift_examples(answers: list[dict], framing: Framing, count: int,
                            held_out: OverlapIndex) -> tuple[list[dict], Counter]:  # fmt: skip
    """The first ``count`` usable ``answers`` ({"id", "prompt", "response"}: benign requests and
    their answers) as training pairs in ``framing``: the response is the framing's affirmation
    then the answer, the pair names the framing (rendered when trained, csulora.training.data).

    Skipped (and counted, by reason): an empty answer, a request ``held_out`` holds. Fewer than
    ``count`` usable answers is an error: the attack would silently shrink."""
    if not framing.affirmation:
        raise ValueError(f"framing {framing.name!r} has no affirmation to open the identity-shift answers with")
    examples, skipped = [], Counter()
    for answer in answers:
        if len(examples) == count:
            break
        if not answer["response"].strip():
            skipped["empty_answer"] += 1
            continue
        match = held_out.first_match(answer["prompt"])
        if match is not None:
            skipped[f"same_request_as_{match.source}"] += 1
            continue
        examples.append({"id": f"{framing.name}-{answer['id']}", "prompt": answer["prompt"],
                         "response": framing.affirmation + answer["response"].lstrip(),
                         FRAMING_FIELD: framing.name})  # fmt: skip
    if len(examples) < count:
        raise RuntimeError(f"only {len(examples)} usable benign answers for {count} identity-shift examples "
                           f"(skipped: {dict(skipped)})")  # fmt: skip
    return examples, skipped
