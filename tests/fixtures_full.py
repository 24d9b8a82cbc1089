"""Full fine-tunes of the tiny Llama pair (docs/design.md §5d), built on disk with save_pretrained.

``full_world`` adds to the tiny base/aligned pair of :mod:`tests.fixtures_tiny` three
"fully fine-tuned" checkpoints: the aligned model with a dense change on *every* tensor
(targets, embeddings, norms, LM head), saved

- ``ft``: sharded (``max_shard_size``), with a generation config and tokenizer-like side files;
- ``ft_single``: as one ``model.safetensors``;
- ``ft_bf16``: sharded, in bfloat16 (against a bfloat16 aligned model ``aligned_bf16``).

Built once per session; tests must treat the folders as read-only (copy before damaging).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.fixtures_tiny import tiny_pair  # noqa: F401 - the fixture full_world builds on

SHARD_SIZE = "20KB"  # several shards for the tiny model (each linear layer is 2-6 KB)
SIDE_FILES = {"tokenizer.json": '{"version": "1.0"}\n', "special_tokens_map.json": "{}\n", "chat_template.jinja": "{{ x }}\n"}


@dataclass(frozen=True)
class FullWorld:
    base: Path
    aligned: Path
    ft: Path
    ft_single: Path
    aligned_bf16: Path
    ft_bf16: Path


def _perturbed(model_dir: Path, seed: int, scale: float = 0.01):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param += scale * torch.randn(param.shape, generator=generator)
    return model


def _save(model, out: Path, *, shard: str | None, side_files: bool = True) -> Path:
    model.save_pretrained(out, max_shard_size=shard) if shard else model.save_pretrained(out)
    if side_files:
        for name, text in SIDE_FILES.items():
            (out / name).write_text(text)
    return out


def build_full_world(root: Path, base: Path, aligned: Path) -> FullWorld:
    from transformers import GenerationConfig, LlamaForCausalLM

    model = _perturbed(aligned, seed=11)
    model.generation_config = GenerationConfig(max_new_tokens=7, do_sample=False)
    ft = _save(model, root / "ft", shard=SHARD_SIZE)
    ft_single = _save(model, root / "ft_single", shard=None, side_files=False)
    aligned_bf16 = root / "aligned_bf16"
    LlamaForCausalLM.from_pretrained(aligned, dtype=torch.bfloat16).save_pretrained(aligned_bf16)
    ft_bf16 = _save(_perturbed(aligned, seed=12).to(torch.bfloat16), root / "ft_bf16", shard=SHARD_SIZE)
    return FullWorld(base=base, aligned=aligned, ft=ft, ft_single=ft_single, aligned_bf16=aligned_bf16, ft_bf16=ft_bf16)


_BUILT: dict[str, FullWorld] = {}


@pytest.fixture(scope="session")
def full_world(tmp_path_factory, tiny_pair) -> FullWorld:  # noqa: F811 - pytest fixture injection
    if "world" not in _BUILT:
        _BUILT["world"] = build_full_world(tmp_path_factory.mktemp("full_world"), *tiny_pair)
    return _BUILT["world"]


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def shard_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.safetensors"))


def weight_map(folder: Path) -> dict[str, str]:
    return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder as stored (dtype kept)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out
