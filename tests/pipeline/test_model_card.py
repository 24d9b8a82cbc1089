"""The corrected adapter's model card (issue 13: corrected adapters carried the input's stale card,
training record and base path). Through the real API on the tiny fixtures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from csulora.version import __version__
from csulora.pipeline.api import correct_adapter
from csulora.pipeline.updates import AdapterUpdate
from csulora.io.adapters import ADAPTER_CONFIG, MODEL_CARD, read_adapter
from csulora.io.fingerprint import file_sha256
from csulora.methods.registry import get_method
from csulora.pipeline.model_card import base_model_for, correction_card, input_license
from tests.fixtures_tiny import tiny_adapter, tiny_pair, tiny_subspace  # noqa: F401

STALE_BASE = "/tmp/.world.tmp-xyz/aligned"  # what a world built in a temporary folder leaves behind


@pytest.fixture
def trained_adapter(tiny_adapter, tmp_path) -> Path:
    """The tiny adapter as a training run leaves it: PEFT card, training record, a stale base path."""
    folder = tmp_path / "attacked"
    shutil.copytree(tiny_adapter, folder)
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    config["base_model_name_or_path"] = STALE_BASE
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config))
    (folder / MODEL_CARD).write_text(f"---\nbase_model: {STALE_BASE}\nlicense: mit\n---\nFine-tuned on attack.jsonl\n")
    (folder / "train_config.json").write_text('{"method": "lora", "data": "attack.jsonl"}\n')
    return folder


def test_card_says_what_was_done(trained_adapter, tiny_subspace, tmp_path):
    out = tmp_path / "fixed"
    correct_adapter(trained_adapter, out, "resta", subspace=tiny_subspace, restore=1.0, progress=False)
    card = (out / MODEL_CARD).read_text()
    assert "attack.jsonl" not in card  # not the input's card
    assert not (out / "train_config.json").exists()
    for expected in (
        "`resta`: RESTA (rank-k)",
        "`restore=1`",
        "4 of 4 (all adapted modules)",
        f"sha256 `{file_sha256(tiny_subspace)}`",
        f"| csulora | {__version__} |",
        "`csulora_report.json` beside this file",
        "`README.md`, `train_config.json`: they describe how the input was made",
        f"input adapter | `{trained_adapter}`",
    ):
        assert expected in card, expected
    assert 'license: "mit"' in card  # the input's licence still applies to a derivative
    assert (out / "csulora_report.json").exists()


def test_base_model_path_is_kept_without_aligned_and_is_aligned_with_it(trained_adapter, tiny_pair, tmp_path):
    kept = tmp_path / "kept"
    correct_adapter(trained_adapter, kept, "scale", factor=0.5, progress=False)
    assert json.loads((kept / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == STALE_BASE
    assert f"`{STALE_BASE}` (no such folder here: pass `--aligned ALIGNED`" in (kept / MODEL_CARD).read_text()
    given = tmp_path / "given"
    correct_adapter(trained_adapter, given, "resta", base=tiny_pair[0], aligned=tiny_pair[1], restore=1.0, progress=False)
    config = json.loads((given / ADAPTER_CONFIG).read_text())
    assert config["base_model_name_or_path"] == str(tiny_pair[1].resolve())
    card = (given / MODEL_CARD).read_text()
    assert f"D = ALIGNED - BASE (exact, streamed) | base `{tiny_pair[0]}`" in card
    assert "base_model:" not in card  # a local path is no hub repo id: left out of the front matter
    assert "no such folder here" not in card


def test_card_bytes_are_deterministic(trained_adapter, tiny_subspace, tmp_path):
    cards = []
    for name in ("a", "b"):
        correct_adapter(trained_adapter, tmp_path / name, "csulora", subspace=tiny_subspace, gamma=1.0, progress=False)
        cards.append((tmp_path / name / MODEL_CARD).read_bytes())
    assert cards[0] == cards[1]


def test_base_model_for_keeps_hub_ids_and_resolves_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "aligned").mkdir()
    assert base_model_for(None) is None
    assert base_model_for("meta-llama/Llama-3.1-8B-Instruct") == "meta-llama/Llama-3.1-8B-Instruct"
    assert base_model_for("aligned") == str((tmp_path / "aligned").resolve())


def test_calibration_info_is_in_the_card(tiny_adapter):
    """Given a calibration file (the `calibrated` method), the card shows its own info, fingerprints cut to digests."""
    info = {"model_fingerprint": {"digest": "d" * 64, "weights": {"model.safetensors": "e" * 64}}, "prompts": 256}
    info["harmful"] = {"specs": ["advbench:align", "requests"], "prompts": 400}
    info["task"] = {"spec": "train.jsonl", "examples": 200}
    info["generation"] = {"max_new_tokens": 64}
    refs = SimpleNamespace(cache=None, base=None, aligned=None,
                           calibration=SimpleNamespace(path=Path("calib.safetensors"), info=info))
    card = correction_card(
        method=get_method("scale"), options={"factor": 0.5}, update=AdapterUpdate(read_adapter(tiny_adapter)),
        input_spec="in/", corrected=["m"], base_model=None, refs=refs, report_file=None, summary={},
    )
    row = next(line for line in card.splitlines() if line.startswith("| calibration |"))
    assert row == (
        "| calibration | `calib.safetensors`: aligned model fingerprint `dddddddddddddddd`; 400 harmful prompts "
        "(advbench:align, requests) with the model's own answers; 200 task examples (`train.jsonl`); answers of "
        "at most 64 greedy tokens |"
    )
    assert "{" not in row and "e" * 64 not in card  # readable, not a JSON blob


@pytest.mark.parametrize("text, expected", [
    ("---\nlicense: apache-2.0\nlibrary_name: peft\n---\nbody", "apache-2.0"),
    ("---\nlicense: 'llama3.1'\n---\n", "llama3.1"),
    ("no front matter\nlicense: mit\n", None),
    ("---\nlibrary_name: peft\n---\nlicense: mit", None),
    (None, None),
])
def test_input_license(text, expected):
    assert input_license(text) == expected
