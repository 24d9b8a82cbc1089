"""An update's identity (:func:`csulora.io.fingerprint.update_fingerprint`): what statistics measured
on a fine-tuned model are checked against (issue 22 §1)."""

from __future__ import annotations

import json
import shutil

import pytest

from csulora.errors import InputError
from csulora.io.fingerprint import adapter_digest, model_fingerprint, update_fingerprint
from tests.fixtures_tiny import tiny_adapter, tiny_pair  # noqa: F401


def test_an_adapter_is_its_weights_and_config_wherever_it_lies(tiny_adapter, tmp_path):
    record = update_fingerprint(tiny_adapter)
    assert record["kind"] == "adapter" and record["digest"] == adapter_digest(tiny_adapter)
    assert set(record["files"]) == {"adapter_config.json", "adapter_model.safetensors"}
    copy = shutil.copytree(tiny_adapter, tmp_path / "copy")
    (copy / "README.md").write_text("a card does not change the update\n")
    assert update_fingerprint(copy) == record
    config = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 2 * config["lora_alpha"]}))
    assert update_fingerprint(copy)["digest"] != record["digest"]  # another scale: another update


def test_a_checkpoint_is_its_model_fingerprint(tiny_pair, tmp_path):
    record = update_fingerprint(tiny_pair[1])
    assert record == {"kind": "checkpoint", **model_fingerprint(tiny_pair[1])}
    with pytest.raises(InputError, match="no such adapter or checkpoint folder"):
        update_fingerprint(tmp_path / "missing")
