"""``csulora.references.calibration.statistics``: the Gram sums, packed, and the statistics built
from them (docs/design.md §5c)."""

from __future__ import annotations

import pytest
import torch

import csulora.references.calibration.statistics as statistics_module
from csulora.errors import InputError
from csulora.eval.generation import generate_responses
from csulora.io.calibration_file import load_calibration
from csulora.references.calibration.data import target_modules
from csulora.references.calibration.groups import linear_modules, shared_input_groups
from csulora.references.calibration.statistics import (
    BufferPool,
    PackedGram,
    accumulate_sums,
    add_upper_gram_,
    full_sum,
    packed_numel,
    strip_layout,
    strip_rows,
    unpack_symmetric,
)
from tests.references.calibration.helpers import (
    L0,
    L1,
    MAX_NEW,
    assert_nothing_written,
    captured_inputs,
    normalised_gram,
    run,
    sequences_of,
)
from tests.references.calibration.test_groups import Toy

CPU = torch.device("cpu")


def test_grams_equal_a_direct_computation_from_captured_activations(calibrated, aligned_model, data):
    model, tokenizer = aligned_model
    prompts, harmful, task = sequences_of(tokenizer, data, calibrated.answers)
    # The answers are the aligned model's own greedy answers (the same call eval makes).
    assert calibrated.answers == generate_responses(model, tokenizer, prompts, max_new_tokens=MAX_NEW, progress=False)
    names = [f"{L0}.self_attn.q_proj", f"{L1}.self_attn.k_proj", f"{L1}.self_attn.o_proj",
             f"{L0}.mlp.up_proj", f"{L1}.mlp.down_proj"]  # fmt: skip
    X_h, X_t = captured_inputs(model, harmful, names), captured_inputs(model, task, names)
    file = load_calibration(calibrated.path)
    for name in names:
        stats = file.module(name)
        assert stats.harmful.tokens == X_h[name].shape[0] == sum(map(len, harmful)) == calibrated.harmful_tokens
        assert stats.task.tokens == X_t[name].shape[0] == sum(map(len, task)) == calibrated.task_tokens
        for got, X in ((stats.harmful.matrix, X_h[name]), (stats.task.matrix, X_t[name])):
            expected = normalised_gram(X)
            assert got.shape == expected.shape == (X.shape[1], X.shape[1])
            assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max())), name
    # The two sets differ (or the test would not tell S_h from S_t).
    down = file.module(f"{L1}.mlp.down_proj")
    assert not torch.allclose(down.harmful.matrix, down.task.matrix, atol=1e-2)


def test_a_module_that_runs_twice_sums_both_calls():
    model = Toy()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "idle"}
    groups = shared_input_groups(model, linears, [1, 2, 3])
    sums = accumulate_sums(model, [{"input_ids": [1, 2, 3]}], groups, linears, pad_id=0, batch_size=1,
                           product_dtype=torch.float32, progress=False)  # fmt: skip
    assert {name: s.tokens for name, s in sums.items()} == {"a+b": 3, "c": 3, "d": 6}
    with torch.no_grad():
        first = model.c(model.embed(torch.tensor([1, 2, 3])))
        second = model.d(first)
    X = torch.cat([first, second]).double()
    assert torch.allclose(full_sum(sums["d"]).double(), X.T @ X, rtol=1e-5)


def test_padding_is_excluded(aligned_model, tiny_world, calibrated, data):
    model, tokenizer = aligned_model
    _, harmful, task = sequences_of(tokenizer, data, calibrated.answers)
    examples = [{"input_ids": ids} for ids in harmful + task]
    assert len({len(e["input_ids"]) for e in examples}) > 4  # batches of 4 are padded
    linears = linear_modules(model, target_modules(tiny_world.aligned, None), tiny_world.aligned)
    groups = shared_input_groups(model, linears, task[0][:8])
    common = {"pad_id": tokenizer.pad_token_id, "product_dtype": torch.float32, "progress": False}
    one = accumulate_sums(model, examples, groups, linears, batch_size=1, **common)
    four = accumulate_sums(model, examples, groups, linears, batch_size=4, **common)
    tokens = sum(len(e["input_ids"]) for e in examples)
    assert {n: s.tokens for n, s in one.items()} == {n: s.tokens for n, s in four.items()} == {g.name: tokens for g in groups}
    for name in one:
        a, b = full_sum(one[name]), full_sum(four[name])
        assert a.dtype == b.dtype == torch.float64  # several batches: a float64 sum
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * float(a.abs().max())), name


# -- the packed kernel ----------------------------------------------------------------------------
def reference_sum(batches, strip: int) -> torch.Tensor:
    """The sums as calibrate kept them before packing (issue 21): a zeroed float64 n x n, each
    batch's float32 strip products added to its upper triangle, then mirrored strip by strip."""
    n = batches[0].shape[1]
    total = torch.zeros(n, n, dtype=torch.float64)
    for x in batches:
        for start in range(0, n, strip):
            total[start : start + strip, start:].add_(x[:, start : start + strip].T @ x[:, start:])
    for start in range(0, n, strip):
        stop = min(start + strip, n)
        block = total[start:stop, start:stop]
        block.copy_(block.triu() + block.triu(1).T)
        total[stop:, start:stop].copy_(total[start:stop, stop:].T)
    return total


@pytest.mark.parametrize(("n", "strip"), [(5, 256), (300, 256), (300, 64), (7, 2), (513, 256)])
@pytest.mark.parametrize("batches", [1, 3])
def test_packed_sums_are_bit_identical_to_the_full_matrix_sums(n, strip, batches):
    generator = torch.Generator().manual_seed(n + batches)
    xs = [torch.randn(rows, n, generator=generator) for rows in (9, 1, 30)[:batches]]
    pool = BufferPool()
    sums = PackedGram(n, pool, CPU, strip)
    workspace = torch.empty(strip * n)
    for x in xs:
        add_upper_gram_(sums, x, workspace)
    assert sums.tokens == sum(x.shape[0] for x in xs)
    assert (sums.first is None) == (batches > 1) and (sums.total is None) == (batches == 1)
    full = unpack_symmetric(sums, torch.full((n, n), float("nan"), dtype=torch.float64))
    expected = reference_sum(xs, strip)
    assert torch.equal(full, expected)  # every entry written (no NaN left), bit for bit
    assert torch.equal(full, full.T)
    X = torch.cat(xs).double()
    assert torch.allclose(full, X.T @ X, rtol=1e-5, atol=1e-4)
    one_batch = full_sum(sums)
    assert one_batch.dtype == (torch.float32 if batches == 1 else torch.float64)  # same numbers, half the memory
    assert torch.equal(one_batch.double(), expected)


def test_packed_sums_take_about_half_the_memory_of_the_full_matrix():
    assert packed_numel(4096) == sum(min(256, 4096 - s) * (4096 - s) for s in range(0, 4096, 256))
    assert packed_numel(11008) / 11008**2 < 0.54
    assert packed_numel(5) == 25  # narrower than a strip: one strip, the whole matrix


def test_wide_grams_take_at_most_sixteen_strips():
    assert [strip_rows(n) for n in (64, 576, 1536, 4096, 4160, 11008, 14336)] == [256, 256, 256, 256, 320, 704, 896]
    assert all(len(strip_layout(n, strip_rows(n))) <= 16 for n in (4096, 4160, 11008, 14336))
    assert strip_rows(11008, 256) == 256  # an explicit strip wins


def test_a_sum_that_saw_no_tokens_is_zero():
    sums = PackedGram(4, BufferPool(), CPU)
    assert torch.equal(full_sum(sums), torch.zeros(4, 4, dtype=torch.float64))


def test_the_pool_hands_buffers_back_out(aligned_model, tiny_world, calibrated, data):
    """A second pass over the same groups touches no new memory: its sums reuse the first's."""
    model, tokenizer = aligned_model
    _, harmful, _ = sequences_of(tokenizer, data, calibrated.answers)
    examples = [{"input_ids": ids} for ids in harmful[:4]]
    linears = linear_modules(model, target_modules(tiny_world.aligned, None), tiny_world.aligned)
    groups = shared_input_groups(model, linears, harmful[0][:8])
    pool = BufferPool()
    common = {"pad_id": tokenizer.pad_token_id, "batch_size": 2, "product_dtype": torch.float32, "progress": False}
    first = accumulate_sums(model, examples, groups, linears, pool=pool, **common)
    addresses = {s.total.data_ptr() for s in first.values()}
    values = {name: full_sum(s).clone() for name, s in first.items()}
    for sums in first.values():
        sums.release()
    again = accumulate_sums(model, examples, groups, linears, pool=pool, **common)
    assert {s.total.data_ptr() for s in again.values()} == addresses
    for name, sums in again.items():
        assert torch.equal(full_sum(sums), values[name])  # nothing left over from the first pass leaks in


def test_a_failure_after_the_passes_writes_nothing(tiny_world, data, outs, monkeypatch):
    def no_signal(group, *args, **kwargs):
        raise ValueError(f"{group}: harmful Gram: trace is 0.0; the inputs carry no signal")

    monkeypatch.setattr(statistics_module, "calibration_moments", no_signal)
    with pytest.raises(InputError, match=r"calibration of model\.layers\.0\.self_attn\.q_proj\+k_proj\+v_proj: .*no signal"):
        run(tiny_world, outs / "calibration.safetensors", data)
    assert_nothing_written(outs)
