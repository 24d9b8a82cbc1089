"""ADAPTER or checkpoint: recognised by the files each format always has (docs/design.md §5d)."""

from __future__ import annotations

import pytest

from csulora.errors import InputError
from csulora.io.input_kind import ADAPTER, CHECKPOINT, input_kind, is_checkpoint


def folder(tmp_path, *files):
    path = tmp_path / "in"
    path.mkdir()
    for name in files:
        (path / name).write_text("{}")
    return path


@pytest.mark.parametrize(
    ("files", "kind"),
    [
        (("adapter_config.json", "adapter_model.safetensors"), ADAPTER),
        (("adapter_config.json", "config.json", "model.safetensors"), ADAPTER),  # adapter_config.json wins
        (("config.json", "model.safetensors"), CHECKPOINT),
        (("config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json"), CHECKPOINT),
        (("config.json", "model.safetensors.index.json"), CHECKPOINT),  # its missing shards: the reader's error
    ],
)
def test_kinds(tmp_path, files, kind):
    assert input_kind(folder(tmp_path, *files)) == kind
    assert is_checkpoint(tmp_path / "in") == (kind == CHECKPOINT)


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (("config.json", "pytorch_model.bin"), r"only pickled weights found \(pytorch_model.bin\); csulora reads safetensors only"),
        (("config.json",), r"has config.json but no model\*.safetensors"),
        (("model.safetensors",), r"no adapter_config.json \(not a PEFT adapter\) and no config.json"),
        ((), r"no adapter_config.json"),
    ],
)
def test_anything_else_is_one_line(tmp_path, files, message):
    path = folder(tmp_path, *files)
    with pytest.raises(InputError, match=message) as info:
        input_kind(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert not is_checkpoint(path)


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(InputError, match="no such adapter or checkpoint folder"):
        input_kind(tmp_path / "nope")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(InputError, match="pickled weights refused"):
        input_kind(tmp_path / "weights.bin")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="got a file"):
        input_kind(tmp_path / "notes.txt")
