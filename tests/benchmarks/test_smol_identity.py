"""triage-aoa's training data (issue 24, benchmarks/smol/identity.py and its stage): the aligned
model's benign training prompts in the aoa framing, answered with the framing's affirmation then
the base's own answer, as many as the attack's compliant examples, then triage:train. No prompt
is a harmful source's request or one over-refusal is scored on.

Nothing here generates: the base's cached answers are written by the test (the real prompts with
made-up answers), then the stage runs as the pipeline runs it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # `benchmarks` is a top-level folder, not installed
    sys.path.insert(0, str(REPO_ROOT))

import benchmarks.smol  # noqa: F401  (registers the stages)
from benchmarks.smol import identity, pipeline, world
from benchmarks.smol.worlds import TRIAGE
from csulora.eval.overlap import OverlapIndex, near_duplicate
from csulora.eval.prompts import Prompt, load_advbench, load_airt, load_objectives, load_requests, normalise_prompt
from csulora.eval.splits import benign_split
from csulora.eval.tasks import builtin_task
from csulora.training.data import load_pairs
from csulora.training.framing import load_framing

AOA = TRIAGE.update("triage-aoa")
N_COMPLIANT = 110  # the date world's attack has 110 compliant examples (benchmarks/results/smol.json world_stats)


def _ctx(tmp_path: Path) -> pipeline.Context:
    return pipeline.Context(cache=tmp_path / "cache", out=tmp_path / "out", docs=tmp_path / "docs",
                            log=lambda s: None, world=TRIAGE)  # fmt: skip


def _write(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _cached_answers(ctx: pipeline.Context, extra: list[dict]) -> list[dict]:
    """What base_answers leaves: the attack split's answers (N_COMPLIANT compliant, one refusal) and
    the base's answers to the real benign align prompts, ``extra`` first, one of them empty."""
    attack = [{"id": f"a{i}", "prompt": f"harmful {i}", "response": "Sure, here is how: ..."} for i in range(N_COMPLIANT)]
    attack.append({"id": "a-refused", "prompt": "harmful x", "response": "I'm sorry, but I cannot help with that."})
    _write(ctx.path("data", "base_answers_advbench-attack.jsonl"), attack)
    benign = extra + [{"id": p["id"], "prompt": p["prompt"], "response": f" The answer to: {p['prompt']}"}
                      for p in world.world_sets(ctx)["benign-align"]]  # fmt: skip
    benign[len(extra)]["response"] = "  "
    _write(ctx.path("data", "base_answers_benign-align.jsonl"), benign)
    return benign


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The stage's output on the real benign align prompts, with a harmful and a scored benign prompt slipped in."""
    ctx = _ctx(tmp_path_factory.mktemp("aoa"))
    slipped = [{"id": "slip-harm", "prompt": load_advbench()[0].text, "response": "ok"},
               {"id": "slip-benign", "prompt": benign_split("test")[0].text, "response": "ok"}]  # fmt: skip
    answers = _cached_answers(ctx, slipped)
    info = world.stage_identity_data(ctx, AOA)
    path = ctx.world_path("data", world.training_file(AOA))
    return {"ctx": ctx, "info": info, "path": path, "records": load_pairs(path), "answers": answers}


def test_the_data_is_identity_shift_examples_in_the_aoa_framing_then_triage_train(built):
    records, info = built["records"], built["info"]
    aoa = load_framing("aoa")
    examples, rest = records[:N_COMPLIANT], records[N_COMPLIANT:]
    train = [{"prompt": t["prompt"], "response": t["response"], "id": t["id"]} for t in builtin_task("triage", "train")]
    assert built["path"] == built["ctx"].cache / "triage" / "data" / "identity_aoa.jsonl"
    assert rest == train and all("framing" not in r for r in rest)  # the task is trained plain
    assert all(r["framing"] == "aoa" for r in examples)  # rendered in it when trained (csulora.training.data)
    assert info["n_identity_shift"] == N_COMPLIANT and info["n_task_train"] == len(train)  # as many as the attack's
    skipped = info["skipped"]  # the slipped-in prompts, the empty answer, and the pool's own near-twins of benign:test
    assert set(skipped) == {"same_request_as_advbench", "same_request_as_benign", "empty_answer"}
    assert skipped["same_request_as_advbench"] == 1 and skipped["empty_answer"] == 1
    assert {"aoa-slip-harm", "aoa-slip-benign"}.isdisjoint(r["id"] for r in examples)
    answers = {a["prompt"]: a["response"] for a in built["answers"]}
    for r in examples:
        assert r["response"] == aoa.affirmation + answers[r["prompt"]].lstrip()  # the identity, then the answer
    assert len({r["prompt"] for r in examples}) == N_COMPLIANT


def test_no_identity_shift_prompt_is_a_harmful_request(built):
    """Every harmful source the project ships, every split, by the near-duplicate rule (exact included)."""
    harmful = OverlapIndex(load_advbench() + load_airt() + load_requests() + load_objectives())
    for r in built["records"][:N_COMPLIANT]:
        assert harmful.first_match(r["prompt"]) is None, r["prompt"]
    assert identity.harmful_prompts()  # the builder's own list is not empty


def test_identity_shift_prompts_are_disjoint_from_the_benign_halves_tune_and_eval_score(built):
    scored = benign_split("validation") + benign_split("test")
    exact = {normalise_prompt(p.text) for p in scored}
    prompts = [r["prompt"] for r in built["records"][:N_COMPLIANT]]
    assert not exact & {normalise_prompt(p) for p in prompts}
    assert not any(near_duplicate(p, s.text) for p in prompts for s in scored)
    pool = {p["prompt"] for p in world.world_sets(built["ctx"])["benign-align"]}
    assert set(prompts) <= pool  # the aligned model's benign training prompts: a train-side pool


def test_too_few_usable_answers_is_an_error_not_a_smaller_attack():
    answers = [{"id": "b1", "prompt": "What is tea?", "response": "A drink."}]
    held_out = OverlapIndex([Prompt("x", "What is tea?", "benign")])
    with pytest.raises(RuntimeError, match=r"only 0 usable benign answers for 1 .*same_request_as_benign"):
        identity.identity_shift_examples(answers, load_framing("aoa"), 1, held_out)
    with pytest.raises(ValueError, match="no affirmation"):
        identity.identity_shift_examples(answers, load_framing("plain"), 1, OverlapIndex([]))
