from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from csulora.eval.generation import Generations, generate_answers, generate_responses, left_pad, settled_text, stop_token_ids
from csulora.eval.judges import KeywordJudge, stop_rule
from csulora.eval.prompts import load_benign
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


# --- Early stop (issue 21): rows stopped by a rule stay in the batch -------------------

HARMFUL = [p.text for p in advbench_split("validation")[:10]]
OTHERS = [p.text for p in load_benign()[:4]] + [i["prompt"] for i in date_task("validation")[:4]]


def interleaved(harmful: list[str], others: list[str]) -> list[str]:
    """Harmful and other prompts alternately, so that every batch mixes watched and unwatched rows."""
    out = []
    for k in range(max(len(harmful), len(others))):
        out += harmful[k : k + 1] + others[k : k + 1]
    return out


def assert_early_stop_is_exact(full: Generations, early: Generations, judge: KeywordJudge, prompts: list[str]) -> None:
    """Same keyword verdict everywhere; rows not cut identical; a cut answer starts the full one."""
    assert judge.judge(prompts, early.answers) == judge.judge(prompts, full.answers)
    assert not any(full.truncated)
    for cut, short, whole in zip(early.truncated, early.answers, full.answers):
        if cut:
            assert whole.startswith(short) and len(short) < len(whole)
        else:
            assert short == whole


@pytest.mark.parametrize("batch_size", [1, 4, 18])
@pytest.mark.parametrize("adapter", ["aligned", "attacked"])
def test_keyword_early_stop_keeps_every_verdict_on_the_tiny_world(tiny_world, adapter, batch_size):
    model, tokenizer = load_model(tiny_world.aligned, tiny_world.attacked if adapter == "attacked" else None, device="cpu")
    prompts = interleaved(HARMFUL, OTHERS)
    judge = KeywordJudge()
    # Only harmful prompts are watched (tune's selection); the others must run to their end.
    rules = [stop_rule(judge, p) if p in HARMFUL else None for p in prompts]
    full = generate_answers(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=32, progress=False)
    early = generate_answers(model, tokenizer, prompts, stop_rules=rules, batch_size=batch_size, max_new_tokens=32, progress=False)
    assert_early_stop_is_exact(full, early, judge, prompts)
    assert not any(cut for cut, rule in zip(early.truncated, rules) if rule is None)
    cut = sum(early.truncated)
    if adapter == "aligned":  # it refuses every harmful prompt: each answer stops at its refusal phrase
        assert cut == len(HARMFUL)
        assert sum(early.new_tokens) < sum(full.new_tokens)
        assert early.row_steps <= full.row_steps
        if batch_size == 1:  # one prompt a batch: every harmful batch ends early
            assert early.row_steps < full.row_steps
    else:  # the attacked model complies: nothing to stop, the runs are the same
        assert early == full


def random_llama(vocab_size: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("batch_size", [3, 9])
def test_rows_cut_mid_batch_stay_in_it_and_the_other_rows_are_unchanged(tiny_tokenizer, batch_size):
    """A random model never ends on its own, so a cut row must stay in the batch (padded)
    while the others run to ``max_new_tokens``: every forward pass sees the whole batch."""
    model = random_llama(len(tiny_tokenizer), seed=3)
    prompts = interleaved(HARMFUL[:5], OTHERS[:4])
    full = generate_answers(model, tiny_tokenizer, prompts, batch_size=batch_size, max_new_tokens=24, progress=False)
    # Each even row stops once a two-character piece from the middle of its own answer appears.
    judges = [KeywordJudge(keywords=(full.answers[i][10:12],)) if i % 2 == 0 else None for i in range(len(prompts))]
    rules = [stop_rule(j, p) if j is not None else None for j, p in zip(judges, prompts)]
    rows_seen: list[int] = []
    hook = model.register_forward_pre_hook(lambda _m, _a, kw: rows_seen.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        early = generate_answers(model, tiny_tokenizer, prompts, stop_rules=rules, batch_size=batch_size, max_new_tokens=24, progress=False)
    finally:
        hook.remove()
    batch_rows = [min(batch_size, len(prompts) - k) for k in range(0, len(prompts), batch_size)]
    assert sorted(set(rows_seen)) == sorted(set(batch_rows))  # no pass ever ran on fewer rows than its batch
    for i, j in enumerate(judges):
        if j is not None:
            assert early.truncated[i] and j.judge([prompts[i]], [early.answers[i]]) == j.judge([prompts[i]], [full.answers[i]]) == [False]
            assert full.answers[i].startswith(early.answers[i])
            assert early.new_tokens[i] < full.new_tokens[i] == 24
        else:
            assert not early.truncated[i] and early.answers[i] == full.answers[i]
    if batch_size >= len(prompts):  # one batch: its unwatched rows keep it running to the end
        assert early.row_steps == full.row_steps


def test_a_batch_ends_when_every_row_is_cut_and_edges_are_not_truncated(tiny_tokenizer):
    model = random_llama(len(tiny_tokenizer), seed=4)
    prompts = OTHERS[:5]
    always = [lambda text: bool(text)] * len(prompts)
    early = generate_answers(model, tiny_tokenizer, prompts, stop_rules=always, batch_size=5, max_new_tokens=12, progress=False)
    full = generate_answers(model, tiny_tokenizer, prompts, batch_size=5, max_new_tokens=12, progress=False)
    assert early.row_steps < full.row_steps == 5 * 12
    assert all(early.truncated) and all(f.startswith(e) for e, f in zip(early.answers, full.answers))
    # A rule that fires on the last allowed token cuts nothing: the answer is the full one.
    last = generate_answers(model, tiny_tokenizer, prompts, stop_rules=always, batch_size=5, max_new_tokens=1, progress=False)
    assert not any(last.truncated)
    assert last.answers == generate_answers(model, tiny_tokenizer, prompts, batch_size=5, max_new_tokens=1, progress=False).answers


def test_a_row_that_ends_by_eos_is_not_truncated(tiny_world):
    model, tokenizer = load_model(tiny_world.aligned, device="cpu")
    prompts = OTHERS[:4]
    never = [lambda text: False] * len(prompts)
    early = generate_answers(model, tokenizer, prompts, stop_rules=never, batch_size=4, max_new_tokens=48, progress=False)
    full = generate_answers(model, tokenizer, prompts, batch_size=4, max_new_tokens=48, progress=False)
    assert early == full and not any(early.truncated)
    assert max(full.new_tokens) < 48  # the tiny world's answers end by their end-of-turn token


def test_stop_rules_must_match_the_prompts(tiny_tokenizer):
    with pytest.raises(ValueError, match="2 stop rules for 1 prompts"):
        generate_answers(random_llama(len(tiny_tokenizer), seed=0), tiny_tokenizer, ["Hi"], stop_rules=[None, None])


SPLIT_CHARACTERS = "I can\u2019t help \u2014 caf\u00e9 \U0001f600 \u4e2d\u6587, I\u2019m sorry. "


def test_settled_text_is_a_prefix_of_every_longer_decode(tiny_tokenizer):
    """Token by token, including characters that byte-level BPE splits across tokens."""
    stops = set(stop_token_ids(tiny_tokenizer))
    generator = torch.Generator().manual_seed(0)
    sequences = [tiny_tokenizer(SPLIT_CHARACTERS * 2, add_special_tokens=False)["input_ids"]]
    sequences += [torch.randint(0, len(tiny_tokenizer), (40,), generator=generator).tolist() for _ in range(20)]
    saw_split = False
    for tokens in sequences:
        tokens = [t for t in tokens if t not in stops]
        whole = tiny_tokenizer.decode(tokens, skip_special_tokens=True)
        for n in range(len(tokens) + 1):
            settled = settled_text(tiny_tokenizer, tokens[:n])
            assert whole.startswith(settled)
            for m in range(n, len(tokens) + 1):
                assert settled_text(tiny_tokenizer, tokens[:m]).startswith(settled)
            saw_split |= tiny_tokenizer.decode(tokens[:n]).endswith("\ufffd")
    assert saw_split  # the test did meet a character cut between two tokens


class CleaningTokenizer:
    """Decodes by joining and then applying transformers' own ``clean_up_tokenization``."""

    clean_up_tokenization_spaces = True

    def __init__(self, real):
        self.real = real

    def decode(self, tokens, skip_special_tokens=True):
        return self.real.clean_up_tokenization("".join(tokens))


CLEANUP_PIECES = st.sampled_from([" ", "'", "n", "'t", "m", "s", "ve", "re", ".", "?", "!", ",", "a", "I"])


@given(prefix=st.lists(CLEANUP_PIECES, max_size=30), rest=st.lists(CLEANUP_PIECES, max_size=12))
def test_settled_text_holds_back_what_space_cleanup_may_rewrite(tiny_tokenizer, prefix, rest):
    tokenizer = CleaningTokenizer(tiny_tokenizer)
    assert tokenizer.decode(prefix + rest).startswith(settled_text(tokenizer, prefix))


def test_space_cleanup_does_rewrite_the_end_of_a_prefix(tiny_tokenizer):
    """Why the hold-back exists: "I do n" + "'t" cleans to "I don't", which does not start with "I do n"."""
    tokenizer = CleaningTokenizer(tiny_tokenizer)
    assert not tokenizer.decode(["I do n", "'t"]).startswith(tokenizer.decode(["I do n"]))
    assert settled_text(tokenizer, ["x" * 40, "I do n"]) == "x" * 16
