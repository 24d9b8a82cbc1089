"""Hub ids where a folder is expected, through the real ``huggingface_hub.snapshot_download``.

No test touches the network: the suite runs with ``HF_HUB_OFFLINE=1`` (tests/conftest.py)
and a fake hub cache laid out as the library lays out its own (``models--org--name/refs``,
``snapshots/<commit>``), which ``snapshot_download`` resolves offline.
"""

from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path

import pytest

from csulora.errors import InputError
from csulora.io.hub import HUB_PATTERNS, fetch_command, looks_like_hub_id, resolve_model_dir
from tests.fixtures_tiny import tiny_adapter, tiny_pair  # noqa: F401

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def add_to_fake_hub(cache: Path, repo_id: str, folder: Path) -> Path:
    """Put ``folder`` into ``cache`` as the library's cache holds ``repo_id`` at ``main``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def use_fake_hub(monkeypatch, cache: Path, repos: dict[str, Path]) -> Path:
    """Put each folder of ``repos`` (repo id -> folder) into ``cache`` and make the library
    read that cache, offline, for the rest of the test; returns ``cache``."""
    for repo_id, folder in repos.items():
        add_to_fake_hub(cache, repo_id, folder)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture
def fake_hub(tmp_path, monkeypatch, tiny_pair, tiny_adapter):
    """A hub cache holding tiny-org/base, tiny-org/aligned and tiny-org/adapter; offline."""
    repos = {"tiny-org/base": tiny_pair[0], "tiny-org/aligned": tiny_pair[1], "tiny-org/adapter": tiny_adapter}
    return use_fake_hub(monkeypatch, tmp_path / "hub", repos)


@pytest.mark.parametrize("text, expected", [
    ("meta-llama/Llama-3.1-8B-Instruct", True),
    ("HuggingFaceTB/SmolLM2-135M", True),
    ("out/fixed", True),  # could be either: only a missing local path is tried on the hub
    ("fixed", False),
    ("./org/name", False),
    ("/abs/path", False),
    ("a/b/c", False),
    ("org/name.safetensors", False),
    ("../name", False),
])
def test_what_looks_like_a_hub_id(text, expected):
    assert looks_like_hub_id(text) is expected


def test_existing_folder_is_used_as_is_even_if_it_looks_like_an_id(tmp_path, monkeypatch, fake_hub):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-org" / "base").mkdir(parents=True)
    assert resolve_model_dir("tiny-org/base", "BASE") == Path("tiny-org/base")


def test_hub_id_resolves_to_the_cached_snapshot(fake_hub, tiny_pair):
    folder = resolve_model_dir("tiny-org/aligned", "ALIGNED")
    assert folder == fake_hub / "models--tiny-org--aligned" / "snapshots" / COMMIT
    assert (folder / "model.safetensors").read_bytes() == (tiny_pair[1] / "model.safetensors").read_bytes()


def test_unreachable_hub_id_says_how_to_fetch_it_in_one_line(fake_hub):
    with pytest.raises(InputError) as err:
        resolve_model_dir("tiny-org/not-cached", "MODEL")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("MODEL tiny-org/not-cached is not a folder and the hub is unreachable")
    assert fetch_command("tiny-org/not-cached") in message


def test_fetch_command_never_asks_for_pickles():
    command = fetch_command("org/name")
    assert command.startswith("hf download org/name ")
    for pattern in HUB_PATTERNS:
        assert f"--include '{pattern}'" in command
    pickles = ("pytorch_model.bin", "training_args.bin", "model.pt", "consolidated.00.pth", "tokenizer.bin")
    kept = ("model.safetensors", "config.json", "tokenizer.json", "tokenizer.model", "merges.txt", "chat_template.jinja")
    assert not [name for name in pickles if any(fnmatch.fnmatch(name, p) for p in HUB_PATTERNS)]
    assert all(any(fnmatch.fnmatch(name, p) for p in HUB_PATTERNS) for name in kept)


def test_cli_commands_take_hub_ids(fake_hub, tmp_path):
    """subspace BASE ALIGNED, audit ADAPTER and correct ADAPTER --aligned with hub ids."""
    import json

    from csulora.cli import main

    cache = tmp_path / "s.safetensors"
    assert main(["subspace", "tiny-org/base", "tiny-org/aligned", "-o", str(cache), "--rank", "1"]) == 0
    assert main(["audit", "tiny-org/adapter", "--subspace", str(cache), "--json", str(tmp_path / "a.json")]) == 0
    assert len(json.loads((tmp_path / "a.json").read_text())["modules"]) == 4
    out = tmp_path / "fixed"
    assert main(["correct", "tiny-org/adapter", "-o", str(out), "--base", "tiny-org/base", "--aligned",
                 "tiny-org/aligned", "--method", "resta", "--restore", "1"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-org/aligned"  # the id, not the cache path
