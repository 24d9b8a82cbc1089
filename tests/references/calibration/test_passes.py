"""``csulora.references.calibration.passes`` and ``.replay``: the memory budget, several passes over
the tokens, hidden-state replay and the one progress bar (docs/design.md §5c)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import csulora.references.calibration.passes as passes_module
from csulora.io.calibration_file import load_calibration
from csulora.references.calibration.data import target_modules
from csulora.references.calibration.groups import GramGroup, linear_modules, shared_input_groups
from csulora.references.calibration.passes import collect_statistics, plan_passes, plan_statistics
from csulora.references.calibration.replay import BlockResume, decoder_blocks, replay_is_exact
from csulora.references.calibration.statistics import accumulate_sums, full_sum, sum_bytes
from tests.references.calibration.helpers import run, sequences_of


def test_passes_split_the_groups_by_the_memory_budget():
    groups = [GramGroup(f"g{i}", (f"g{i}",), n) for i, n in enumerate((4, 4, 8, 4))]
    sizes = [sum_bytes(g) for g in groups]
    assert sizes == [256, 256, 1024, 256]  # narrower than a strip: the whole matrix, twice, float64
    assert plan_passes(groups, 10**6) == [groups]
    assert plan_passes(groups, 600) == [groups[:2], groups[2:3], groups[3:]]
    assert plan_passes(groups, 100) == [[g] for g in groups]  # a group over budget runs alone
    wide = GramGroup("w", ("w",), 4096)
    assert sum_bytes(wide) < 2 * 4096 * 4096 * 8 * 0.54  # packed: about half the full matrices


@pytest.mark.parametrize("replay", [True, False])
def test_several_passes_give_the_same_statistics_bit_for_bit(tiny_world, calibrated, data, outs, capsys, monkeypatch,
                                                            replay):  # fmt: skip
    if not replay:  # as for a model whose blocks cannot be skipped: each pass recomputes them
        monkeypatch.setattr(passes_module, "replay_is_exact", lambda *args: False)
    result = run(tiny_world, outs / "passes.safetensors", data, memory_budget_gb=1e-6, progress=True)
    assert result.passes == 8 and result.run["passes_resume_from_cached_hidden_states"] is replay
    err = capsys.readouterr().err
    how = "starting at its first layer from hidden states the last one cached" if replay else (
        "running the model from the start up to its last layer"
    )  # fmt: skip
    assert f"8 passes over the tokens, each {how}" in err
    assert "pass 8/8: 1 groups, model.layers.1.mlp.down_proj" in err
    many, one = load_calibration(result.path), load_calibration(calibrated.path)
    assert many.modules == one.modules
    for module in one.modules:
        a, b = many.module(module), one.module(module)
        assert torch.equal(a.harmful.matrix, b.harmful.matrix) and torch.equal(a.task.matrix, b.task.matrix)
    # The passes decide nothing the file records: its bytes are those of the one-pass run.
    assert result.path.read_bytes() == calibrated.path.read_bytes()


class StatefulBlock(nn.Module):
    """A block that reads what the block before it left in ``shared``: skipping one is wrong."""

    def __init__(self, shared: dict) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.shared = shared

    def forward(self, x, **_kwargs):
        out = self.proj(x + self.shared.get("memory", 0.0))
        self.shared["memory"] = out.mean()
        return out


class StatefulBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared: dict = {}
        self.embed = nn.Embedding(10, 4)
        self.layers = nn.ModuleList(StatefulBlock(self.shared) for _ in range(2))

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        self.shared.clear()
        x = self.embed(input_ids)
        for block in self.layers:
            x = block(x)
        return x


def test_replay_is_used_only_where_it_reproduces_the_forward(aligned_model, tiny_world):
    model, _ = aligned_model
    linears = linear_modules(model, target_modules(tiny_world.aligned, None), tiny_world.aligned)
    blocks = decoder_blocks(model, linears)
    assert blocks is not None and [id(b) for b in blocks] == [id(b) for b in model.model.layers]
    assert replay_is_exact(model, blocks, linears, [1, 5, 9, 4])
    assert not any("forward" in b.__dict__ for b in blocks)  # the replay is undone
    # A model whose second block reads state the first one leaves: replaying is refused.
    toy = StatefulBlocks()
    toy_linears = {"layers.0.proj": toy.layers[0].proj, "layers.1.proj": toy.layers[1].proj}
    toy_blocks = decoder_blocks(toy, toy_linears)
    assert toy_blocks == list(toy.layers)
    assert not replay_is_exact(toy, toy_blocks, toy_linears, [1, 2, 3])
    assert decoder_blocks(toy, {"embed.proj": toy.layers[0].proj}) is None  # not inside a block


def test_a_resumed_pass_equals_one_that_recomputes_the_earlier_blocks(aligned_model, tiny_world, calibrated, data):
    model, tokenizer = aligned_model
    _, harmful, _ = sequences_of(tokenizer, data, calibrated.answers)
    examples = [{"input_ids": ids} for ids in harmful]
    linears = linear_modules(model, target_modules(tiny_world.aligned, None), tiny_world.aligned)
    groups = shared_input_groups(model, linears, harmful[0][:8])
    first, second = groups[:5], groups[5:]  # layer 0 and layer 1's q/k/v; then layer 1's o, gate/up, down
    blocks = decoder_blocks(model, linears)
    common = {"pad_id": tokenizer.pad_token_id, "batch_size": 4, "product_dtype": torch.float32, "progress": False}
    recording = BlockResume(blocks, start=0, record_at=0)
    accumulate_sums(model, examples, first, linears, resume=recording, **common)
    assert len(recording.recorded) == 3  # one cached output per batch
    resumed = accumulate_sums(
        model, examples, second, linears, resume=BlockResume(blocks, start=1, cached=recording.recorded), **common
    )
    recomputed = accumulate_sums(model, examples, second, linears, **common)
    for name in recomputed:
        assert resumed[name].tokens == recomputed[name].tokens
        assert torch.equal(full_sum(resumed[name]), full_sum(recomputed[name]))


class RecordingBar:
    """Stands in for tqdm: records what a bar was made with and what it was told."""

    made: list = []

    def __init__(self, *args, **kwargs) -> None:
        self.kwargs, self.updates, self.postfixes = kwargs, [], []
        RecordingBar.made.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def update(self, n: int) -> None:
        self.updates.append(n)

    def set_postfix_str(self, text: str) -> None:
        self.postfixes.append(text)


def test_every_pass_runs_under_one_bar_in_tokens(aligned_model, tiny_world, calibrated, data, monkeypatch):
    import tqdm.auto

    model, tokenizer = aligned_model
    _, harmful, task = sequences_of(tokenizer, data, calibrated.answers)
    harmful, task = [{"input_ids": ids} for ids in harmful], [{"input_ids": ids} for ids in task]
    linears = linear_modules(model, target_modules(tiny_world.aligned, None), tiny_world.aligned)
    plan = plan_statistics(model, linears, task, 1, log=lambda _m: None)  # every group alone: 8 passes
    RecordingBar.made = []
    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)
    collect_statistics(model, linears, plan, harmful, task, pad_id=tokenizer.pad_token_id, batch_size=4,
                       product_dtype=torch.float32, progress=True, log=lambda _m: None)  # fmt: skip
    [bar] = RecordingBar.made  # one bar, not one per pass and set
    tokens = sum(len(e["input_ids"]) for e in harmful + task)
    assert bar.kwargs["unit"] == "tok" and bar.kwargs["total"] == 8 * tokens  # tqdm shows tok/s
    assert sum(bar.updates) == 8 * tokens
    assert bar.postfixes == [f"pass {i}/8" for i in range(1, 9)]
