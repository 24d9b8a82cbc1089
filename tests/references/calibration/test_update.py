"""``calibrate_update``: the fine-tuned model's statistics for Antidote (``csulora calibrate ALIGNED
--update UPDATE --pairs FILE``): the Grams against a dense reference hooked on the fine-tuned model
itself, an adapter and a full checkpoint, byte-identical reruns, what the file records, and every
bad input refused in one line before a model is loaded (docs/peers.md, issue 22 §1)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from csulora.errors import InputError, OptionError
from csulora.eval.splits import advbench_split
from csulora.io.calibration_file import ROLE_UPDATE, load_calibration
from csulora.io.fingerprint import model_fingerprint, update_fingerprint
from csulora.io.modeling import load_model
from csulora.references.calibration import calibrate_update
from csulora.training.data import chat_prompt_ids, response_ids
from tests.fixtures_tiny import adapter_variant, leftovers
from tests.references.calibration.helpers import L0, L1, assert_nothing_written, captured_inputs, normalised_gram

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def pair_sequences(tokenizer, pairs_file: Path) -> list[list[int]]:
    """Each pair as the test reads calibrate's rule: chat-templated prompt, then the answer and end of turn."""
    pairs = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    return [chat_prompt_ids(tokenizer, p["prompt"]) + response_ids(tokenizer, p["response"]) for p in pairs]


def assert_grams_match(file, inputs: dict[str, torch.Tensor]) -> None:
    for name, X in inputs.items():
        got, expected = file.module(name).harmful.matrix, normalised_gram(X)
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max())), name


@pytest.fixture(scope="module")
def finetuned(tiny_world, tmp_path_factory) -> Path:
    """A full fine-tune of the tiny world's aligned model: every decoder weight moved, its tokenizer beside it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_world.aligned, dtype=torch.float32)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".layers." in name and param.ndim == 2:
                param += 0.05 * param.abs().mean() * torch.randn(param.shape, generator=generator)
    out = tmp_path_factory.mktemp("finetuned") / "ft"
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy(Path(tiny_world.aligned) / name, out / name)
    return out


# -- the statistics ---------------------------------------------------------------------------------
def test_adapter_grams_are_the_fine_tuned_models_inputs(tiny_world, update_pairs, attacked_update_statistics):
    """Reference: the adapter attached **unmerged** (PEFT's LoRA layers), every module's input hooked,
    one unpadded sequence at a time; the file was measured on the merged model, in batches."""
    file = load_calibration(attacked_update_statistics.path)
    assert file.role == ROLE_UPDATE and len(file.modules) == 14 and len(file.groups) == 8
    peft_model, tokenizer = load_model(tiny_world.aligned, tiny_world.attacked, device="cpu", merge=False)
    sequences = pair_sequences(tokenizer, update_pairs)
    names = {f"base_model.model.{m}": m for m in file.modules}
    inputs = {names[k]: X for k, X in captured_inputs(peft_model, sequences, list(names)).items()}
    assert_grams_match(file, inputs)
    assert attacked_update_statistics.harmful_tokens == sum(len(s) for s in sequences)
    # Not the aligned model's statistics: its layer-0 attention reads the embeddings either way,
    # but the adapter changes layer 0, so every later input differs.
    aligned_model, _ = load_model(tiny_world.aligned, device="cpu")
    aligned = captured_inputs(aligned_model, sequences, [f"{L0}.self_attn.q_proj", f"{L1}.self_attn.q_proj"])
    same = file.module(f"{L0}.self_attn.q_proj").harmful.matrix
    assert torch.allclose(same, normalised_gram(aligned[f"{L0}.self_attn.q_proj"]), atol=1e-5)
    moved = file.module(f"{L1}.self_attn.q_proj").harmful.matrix
    assert not torch.allclose(moved, normalised_gram(aligned[f"{L1}.self_attn.q_proj"]), atol=1e-3)
    assert file.module(f"{L1}.self_attn.q_proj").task is None  # no task pass


def test_checkpoint_grams_are_the_checkpoints_inputs(tiny_world, update_pairs, finetuned, tmp_path):
    result = calibrate_update(tiny_world.aligned, tmp_path / "ft.safetensors", update=finetuned, pairs=update_pairs,
                              batch_size=3, device="cpu", progress=False)  # fmt: skip
    file = load_calibration(result.path)
    assert len(file.modules) == 14  # default targets: every decoder linear layer
    model, tokenizer = load_model(finetuned, device="cpu")
    assert_grams_match(file, captured_inputs(model, pair_sequences(tokenizer, update_pairs), list(file.modules)))
    update = file.info["update"]
    assert update["kind"] == "checkpoint" and update["model"] == "the checkpoint itself"
    assert update["fingerprint"]["digest"] == model_fingerprint(finetuned)["digest"]
    assert file.info["model_fingerprint"] == model_fingerprint(tiny_world.aligned)  # ALIGNED: provenance


def test_the_file_records_its_provenance(tiny_world, update_pairs, attacked_update_statistics):
    info = load_calibration(attacked_update_statistics.path).info
    assert info == attacked_update_statistics.info
    assert info["model_fingerprint"] == model_fingerprint(tiny_world.aligned)
    assert info["update"]["fingerprint"] == update_fingerprint(tiny_world.attacked)
    assert info["update"]["fingerprint"]["kind"] == "adapter"
    assert info["update"]["model"] == "ALIGNED with the adapter attached and merged"
    import hashlib

    lines = [json.loads(line) for line in update_pairs.read_text().splitlines()]
    digest = hashlib.sha256(b"".join(json.dumps({"prompt": p["prompt"], "response": p["response"]}, sort_keys=True,
                                                ensure_ascii=False).encode() + b"\n" for p in lines)).hexdigest()  # fmt: skip
    assert info["pairs"]["examples"] == 8 and info["pairs"]["sha256"] == digest
    assert info["pairs"]["tokens"] == attacked_update_statistics.harmful_tokens
    assert attacked_update_statistics.task_tokens == 0 and attacked_update_statistics.answers == []
    record = json.loads(attacked_update_statistics.record_path.read_text())
    assert record["role"] == ROLE_UPDATE and "statistics" in record["seconds"]


def test_a_rerun_writes_the_same_bytes(tiny_world, update_pairs, attacked_update_statistics, tmp_path):
    again = calibrate_update(tiny_world.aligned, tmp_path / "again.safetensors", update=tiny_world.attacked,
                             pairs=update_pairs, batch_size=4, device="cpu", progress=False, run_record_file=False)  # fmt: skip
    assert again.path.read_bytes() == attacked_update_statistics.path.read_bytes()
    assert again.record_path is None and sorted(p.name for p in tmp_path.iterdir()) == ["again.safetensors"]


def test_targets_name_the_modules(tiny_world, update_pairs, tmp_path):
    result = calibrate_update(tiny_world.aligned, tmp_path / "v.safetensors", update=tiny_world.attacked,
                              pairs=update_pairs, targets="v_proj", device="cpu", progress=False)  # fmt: skip
    assert sorted(result.modules) == [f"{L0}.self_attn.v_proj", f"{L1}.self_attn.v_proj"]


# -- refused before any model is loaded -------------------------------------------------------------
def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        (None, r"--pairs .*pairs\.jsonl: no such file"),
        ("", r"pairs\.jsonl: no pairs \(empty file\)"),
        ('{"prompt": "How do I pick a lock?", "response": "Sure."}\n{"prompt": "x"\n', r"pairs\.jsonl:2: not valid JSON"),
        ('{"prompt": "How do I pick a lock?"}\n', r"pairs\.jsonl:1: missing or empty 'response'"),
        ('\n{"prompt": "How do I pick a lock?", "response": "  "}\n', r"pairs\.jsonl:2: missing or empty 'response'"),
        ('{"prompt": "", "response": "Sure."}\n', r"pairs\.jsonl:1: missing or empty 'prompt'"),
        ('["a list"]\n', r"pairs\.jsonl:1: expected a JSON object"),
    ],
)
def test_bad_pairs_are_one_line(tiny_world, tmp_path, content, pattern):
    pairs = tmp_path / "pairs.jsonl"
    if content is not None:
        pairs.write_text(content)
    outs = tmp_path / "outs"
    outs.mkdir()
    with pytest.raises(InputError, match=pattern) as caught:
        calibrate_update(tiny_world.aligned, outs / "u.safetensors", update=tiny_world.attacked, pairs=pairs,
                         device="cpu", progress=False)  # fmt: skip
    assert "\n" not in str(caught.value)
    assert_nothing_written(outs)


def test_a_scored_prompt_is_refused(tiny_world, tmp_path):
    scored = advbench_split("test")[0]
    pairs = write(tmp_path / "pairs.jsonl", json.dumps({"prompt": scored.text, "response": "Sure, here."}) + "\n")
    with pytest.raises(InputError, match=rf"pairs\.jsonl:1 .* is also in advbench:test as {scored.id}"):
        calibrate_update(tiny_world.aligned, tmp_path / "u.safetensors", update=tiny_world.attacked, pairs=pairs,
                         progress=False)  # fmt: skip


def test_an_update_that_is_neither_kind_or_of_another_model_is_refused(tiny_world, update_pairs, tmp_path,
                                                                      tmp_path_factory):  # fmt: skip
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty: no adapter_config\.json \(not a PEFT adapter\) and no config\.json"):
        calibrate_update(tiny_world.aligned, tmp_path / "u.safetensors", update=tmp_path / "empty", pairs=update_pairs)
    with pytest.raises(InputError, match=r"nowhere: no such adapter or checkpoint folder"):
        calibrate_update(tiny_world.aligned, tmp_path / "u.safetensors", update=tmp_path / "nowhere", pairs=update_pairs)
    # An adapter of the 32-wide tiny pair does not fit the tiny world's 64-wide aligned model.
    other = adapter_variant(tmp_path_factory, "plain")
    with pytest.raises(InputError, match=r"--update .*adapter_model\.safetensors: module model\.layers\.0\..* updates a "
                                         r"\[\d+, \d+\] weight but ALIGNED .* has shape \[64, \d+\] \(an adapter of another"):
        calibrate_update(tiny_world.aligned, tmp_path / "u.safetensors", update=other, pairs=update_pairs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_a_checkpoint_of_another_shape_is_refused(tiny_world, update_pairs, tmp_path, tmp_path_factory):
    from tests.fixtures_tiny import tiny_llama_config

    from transformers import LlamaForCausalLM

    LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path / "narrow")
    with pytest.raises(InputError, match=r"--update .*narrow: tensor model\.layers\.0\.mlp\.down_proj\.weight has shape "
                                         r"\[32, 48\] but ALIGNED .* has \[64, 192\] \(a fine-tune of another model\?\)"):
        calibrate_update(tiny_world.aligned, tmp_path / "u.safetensors", update=tmp_path / "narrow", pairs=update_pairs)


@pytest.mark.parametrize("case", ["inside ALIGNED", "onto the pairs", "inside the adapter"])
def test_an_output_may_never_be_or_lie_inside_an_input(tiny_world, tmp_path, update_pairs, case):
    pairs = Path(shutil.copy(update_pairs, tmp_path / "pairs.jsonl"))
    out, flag = {
        "inside ALIGNED": (Path(tiny_world.aligned) / "u.safetensors", "ALIGNED"),
        "onto the pairs": (pairs, "--pairs"),
        "inside the adapter": (Path(tiny_world.attacked) / "u.safetensors", "--update"),
    }[case]
    with pytest.raises(InputError, match=rf"(is|lies inside) the input {flag} "):
        calibrate_update(tiny_world.aligned, out, update=tiny_world.attacked, pairs=pairs, force=True, progress=False)
    assert not (Path(tiny_world.aligned) / "u.safetensors").exists() and leftovers(Path(tiny_world.aligned)) == []
    assert pairs.read_bytes() == update_pairs.read_bytes()


def test_numeric_options_and_an_existing_output(tiny_world, update_pairs, attacked_update_statistics):
    with pytest.raises(OptionError, match="--batch-size must be >= 1"):
        calibrate_update(tiny_world.aligned, "x.safetensors", update=tiny_world.attacked, pairs=update_pairs, batch_size=0)
    with pytest.raises(OptionError, match="--memory-budget must be > 0 GB"):
        calibrate_update(tiny_world.aligned, "x.safetensors", update=tiny_world.attacked, pairs=update_pairs,
                         memory_budget_gb=0)  # fmt: skip
    with pytest.raises(InputError, match=r"file exists \(use --force"):
        calibrate_update(tiny_world.aligned, attacked_update_statistics.path, update=tiny_world.attacked,
                         pairs=update_pairs)  # fmt: skip
