"""A tiny random Llama base/aligned pair and REAL PEFT LoRA adapters, built on disk.

Everything goes through the real libraries (``save_pretrained`` of transformers and of
PEFT), so the tests read exactly what users' folders hold. The pair and each adapter
variant are built once per test session (module-level cache over ``tmp_path_factory``)
and must be treated as read-only by the tests; tests that damage files copy them first.

The aligned model differs from the base by a low-rank displacement in every decoder
linear layer except ``model.layers.1.self_attn.k_proj``, which alignment leaves untouched
(D == 0, the empty-subspace case).
"""

from __future__ import annotations

import json

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

HIDDEN = 32
INTERMEDIATE = 48
LAYERS = 2
UNTOUCHED_MODULE = "model.layers.1.self_attn.k_proj"

_CACHE: dict[Any, Path] = {}


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=64,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )


def _tiny_model(seed: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config())


def build_pair(root: Path, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[Path, Path]:
    """Save a random base and an aligned model (base + low-rank D per linear layer)."""
    model = _tiny_model(seed).to(dtype)
    base_dir, aligned_dir = root / "base", root / "aligned"
    model.save_pretrained(base_dir)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            module = name[: -len(".weight")]
            if param.ndim != 2 or ".layers." not in name or module == UNTOUCHED_MODULE:
                continue
            m, n = param.shape
            left = torch.randn(m, 3, generator=generator)
            right = torch.randn(3, n, generator=generator)
            delta = 0.02 * left @ right + 0.002 * torch.randn(m, n, generator=generator)
            param += delta.to(dtype)
    model.save_pretrained(aligned_dir)
    return base_dir, aligned_dir


def build_adapter(
    out_dir: Path,
    *,
    r: int = 4,
    lora_alpha: int = 8,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    use_rslora: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, int] | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 7,
    base_model: Path | None = None,
    **extra: Any,
) -> Path:
    """A real PEFT LoRA adapter for the tiny Llama with random (non-zero) A and B.

    ``base_model`` is recorded as its ``base_model_name_or_path`` (the model it was "trained" on),
    as a real fine-tune of the aligned model records it."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=list(target_modules),
        use_rslora=use_rslora,
        rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {},
        lora_dropout=0.0,
        **extra,
    )
    model = get_peft_model(_tiny_model(0), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    model = model.to(dtype)
    model.save_pretrained(out_dir)
    if base_model is not None:
        config_file = out_dir / "adapter_config.json"
        recorded = json.loads(config_file.read_text())
        recorded["base_model_name_or_path"] = str(base_model)
        config_file.write_text(json.dumps(recorded, indent=2, sort_keys=True) + "\n")
    return out_dir


ADAPTER_VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "rslora": {"use_rslora": True, "r": 4, "lora_alpha": 6},
    "patterns": {
        "target_modules": ("q_proj", "v_proj", "down_proj"),
        "rank_pattern": {"v_proj": 2, "layers.1.mlp.down_proj": 3},
        "alpha_pattern": {"layers.1.self_attn.q_proj": 3, "down_proj": 5},
    },
    "rslora_patterns": {
        "use_rslora": True,
        "target_modules": ("q_proj", "k_proj", "v_proj"),
        "rank_pattern": {"k_proj": 2},
        "alpha_pattern": {"v_proj": 12},
    },
    "bf16": {"dtype": torch.bfloat16},
}


def _cached(key: Any, factory: pytest.TempPathFactory, build) -> Path:
    if key not in _CACHE:
        _CACHE[key] = build(factory.mktemp(str(key[0])))
    return _CACHE[key]


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(base_dir, aligned_dir) of the float32 tiny Llama pair."""
    root = _cached(("pair",), tmp_path_factory, lambda d: build_pair(d) and d)
    return root / "base", root / "aligned"


def adapter_variant(tmp_path_factory, variant: str) -> Path:
    """A session-cached adapter folder of one of :data:`ADAPTER_VARIANTS`, recorded as trained on
    the tiny pair's aligned model (so a calibration file can be checked against it)."""
    aligned = _cached(("pair",), tmp_path_factory, lambda d: build_pair(d) and d) / "aligned"
    return _cached(
        ("adapter", variant),
        tmp_path_factory,
        lambda d: build_adapter(d / "adapter", base_model=aligned, **ADAPTER_VARIANTS[variant]),
    )


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory) -> Path:
    return adapter_variant(tmp_path_factory, "plain")


@pytest.fixture(scope="session")
def tiny_subspace(tmp_path_factory, tiny_pair) -> Path:
    """A subspace cache of the tiny pair (all decoder linear layers, default options)."""

    def build(d: Path) -> Path:
        from csulora.references.subspace import build_subspace

        return build_subspace(*tiny_pair, d / "subspace.safetensors", progress=False)

    return _cached(("subspace",), tmp_path_factory, build)


# -- calibration statistics (docs/design.md §5c) --------------------------------------------------
def calibration_group(module: str) -> str:
    """The Gram group of a tiny Llama module: q/k/v share the attention input, gate/up the MLP input."""
    prefix, leaf = module.rsplit(".", 1)
    if leaf in ("q_proj", "k_proj", "v_proj"):
        return f"{prefix}.input"  # model.layers.N.self_attn.input
    if leaf in ("gate_proj", "up_proj"):
        return f"{prefix}.input"  # model.layers.N.mlp.input
    return module


def tiny_module_inputs() -> dict[str, int]:
    """Every decoder linear module of the tiny Llama -> its input size n."""
    sizes = {"q_proj": HIDDEN, "k_proj": HIDDEN, "v_proj": HIDDEN, "o_proj": HIDDEN,
             "gate_proj": HIDDEN, "up_proj": HIDDEN, "down_proj": INTERMEDIATE}
    blocks = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
              "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    return {f"model.layers.{i}.{blocks[leaf]}.{leaf}": n for i in range(LAYERS) for leaf, n in sizes.items()}


def random_gram_sum(n: int, tokens: int, generator: torch.Generator, *, spikes: int = 4) -> torch.Tensor:
    """``sum x x^T`` of random activations with a few strong directions (float64)."""
    directions = torch.randn(spikes, n, generator=generator, dtype=torch.float64)
    codes = torch.randn(tokens, spikes, generator=generator, dtype=torch.float64) * 3.0
    X = codes @ directions + torch.randn(tokens, n, generator=generator, dtype=torch.float64)
    return X.T @ X


def build_calibration(
    path: Path,
    aligned_dir: Path | None,
    *,
    modules: dict[str, int] | None = None,
    seed: int = 0,
    dense_max_n: int = 4096,
    force: bool = False,
) -> Path:
    """A synthetic calibration file for the tiny pair via the real writer: random Grams of the
    right sizes, one group per shared input, the aligned model's fingerprint in ``info``."""
    from csulora.linalg.gram import calibration_moments
    from csulora.io.calibration_file import MODEL_FINGERPRINT_KEY, save_calibration
    from csulora.io.fingerprint import model_fingerprint

    modules = tiny_module_inputs() if modules is None else modules
    generator = torch.Generator().manual_seed(seed)
    groups, sizes = {}, {}
    for name, n in modules.items():
        sizes.setdefault(calibration_group(name), n)
    for group, n in sizes.items():
        harmful = random_gram_sum(n, 3 * n, generator)
        task = random_gram_sum(n, 4 * n, generator)
        groups[group] = calibration_moments(group, harmful, 3 * n, task, 4 * n, dense_max_n=dense_max_n)
    info = {"synthetic": True, "seed": seed}
    if aligned_dir is not None:
        info[MODEL_FINGERPRINT_KEY] = model_fingerprint(aligned_dir)
    mapping = {name: calibration_group(name) for name in modules}
    return save_calibration(path, groups, mapping, info, force=force)


@pytest.fixture(scope="session")
def tiny_calibration(tmp_path_factory, tiny_pair) -> Path:
    """A calibration file (synthetic statistics) for every decoder linear module of the tiny pair."""
    return _cached(
        ("calibration",), tmp_path_factory, lambda d: build_calibration(d / "calibration.safetensors", tiny_pair[1])
    )


def build_update_statistics(path: Path, aligned_dir: Path, update_dir: Path, *, seed: int = 0,
                            force: bool = False) -> Path:  # fmt: skip
    """A synthetic update-statistics file (role ``update``, Antidote's) for every decoder linear
    module of the tiny pair via the real writer: one random harmful Gram a group, recorded as
    measured on ``update_dir`` fine-tuned from ``aligned_dir`` (their fingerprints in ``info``)."""
    from csulora.io.calibration_file import MODEL_FINGERPRINT_KEY, ROLE_UPDATE, UPDATE_KEY, save_calibration
    from csulora.io.fingerprint import model_fingerprint, update_fingerprint
    from csulora.linalg.gram import update_moment
    from csulora.types import ModuleCalibration

    generator = torch.Generator().manual_seed(seed)
    sizes: dict[str, int] = {}
    for name, n in tiny_module_inputs().items():
        sizes.setdefault(calibration_group(name), n)
    groups = {
        group: ModuleCalibration(group, update_moment(group, random_gram_sum(n, 3 * n, generator), 3 * n), None)
        for group, n in sizes.items()
    }
    info = {"synthetic": True, "seed": seed, MODEL_FINGERPRINT_KEY: model_fingerprint(aligned_dir),
            UPDATE_KEY: {"fingerprint": update_fingerprint(update_dir)}}  # fmt: skip
    mapping = {name: calibration_group(name) for name in tiny_module_inputs()}
    return save_calibration(path, groups, mapping, info, force=force, role=ROLE_UPDATE)


@pytest.fixture(scope="session")
def tiny_update_statistics(tmp_path_factory, tiny_pair, tiny_adapter) -> Path:
    """An update-statistics file (synthetic) of the tiny adapter on the tiny pair's aligned model."""
    return _cached(
        ("update_statistics",), tmp_path_factory,
        lambda d: build_update_statistics(d / "update.safetensors", tiny_pair[1], tiny_adapter),
    )  # fmt: skip


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def merged_weights(model_dir: Path, adapter_dir: Path | None = None) -> dict[str, torch.Tensor]:
    """Linear weights (float64) of a model, after merging an adapter with stock PEFT."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return {
        name[: -len(".weight")]: p.detach().to(torch.float64).clone()
        for name, p in model.named_parameters()
        if p.ndim == 2 and ".layers." in name
    }


def leftovers(parent: Path) -> list[str]:
    """Hidden temp files/folders the atomic writers would leave behind on failure."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))
