"""The shard writer: layouts read from headers, tensors written or copied byte for byte."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from csulora.errors import InputError
from csulora.io.checkpoint_writer import (
    PlannedTensor,
    ShardWriter,
    copy_side_files,
    files_not_copied,
    read_checkpoint_layout,
    read_shard_layout,
    write_index,
)


def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "b.weight": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "a.weight": torch.randn(4, 2, generator=g),
        "ids": torch.arange(6, dtype=torch.int64),
        "scalar": torch.tensor(2.5, dtype=torch.float16),
    }


def test_layout_then_copy_every_tensor_gives_the_same_tensors_and_metadata(tmp_path):
    source = tmp_path / "src.safetensors"
    save_file(tensors(), str(source), {"format": "pt", "note": "kept"})
    layout = read_shard_layout(source)
    assert [e.start for e in layout.entries] == sorted(e.start for e in layout.entries)
    out = tmp_path / "out.safetensors"
    writer = ShardWriter(out, [PlannedTensor(e.name, e.dtype, e.shape, e.nbytes) for e in layout.entries], layout.metadata)
    for entry in layout.entries:
        writer.copy_tensor(entry.name, layout, entry)
    writer.close()
    got, want = load_file(str(out)), load_file(str(source))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)
    with safe_open(str(out), "pt") as handle:
        assert handle.metadata() == {"format": "pt", "note": "kept"}
    assert [e.name for e in read_shard_layout(out).entries] == [e.name for e in layout.entries]


def test_written_tensors_must_match_the_plan(tmp_path):
    plan = [PlannedTensor("x", "BF16", (2, 3), 12), PlannedTensor("y", "F32", (2,), 8)]
    writer = ShardWriter(tmp_path / "o.safetensors", plan, {"format": "pt"})
    with pytest.raises(ValueError, match="expected tensor x next, got y"):
        writer.write_tensor("y", torch.zeros(2))
    with pytest.raises(ValueError, match="planned BF16"):
        writer.write_tensor("x", torch.zeros(2, 3))
    writer.write_tensor("x", torch.ones(2, 3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="planned tensors never written"):
        writer.close()


def test_checkpoint_layout_checks_the_index_against_the_shards(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "model-00001-of-00002.safetensors"), {"format": "pt"})
    save_file({"b": torch.zeros(3)}, str(tmp_path / "model-00002-of-00002.safetensors"), {"format": "pt"})
    index = {"metadata": {"total_size": 20}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    layout = read_checkpoint_layout(tmp_path)
    assert layout.tensor_names() == ["a", "b"] and layout.locate("b")[0].path.name.startswith("model-00002")
    out = tmp_path / "out"
    out.mkdir()
    write_index(out, layout, 1234)
    written = json.loads((out / "model.safetensors.index.json").read_text())
    assert written["weight_map"] == index["weight_map"] and written["metadata"]["total_size"] == 1234
    index["weight_map"]["c"] = "model-00001-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match="tensor c is listed in the index but missing from the shard"):
        read_checkpoint_layout(tmp_path)


def test_side_files_are_copied_and_weights_records_and_cards_are_not(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir(), out.mkdir()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model", "merges.txt",
                 "chat_template.jinja", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "model.gguf", "csulora_report.json", "README.md", "train_config.json"):
        (src / name).write_text(name)
    (src / "subdir").mkdir()
    assert copy_side_files(src, out) == [
        "chat_template.jinja", "config.json", "generation_config.json", "merges.txt", "tokenizer.json", "tokenizer.model"
    ]
    assert (out / "tokenizer.model").read_text() == "tokenizer.model"
    assert files_not_copied(src) == ["README.md", "train_config.json"]
