"""``csulora.references.calibration``: the statistics of the calibrated correction (docs/design.md §5c).

On the tiny world's aligned model with a dozen harmful prompts (AdvBench ``align``) and a
dozen ``date:train`` items, 16 new tokens. The Grams are checked against a direct
computation from activations captured with the test's own hooks, one sequence at a time.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import csulora.references.calibration as calibration_module
from csulora.version import __version__
from csulora.references.calibration import (
    BlockResume,
    GramGroup,
    accumulate_sums,
    add_upper_gram_,
    calibrate,
    decoder_blocks,
    group_name,
    harmful_prompts,
    linear_modules,
    mirror_upper_,
    plan_passes,
    replay_is_exact,
    shared_input_groups,
    target_modules,
    task_pairs,
)
from csulora.errors import InputError, OptionError
from csulora.eval.generation import generate_responses
from csulora.eval.splits import advbench_split, airt_split, benign_split
from csulora.eval.tasks import date_task
from csulora.io.calibration_file import load_calibration
from csulora.io.fingerprint import model_fingerprint
from csulora.io.modeling import load_model
from csulora.training.data import chat_prompt_ids, response_ids
from tests.fixtures_tiny import leftovers

MAX_NEW = 16
N_PROMPTS = 12
L0, L1 = "model.layers.0", "model.layers.1"


def write_lines(path: Path, texts) -> Path:
    path.write_text("\n".join(texts) + "\n")
    return path


def write_pairs(path: Path, pairs) -> Path:
    path.write_text("".join(json.dumps({"prompt": p["prompt"], "response": p["response"]}) + "\n" for p in pairs))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("calibration_data")
    harmful = write_lines(root / "harmful.txt", (p.text for p in advbench_split("align")[:N_PROMPTS]))
    task = write_pairs(root / "task.jsonl", date_task("train")[:N_PROMPTS])
    return SimpleNamespace(root=root, harmful=harmful, task=task)


def run(world, out: Path, data, **options):
    options = {"task": data.task, "harmful": [str(data.harmful)], "max_new_tokens": MAX_NEW, "batch_size": 4,
               "device": "cpu", "progress": False, **options}  # fmt: skip
    return calibrate(world.aligned, out, **options)


@pytest.fixture(scope="module")
def calibrated(tiny_world, data):
    out = data.root / "out" / "calibration.safetensors"
    return run(tiny_world, out, data)


@pytest.fixture(scope="module")
def aligned_model(tiny_world):
    return load_model(tiny_world.aligned, device="cpu")


@pytest.fixture
def outs(tmp_path) -> Path:
    folder = tmp_path / "outs"
    folder.mkdir()
    return folder


def assert_nothing_written(folder: Path) -> None:
    assert sorted(p.name for p in folder.iterdir()) == []
    assert leftovers(folder) == []


# -- the Grams ------------------------------------------------------------------------------------
def captured_inputs(model, sequences, names) -> dict[str, torch.Tensor]:
    """Each module's inputs on every token, one unpadded sequence at a time (float64)."""
    modules = dict(model.named_modules())
    rows = {name: [] for name in names}
    handles = [
        modules[name].register_forward_pre_hook(lambda _m, inputs, name=name: rows[name].append(inputs[0][0].clone()))
        for name in names
    ]
    try:
        with torch.no_grad():
            for ids in sequences:
                model(input_ids=torch.tensor([ids]))
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(rows[name]).double() for name in names}


def normalised_gram(X: torch.Tensor) -> torch.Tensor:
    S = X.T @ X / X.shape[0]
    return S / (torch.trace(S) / S.shape[0])


def sequences_of(tokenizer, data, answers):
    prompts = [p.text for p in harmful_prompts([str(data.harmful)])]
    harmful = [chat_prompt_ids(tokenizer, p) + response_ids(tokenizer, a) for p, a in zip(prompts, answers)]
    task = [chat_prompt_ids(tokenizer, p["prompt"]) + response_ids(tokenizer, p["response"]) for p in task_pairs(data.task)]
    return prompts, harmful, task


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


def test_modules_reading_one_tensor_share_a_group(calibrated):
    file = load_calibration(calibrated.path)
    for layer in (L0, L1):
        attn = {file.group_of(f"{layer}.self_attn.{m}") for m in ("q_proj", "k_proj", "v_proj")}
        mlp = {file.group_of(f"{layer}.mlp.{m}") for m in ("gate_proj", "up_proj")}
        assert attn == {f"{layer}.self_attn.q_proj+k_proj+v_proj"}
        assert mlp == {f"{layer}.mlp.gate_proj+up_proj"}
        assert file.group_of(f"{layer}.self_attn.o_proj") == f"{layer}.self_attn.o_proj"
        assert file.group_of(f"{layer}.mlp.down_proj") == f"{layer}.mlp.down_proj"
    assert len(file.modules) == 14 and len(file.groups) == 8
    assert {g.n for g in calibrated.groups} == {64, 192}
    assert calibrated.modules == file.modules


class Toy(nn.Module):
    """a and b read one tensor; c reads an equal copy of it; d runs twice; idle never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.a, self.b, self.c = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(4, 4)
        self.d, self.idle = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        x = self.embed(input_ids)
        z = self.a(x) + self.b(x)
        return self.d(self.d(self.c(x.clone()))) + z.sum()


def test_shared_inputs_come_from_the_forward_not_the_names():
    model = Toy()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "idle"}
    groups = shared_input_groups(model, linears, [1, 2, 3])
    assert [(g.name, g.modules, g.calls) for g in groups] == [
        ("a+b", ("a", "b"), 1),
        ("c", ("c",), 1),  # equal values, another tensor: its own Gram
        ("d", ("d",), 2),  # runs twice: its own Gram over both calls
    ]
    with pytest.raises(InputError, match="module idle never runs in the model's forward pass"):
        shared_input_groups(model, {**linears, "idle": model.idle}, [1, 2, 3])


def test_a_module_that_runs_twice_sums_both_calls():
    model = Toy()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "idle"}
    groups = shared_input_groups(model, linears, [1, 2, 3])
    sums, rows = accumulate_sums(model, [{"input_ids": [1, 2, 3]}], groups, linears, pad_id=0, batch_size=1,
                                 product_dtype=torch.float32, progress=False)  # fmt: skip
    assert rows == {"a+b": 3, "c": 3, "d": 6}
    with torch.no_grad():
        first = model.c(model.embed(torch.tensor([1, 2, 3])))
        second = model.d(first)
    X = torch.cat([first, second]).double()
    assert torch.allclose(sums["d"], X.T @ X, rtol=1e-5)


def test_group_names():
    assert group_name(["m.l.0.attn.q", "m.l.0.attn.k"]) == "m.l.0.attn.q+k"
    assert group_name(["m.l.0.mlp.down"]) == "m.l.0.mlp.down"
    assert group_name(["x.a", "y.b"]) == "x.a+y.b"
    assert group_name(["a", "b"]) == "a+b"


def test_padding_is_excluded(aligned_model, tiny_world, calibrated, data):
    model, tokenizer = aligned_model
    _, harmful, task = sequences_of(tokenizer, data, calibrated.answers)
    examples = [{"input_ids": ids} for ids in harmful + task]
    assert len({len(e["input_ids"]) for e in examples}) > 4  # batches of 4 are padded
    linears = linear_modules(model, target_modules(tiny_world.aligned, None), tiny_world.aligned)
    groups = shared_input_groups(model, linears, task[0][:8])
    common = {"pad_id": tokenizer.pad_token_id, "product_dtype": torch.float32, "progress": False}
    one, rows_one = accumulate_sums(model, examples, groups, linears, batch_size=1, **common)
    four, rows_four = accumulate_sums(model, examples, groups, linears, batch_size=4, **common)
    assert rows_one == rows_four == {g.name: sum(len(e["input_ids"]) for e in examples) for g in groups}
    for name in one:
        assert one[name].dtype == torch.float64
        assert torch.allclose(one[name], four[name], rtol=1e-5, atol=1e-6 * float(one[name].abs().max())), name


def test_passes_split_the_groups_by_the_memory_budget():
    groups = [GramGroup(f"g{i}", (f"g{i}",), n) for i, n in enumerate((4, 4, 8, 4))]
    sizes = [g.sum_bytes for g in groups]
    assert sizes == [256, 256, 1024, 256]
    assert plan_passes(groups, 10**6) == [groups]
    assert plan_passes(groups, 600) == [groups[:2], groups[2:3], groups[3:]]
    assert plan_passes(groups, 100) == [[g] for g in groups]  # a group over budget runs alone


@pytest.mark.parametrize("replay", [True, False])
def test_several_passes_give_the_same_statistics(tiny_world, calibrated, data, outs, capsys, monkeypatch, replay):
    if not replay:  # as for a model whose blocks cannot be skipped: each pass recomputes them
        monkeypatch.setattr(calibration_module, "replay_is_exact", lambda *args: False)
    result = run(tiny_world, outs / "passes.safetensors", data, memory_budget_gb=1e-6, progress=True)
    assert result.passes == 8 and result.info["passes_resume_from_cached_hidden_states"] is replay
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
        assert torch.allclose(a.harmful.matrix, b.harmful.matrix, rtol=1e-6, atol=1e-7)
        assert torch.allclose(a.task.matrix, b.task.matrix, rtol=1e-6, atol=1e-7)


def test_targets_restrict_the_modules(tiny_world, data, outs):
    result = run(tiny_world, outs / "some.safetensors", data, targets="q_proj,down_proj")
    file = load_calibration(result.path)
    assert sorted(file.modules) == [f"{L0}.mlp.down_proj", f"{L0}.self_attn.q_proj",
                                    f"{L1}.mlp.down_proj", f"{L1}.self_attn.q_proj"]  # fmt: skip
    assert file.group_of(f"{L0}.self_attn.q_proj") == f"{L0}.self_attn.q_proj"  # k/v not targeted: no sharing
    assert file.info["targets"] == ["q_proj", "down_proj"]
    with pytest.raises(OptionError, match="--targets lm_head matches no linear layer"):
        run(tiny_world, outs / "none.safetensors", data, targets="lm_head")


# -- metadata -------------------------------------------------------------------------------------
def test_metadata_says_what_the_statistics_were_computed_from(calibrated, tiny_world, data):
    file = load_calibration(calibrated.path)
    info = file.info
    assert info == calibrated.info
    fingerprint = model_fingerprint(tiny_world.aligned)
    assert info["model_fingerprint"] == fingerprint
    file.check_model(fingerprint["digest"], tiny_world.aligned)  # what correct will check
    assert info["aligned"] == str(Path(tiny_world.aligned).resolve())
    assert info["targets"] is None and info["modules"] == 14 and info["groups"] == 8
    assert info["generation"] == {"max_new_tokens": MAX_NEW, "greedy": True, "chat_template": True, "batch_size": 4}
    assert (info["device"], info["dtype"], info["products"], info["accumulation"]) == (
        "cpu", "float32", "float32", "float64",
    )  # fmt: skip
    texts = data.harmful.read_text().splitlines()
    digest = hashlib.sha256("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in texts).encode()).hexdigest()
    assert info["harmful"]["sha256"] == digest
    assert info["harmful"]["prompts"] == N_PROMPTS and info["harmful"]["specs"] == [str(data.harmful)]
    assert info["harmful"]["tokens"] == calibrated.harmful_tokens > N_PROMPTS * 10
    pairs = [json.loads(line) for line in data.task.read_text().splitlines()]
    task_digest = hashlib.sha256(
        "".join(json.dumps(p, ensure_ascii=False, sort_keys=True) + "\n" for p in pairs).encode()
    ).hexdigest()
    assert info["task"] == {"spec": str(data.task), "examples": N_PROMPTS, "sha256": task_digest,
                            "tokens": calibrated.task_tokens}  # fmt: skip
    assert info["passes"] == 1 and info["memory_budget_bytes"] > 0
    assert info["passes_resume_from_cached_hidden_states"] is False  # one pass: nothing to resume
    assert set(info["seconds"]) >= {"generation", "statistics"} and all(v >= 0 for v in info["seconds"].values())
    assert info["csulora_version"] == __version__


# -- refusals: one line, nothing written, before any model is loaded -----------------------------
@pytest.mark.parametrize(
    ("source", "where"),
    [
        (lambda: advbench_split("validation")[3], "advbench:validation"),
        (lambda: advbench_split("test")[0], "advbench:test"),
        (lambda: airt_split("airt-val")[0], "airt:val"),
        (lambda: airt_split("airt-test")[1], "airt:test"),
        (lambda: benign_split("validation")[-1], "benign(:validation)?"),
    ],
)
def test_harmful_prompts_that_are_scored_elsewhere_are_refused(tiny_world, data, outs, source, where):
    prompt = source()
    mixed = write_lines(outs.parent / "mixed.txt", [*data.harmful.read_text().splitlines()[:3], prompt.text.upper()])
    with pytest.raises(InputError, match=rf"mixed-4 .* is also in {where} as {prompt.id}") as info:
        run(tiny_world, outs / "calibration.safetensors", data, harmful=[str(mixed)])
    assert "\n" not in str(info.value)
    assert_nothing_written(outs)


def test_the_default_harmful_set_is_disjoint_from_every_scored_set():
    prompts = harmful_prompts(None)
    assert len(prompts) == 400 and {p.source for p in prompts} == {"advbench", "requests"}


@pytest.mark.parametrize("harmful", [None, ["requests"]])
def test_missing_pyrit_is_one_line(monkeypatch, tiny_world, data, outs, harmful):
    real = importlib.metadata.distribution

    def without_pyrit(name):
        if name == "pyrit":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", without_pyrit)
    expected = "default harmful prompts .* need pyrit" if harmful is None else "checking --harmful .* needs pyrit"
    with pytest.raises(InputError, match=rf"{expected}: run `pip install --no-deps pyrit==1\.1\.0`"):
        run(tiny_world, outs / "calibration.safetensors", data, harmful=harmful)
    assert_nothing_written(outs)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("date:validation", "--task date:validation: the split tune selects on; calibrate on the adapter's training"),
        ("date:test", "--task date:test: a test split"),
        ("date", "--task date: a test split"),
        ("date:later", "--task date:later: not a split"),
        ("advbench:validation", "--task advbench:validation: not task data"),
        ("requests", "--task requests: not task data"),
    ],
)
def test_task_specs_that_are_not_training_data_are_refused(tiny_world, data, outs, spec, message):
    with pytest.raises(InputError, match=re.escape(message)):
        run(tiny_world, outs / "calibration.safetensors", data, task=spec)
    assert_nothing_written(outs)


def test_a_task_file_holding_held_out_prompts_is_refused(tmp_path):
    leaked = write_pairs(tmp_path / "leak.jsonl", [*date_task("train")[:2], date_task("test")[5]])
    with pytest.raises(InputError, match=r"leak.jsonl: record 3 is a prompt of date:test"):
        task_pairs(leaked)
    assert len(task_pairs("date:train")) == 200


def test_a_task_line_without_prompt_or_response_names_file_and_line(tiny_world, data, outs):
    bad = outs.parent / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "no answer"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2: missing or non-string field 'response'"):
        run(tiny_world, outs / "calibration.safetensors", data, task=bad)
    bad.write_text('{"response": "no question"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:1: missing or non-string field 'prompt'"):
        run(tiny_world, outs / "calibration.safetensors", data, task=bad)
    assert_nothing_written(outs)


def test_an_existing_output_is_refused_before_any_model_is_loaded(tmp_path, data, calibrated):
    existing = tmp_path / "calibration.safetensors"
    existing.write_bytes(b"old")
    # The model folder does not even exist: the output check comes first.
    with pytest.raises(InputError, match="calibration.safetensors: file exists \\(use --force to replace it\\)"):
        calibrate(tmp_path / "no-model", existing, task=data.task, harmful=[str(data.harmful)], progress=False)
    assert existing.read_bytes() == b"old"


def test_force_replaces_an_existing_output(tiny_world, data, outs, calibrated):
    out = outs / "calibration.safetensors"
    out.write_bytes(b"old")
    result = run(tiny_world, out, data, force=True, targets="o_proj")
    assert load_calibration(result.path).modules.keys() == {f"{L0}.self_attn.o_proj", f"{L1}.self_attn.o_proj"}
    assert leftovers(outs) == []


def test_bad_options_are_refused(tiny_world, data, outs):
    for options, message in (
        ({"max_new_tokens": 0}, "--max-new-tokens must be >= 1"),
        ({"batch_size": 0}, "--batch-size must be >= 1"),
        ({"memory_budget_gb": 0.0}, "--memory-budget must be > 0"),
        ({"harmful": []}, "--harmful needs at least one SPEC"),
    ):
        with pytest.raises(OptionError, match=re.escape(message)):
            run(tiny_world, outs / "calibration.safetensors", data, **options)
    assert_nothing_written(outs)


def test_a_failure_after_the_passes_writes_nothing(tiny_world, data, outs, monkeypatch):
    def no_signal(group, *args, **kwargs):
        raise ValueError(f"{group}: harmful Gram: trace is 0.0; the inputs carry no signal")

    monkeypatch.setattr(calibration_module, "calibration_moments", no_signal)
    with pytest.raises(InputError, match=r"calibration of model\.layers\.0\.self_attn\.q_proj\+k_proj\+v_proj: .*no signal"):
        run(tiny_world, outs / "calibration.safetensors", data)
    assert_nothing_written(outs)


@pytest.mark.parametrize(("n", "strip"), [(5, 256), (300, 256), (300, 64), (7, 2)])
def test_upper_strips_then_mirror_give_the_full_gram(n, strip):
    generator = torch.Generator().manual_seed(n)
    batches = [torch.randn(rows, n, generator=generator) for rows in (9, 1, 30)]
    total = torch.zeros(n, n, dtype=torch.float64)
    for x in batches:
        add_upper_gram_(total, x, strip)
    X = torch.cat(batches).double()
    expected = X.T @ X
    assert not torch.allclose(total, expected) or n <= strip  # the lower strips are left out...
    full = mirror_upper_(total)
    assert torch.equal(full, full.T)  # ... and mirrored exactly
    assert torch.allclose(full, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("n", "strip"), [(300, 64), (7, 2), (5, 256), (513, 256)])
def test_mirror_by_strips_equals_the_whole_matrix_mirror(n, strip):
    """issue 15: the strip-wise mirror must give exactly what triu + triu(1)^T gives."""
    total = torch.randn(n, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    expected = total.triu() + total.triu(1).T
    assert torch.equal(mirror_upper_(total, strip), expected)


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
    resumed, rows = accumulate_sums(
        model, examples, second, linears, resume=BlockResume(blocks, start=1, cached=recording.recorded), **common
    )
    recomputed, rows_again = accumulate_sums(model, examples, second, linears, **common)
    assert rows == rows_again
    for name in recomputed:
        assert torch.allclose(resumed[name], recomputed[name], rtol=1e-6, atol=1e-6 * float(recomputed[name].abs().max()))
