"""PEFT LoRA adapter folders: read them, refuse what we cannot correct, write corrected ones.

A PEFT LoRA folder is ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` (r x n) and ``...lora_B.weight`` (m x r).
The update of a module is ``dW = s * B @ A`` with ``s = alpha / r`` (``alpha / sqrt(r)``
when ``use_rslora``); ``rank_pattern`` / ``alpha_pattern`` override r and alpha per module,
resolved exactly as PEFT 0.21 does it (:func:`pattern_value`).

Written adapters keep every module's scale s (docs/design.md §10): when a correction changes a
module's rank to r', its alpha becomes ``s * r'`` (``s * sqrt(r')`` with rslora), and both
go into ``rank_pattern`` / ``alpha_pattern`` under the module's full name, so stock
``PeftModel.from_pretrained`` rebuilds the same scaling. Output bytes are deterministic:
sorted JSON keys, fixed safetensors metadata, no timestamps.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from csulora.errors import InputError
from csulora.io.checkpoints import PICKLED_SUFFIXES, check_finite, natural_key, open_safetensors, read_tensor
from csulora.types import LoraUpdate, as_float64

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
DEFAULT_REPORT_NAME = "csulora_report.json"
MODEL_CARD = "README.md"
# Files copied from the input folder into a corrected one: tokenizer and chat template only.
SIDECAR_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "chat_template.*",
    "generation_config.json",
)
# Fixed safetensors metadata: what PEFT writes itself, and nothing that changes per run.
SAFETENSORS_METADATA = {"format": "pt"}

_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")

# Config fields whose non-default value makes the saved factors mean something other than
# ``W + s B A`` on the plain base model: correcting them as LoRA would be silently wrong.
# The texts say why without naming the field: the message appends ``(field=value)`` itself.
_UNSUPPORTED_FLAGS: dict[str, str] = {
    "use_dora": "DoRA adapters rescale the merged weight by a learned magnitude",
    "fan_in_fan_out": "Conv1D-style layers store the factors transposed",
    "lora_bias": "an extra bias is trained on lora_B",
    "use_qalora": "QA-LoRA pools the inputs of a quantized base",
    "modules_to_save": "full copies of whole modules are trained, which no LoRA correction covers",
    "trainable_token_indices": "embedding rows are trained, which no LoRA correction covers",
    "layer_replication": "the model's layer stack is changed",
    "target_parameters": "LoRA on raw nn.Parameters (e.g. MoE experts) is not a linear-layer LoRA",
    "alora_invocation_tokens": "activated LoRA applies only after an invocation sequence",
    "megatron_config": "Megatron-parallel LoRA layers are not supported",
    "use_bdlora": "block-diagonal LoRA is not supported",
    "velora_config": "VeLoRA adapters are not supported",
    "monteclora_config": "MonteCLoRA adapters are not supported",
    "arrow_config": "Arrow routing adapters are not supported",
    "kasa_config": "KaSA adapters are not supported",
}
# Initialisations that rewrite the base weights (W_res = W - s B0 A0): such an adapter only
# makes sense on that residual model unless PEFT converted it at save time.
_BASE_REWRITING_INITS = ("pissa", "olora", "loftq", "corda")


# -- scaling -----------------------------------------------------------------------------------
def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's scaling: ``alpha / r``, or ``alpha / sqrt(r)`` for rank-stabilised LoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def alpha_for_scale(scale: float, rank: int, use_rslora: bool) -> float | int:
    """The alpha that gives ``scale`` at ``rank`` (an int when it is one, for tidy configs)."""
    alpha = scale * math.sqrt(rank) if use_rslora else scale * rank
    nearest = round(alpha)
    if abs(alpha - nearest) <= 1e-9 * max(1.0, abs(alpha)):
        return int(nearest)
    return alpha


def pattern_value(patterns: Mapping[str, Any] | None, module: str, default: Any) -> Any:
    """Resolve a ``rank_pattern``/``alpha_pattern`` entry for ``module`` as PEFT 0.21 does.

    PEFT (``peft.utils.other.get_pattern_key``) walks the pattern keys in order and takes
    the first key ``k`` for which ``re.match(rf"(.*\\.)?({k})$", module)`` succeeds: a key is
    a regex matched against the end of the full module name at a dot boundary. No match
    falls back to the global ``r``/``lora_alpha``.
    """
    for key in patterns or {}:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


# -- data model -------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdapterModule(LoraUpdate):
    """One module's stored LoRA factors (in the file's dtype), its name and resolved alpha."""

    name: str
    alpha: float

    def update(self) -> LoraUpdate:
        """The factors as the methods want them: float64 on CPU with the module's scale."""
        return LoraUpdate(A=as_float64(self.A), B=as_float64(self.B), scale=self.scale)


@dataclass
class LoraAdapter:
    """A PEFT LoRA folder read into memory (adapters are small: factors only)."""

    path: Path
    config: dict[str, Any]
    modules: dict[str, AdapterModule]  # naturally sorted by module name

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))

    @property
    def rank(self) -> int:
        return int(self.config.get("r", 8))

    @property
    def lora_alpha(self) -> float:
        return self.config.get("lora_alpha", 8)

    @property
    def weights_file(self) -> Path:
        return self.path / ADAPTER_WEIGHTS

    def module_names(self) -> list[str]:
        return list(self.modules)


# -- reading ----------------------------------------------------------------------------------
def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    """Read and check ``adapter_config.json``; refuse anything that is not a plain LoRA."""
    folder = Path(adapter_dir)
    if not folder.exists():
        raise InputError(f"{folder}: no such adapter folder")
    if not folder.is_dir():
        raise InputError(f"{folder}: expected a PEFT adapter folder, got a file")
    config_path = folder / ADAPTER_CONFIG
    if not config_path.exists():
        raise InputError(f"{folder}: no {ADAPTER_CONFIG} (not a PEFT adapter folder)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{config_path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise InputError(f"{config_path}: expected a JSON object")
    check_supported_config(config, config_path)
    return config


def check_supported_config(config: Mapping[str, Any], config_path: Path | str) -> None:
    """Raise a one-line InputError for any PEFT configuration csulora cannot correct."""
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise InputError(f"{config_path}: peft_type {peft_type!r} is not supported (csulora corrects LoRA adapters)")
    for key, why in _UNSUPPORTED_FLAGS.items():
        if config.get(key):
            raise InputError(f"{config_path}: unsupported PEFT config: {why} ({key}={config[key]!r})")
    bias = config.get("bias", "none")
    if bias != "none":
        raise InputError(f"{config_path}: unsupported PEFT config: bias={bias!r} trains bias vectors (only 'none')")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise InputError(
            f"{config_path}: unsupported PEFT config: init_lora_weights={init!r} rewrites the base weights; "
            "save the adapter with path_initial_model_for_weight_conversion to get a plain LoRA"
        )
    for key in ("r", "lora_alpha"):
        value = config.get(key, 8)
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise InputError(f"{config_path}: {key} must be a positive number, got {value!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise InputError(f"{config_path}: {key} must be a JSON object, got {config[key]!r}")


def read_adapter(adapter_dir: str | Path) -> LoraAdapter:
    """Read a PEFT LoRA folder; every problem is a one-line InputError naming file and tensor."""
    folder = Path(adapter_dir)
    config = read_adapter_config(folder)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.exists():
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLED_SUFFIXES)
        if pickled:
            raise InputError(
                f"{folder}: only pickled adapter weights found ({', '.join(pickled)}); csulora reads "
                "safetensors only: reload it in a trusted environment and "
                "`model.save_pretrained(OUT, safe_serialization=True)`"
            )
        raise InputError(f"{folder}: no {ADAPTER_WEIGHTS}")
    factors = _read_factors(weights)
    modules = {}
    for name in sorted(factors, key=natural_key):
        pair = factors[name]
        modules[name] = _build_module(name, pair, config, weights)
    if not modules:
        raise InputError(f"{weights}: no LoRA tensors (lora_A/lora_B) found")
    return LoraAdapter(path=folder, config=config, modules=modules)


def _read_factors(weights: Path) -> dict[str, dict[str, Tensor]]:
    handle = open_safetensors(weights)
    keys = sorted(handle.keys())
    unsupported = [key for key in keys if _LORA_KEY.match(key) is None]
    if unsupported:
        # Name the most telling key: a lora_embedding_A says "embedding LoRA" better than
        # the base embedding PEFT saves beside it.
        key = min(unsupported, key=lambda k: (_why_unsupported_key(k) == _GENERIC_REASON, k))
        raise InputError(f"{weights}: unsupported tensor {key} ({_why_unsupported_key(key)})")
    factors: dict[str, dict[str, Tensor]] = {}
    for key in keys:
        match = _LORA_KEY.match(key)
        assert match is not None
        tensor = read_tensor(handle, weights, key, dtype=None).clone()  # own memory, not the mmap
        factors.setdefault(match["module"], {})[match["which"]] = tensor
    return factors


def _why_unsupported_key(key: str) -> str:
    if "lora_embedding_" in key:
        return "embedding LoRA is not supported"
    if "lora_magnitude_vector" in key:
        return "DoRA magnitude vectors are not supported"
    if key.endswith(".bias"):
        return "trained biases are not supported"
    if not key.startswith(PEFT_PREFIX):
        return f"expected PEFT key naming {PEFT_PREFIX}<module>.lora_A.weight"
    return _GENERIC_REASON


_GENERIC_REASON = "only lora_A/lora_B weights of linear layers are supported"


def _build_module(name: str, pair: dict[str, Tensor], config: Mapping[str, Any], weights: Path) -> AdapterModule:
    for which in ("A", "B"):
        if which not in pair:
            raise InputError(f"{weights}: tensor {PEFT_PREFIX}{name}.lora_{which}.weight is missing")
    A, B = pair["A"], pair["B"]
    a_key, b_key = f"{PEFT_PREFIX}{name}.lora_A.weight", f"{PEFT_PREFIX}{name}.lora_B.weight"
    if A.ndim != 2 or B.ndim != 2:
        raise InputError(f"{weights}: tensor {a_key} has shape {list(A.shape)} (only linear-layer LoRA is supported)")
    if A.shape[0] != B.shape[1]:
        raise InputError(
            f"{weights}: tensor {a_key} has shape {list(A.shape)} but {b_key} has {list(B.shape)} (ranks differ)"
        )
    rank = int(A.shape[0])
    expected_rank = pattern_value(config.get("rank_pattern"), name, config.get("r", 8))
    if rank != expected_rank:
        raise InputError(
            f"{weights}: tensor {a_key} has rank {rank} but {ADAPTER_CONFIG} gives r={expected_rank} for this module"
        )
    alpha = pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", 8))
    scale = lora_scale(float(alpha), rank, bool(config.get("use_rslora", False)))
    return AdapterModule(name=name, A=A, B=B, alpha=alpha, scale=scale)


# -- writing ----------------------------------------------------------------------------------
def write_adapter(
    adapter: LoraAdapter,
    out_dir: str | Path,
    updates: Mapping[str, LoraUpdate],
    *,
    base_model_name_or_path: str | None = None,
    model_card: str | None = None,
) -> None:
    """Write ``adapter`` with ``updates`` replacing its modules' factors into ``out_dir``.

    Modules not in ``updates`` are copied unchanged. Each written module keeps its dtype
    and scale; ranks that differ from the config's global ``r`` (or alphas from the global
    ``lora_alpha``) are written to ``rank_pattern``/``alpha_pattern`` under full module names.
    ``base_model_name_or_path`` replaces the input's in the config (None keeps it);
    ``model_card`` is written as ``README.md``. The input's own card and training record
    are never copied (:func:`copy_sidecar_files`): they describe the input, not this output.
    ``out_dir`` should be the temporary folder of :func:`csulora.io.atomic.atomic_output_dir`.
    """
    out = Path(out_dir)
    unknown = sorted(set(updates) - set(adapter.modules))
    if unknown:
        raise InputError(f"{adapter.path}: cannot write update for module {unknown[0]}: not in the adapter")
    tensors: dict[str, Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float | int] = {}
    global_r, global_alpha = adapter.rank, adapter.lora_alpha
    for name, module in adapter.modules.items():
        A, B, alpha = _factors_to_write(module, updates.get(name), adapter.use_rslora)
        a_key, b_key = f"{PEFT_PREFIX}{name}.lora_A.weight", f"{PEFT_PREFIX}{name}.lora_B.weight"
        check_finite(A, out / ADAPTER_WEIGHTS, a_key)
        check_finite(B, out / ADAPTER_WEIGHTS, b_key)
        tensors[a_key], tensors[b_key] = A, B
        rank = int(A.shape[0])
        if rank != global_r:
            rank_pattern[name] = rank
        if alpha != global_alpha:
            alpha_pattern[name] = alpha
    config = dict(adapter.config)
    # Old pattern keys are dropped: PEFT takes the first matching key, so a short key like
    # "v_proj" could shadow a full name. Full names match only their own module.
    config["rank_pattern"] = dict(sorted(rank_pattern.items(), key=lambda kv: natural_key(kv[0])))
    config["alpha_pattern"] = dict(sorted(alpha_pattern.items(), key=lambda kv: natural_key(kv[0])))
    if base_model_name_or_path is not None:
        config["base_model_name_or_path"] = base_model_name_or_path
    from safetensors.torch import save_file

    save_file(dict(sorted(tensors.items())), str(out / ADAPTER_WEIGHTS), metadata=dict(SAFETENSORS_METADATA))
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    copy_sidecar_files(adapter.path, out)
    if model_card is not None:
        (out / MODEL_CARD).write_text(model_card, encoding="utf-8")


def _factors_to_write(
    module: AdapterModule, update: LoraUpdate | None, use_rslora: bool
) -> tuple[Tensor, Tensor, float | int]:
    """One module's (possibly new) factors as the file stores them, with the right alpha."""
    if update is None:
        return module.A.contiguous(), module.B.contiguous(), module.alpha
    stored = as_stored_update(module, update)
    alpha = module.alpha if stored.rank == module.rank else alpha_for_scale(module.scale, stored.rank, use_rslora)
    return stored.A, stored.B, alpha


def as_stored_update(module: AdapterModule, update: LoraUpdate) -> LoraUpdate:
    """``update`` as the adapter file will store it: the input's dtype and scale, rank >= 1.

    The written update is still exactly ``update.dense()`` up to the cast. Idempotent, so a
    caller may convert results as they arrive (the methods' float64 factors would otherwise
    be held, at twice an fp32 file's bytes, until the single-file write) and
    :func:`write_adapter` leaves them as they are.
    """
    A, B = update.A, update.B
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1] or (B.shape[0], A.shape[1]) != module.shape:
        raise InputError(
            f"method returned factors A {list(A.shape)}, B {list(B.shape)} for module {module.name} "
            f"whose weight is {list(module.shape)}"
        )
    if not math.isclose(update.scale, module.scale, rel_tol=1e-12, abs_tol=0.0):
        # The factor formulas assume the input's scale is kept (docs/design.md §10): fold any
        # other scale into B so the written update is still exactly update.dense().
        B = B * (update.scale / module.scale)
    if A.shape[0] == 0:
        # PEFT needs r >= 1: an empty update is written as one zero direction.
        A = torch.zeros(1, A.shape[1], dtype=A.dtype)
        B = torch.zeros(B.shape[0], 1, dtype=B.dtype)
    return LoraUpdate(
        A=A.detach().to(device="cpu", dtype=module.A.dtype).contiguous(),
        B=B.detach().to(device="cpu", dtype=module.B.dtype).contiguous(),
        scale=module.scale,
    )


def is_sidecar_file(name: str) -> bool:
    """Files that stay true of a corrected adapter: how text becomes tokens and chats are rendered."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in SIDECAR_PATTERNS)


def copy_sidecar_files(src: Path, dst: Path) -> None:
    """Copy the tokenizer/chat-template files beside the adapter, nothing else.

    Not the model card or a training record (they describe the input: the caller writes
    its own card), never other weights (uncorrected copies) or csulora reports.
    """
    for path in sorted(src.iterdir()):
        if path.is_file() and is_sidecar_file(path.name):
            shutil.copyfile(path, dst / path.name)


def files_not_copied(src: Path) -> list[str]:
    """The input's other files (its model card, training record, ...), to name in the new card."""
    skip = {ADAPTER_CONFIG, ADAPTER_WEIGHTS, DEFAULT_REPORT_NAME}
    return [
        path.name
        for path in sorted(src.iterdir())
        if path.is_file() and not path.name.startswith(".") and path.name not in skip and not is_sidecar_file(path.name)
    ]
