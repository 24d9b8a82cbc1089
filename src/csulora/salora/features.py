"""SaLoRA's feature pass: per target layer, the top output-feature directions on response tokens.

For each target layer the forward pre-hook sees the layer's input ``X`` (tokens x n); on
the response tokens we form the output features ``Z = X W^T`` (tokens x m) and accumulate
their Gram ``Z^T Z`` (m x m, float64). The top right singular vectors of ``Z`` are the top
eigenvectors of that Gram (:func:`csulora.salora.math.top_right_singular_vectors`: exact
for m <= 4096, ``torch.svd_lowrank`` under a fixed seed above), so the pass needs memory
m^2 per layer whatever the number of tokens, and one forward pass.

The result (``V`` per layer, plus counts and timing) is cached in one ``.safetensors`` file
whose metadata records what it was computed from; a rerun with the same model files, data
and options reuses it instead of running the model again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from csulora.references.activations import MaskedInputHooks, run_batches
from csulora.salora.math import top_right_singular_vectors
from csulora.salora.model import find_target_linears
from csulora.training.data import IGNORE_INDEX

FEATURE_BATCH_SIZE = 16
CACHE_FORMAT = "csulora-salora-features/1"


@dataclass
class FeatureDirections:
    """One feature pass's result: ``V`` (m x k, float32) and singular values per module."""

    bases: dict[str, Tensor]
    singular_values: dict[str, Tensor]
    tokens: int  # response tokens seen
    samples: int
    seconds: float  # cost of the pass (generation of refusals included, when there was one)
    captured: dict[str, float] = field(default_factory=dict)  # fraction of ||Z||^2 kept, per module
    info: dict = field(default_factory=dict)  # JSON-ready extras (e.g. the generated refusals)


class OutputGramCollector(MaskedInputHooks):
    """Forward pre-hooks that accumulate ``Z^T Z`` of each target layer on the counted tokens.

    Set :attr:`token_mask` (batch x seq, bool) before each forward; tokens outside it
    (prompt, padding) are ignored (:class:`csulora.references.activations.MaskedInputHooks`).
    """

    def __init__(self, linears: Mapping[str, nn.Linear]) -> None:
        super().__init__(linears)
        self.grams: dict[str, Tensor] = {
            name: torch.zeros(lin.out_features, lin.out_features, dtype=torch.float64)
            for name, lin in self.modules.items()
        }

    def observe(self, name: str, module: nn.Module, x: Tensor) -> None:
        # Z = X W^T without the bias: the features the weight itself produces.
        z = F.linear(x.float(), module.weight.float())
        self.grams[name] += (z.T @ z).double().cpu()


def count_response_tokens(examples: Iterable[Mapping]) -> int:
    return sum(sum(1 for label in e["labels"] if label != IGNORE_INDEX) for e in examples)


def collect_output_grams(
    model: nn.Module,
    examples: Sequence[Mapping],
    targets: Sequence[str],
    *,
    pad_id: int,
    batch_size: int = FEATURE_BATCH_SIZE,
    progress: bool = True,
    desc: str = "features",
) -> dict[str, Tensor]:
    """One forward pass over ``examples``; the response-token output Gram of each target layer."""
    linears = find_target_linears(model, targets)
    with OutputGramCollector(linears) as collector:
        run_batches(model, examples, collector, pad_id=pad_id, batch_size=batch_size, progress=progress, desc=desc)
    return collector.grams


def directions_from_grams(grams: Mapping[str, Tensor], rank: int, *, seed: int) -> tuple[dict, dict, dict]:
    """Top-``rank`` directions per layer: (bases, singular values, fraction of ||Z||^2 kept)."""
    bases, values, captured = {}, {}, {}
    for name, gram in grams.items():
        V, s = top_right_singular_vectors(gram, rank, seed=seed)
        bases[name], values[name] = V.float().contiguous(), s.float().contiguous()
        total = float(torch.trace(gram))
        captured[name] = float((s.double() ** 2).sum() / total) if total > 0 else 0.0
    return bases, values, captured


# --------------------------------------------------------------------------- cache


def file_fingerprint(path: str | os.PathLike) -> dict:
    """Identity of a file without reading it all: resolved path, size, modification time."""
    p = Path(path).resolve()
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def model_fingerprint(model_dir: str | os.PathLike) -> list[dict]:
    """The files that define a checkpoint's behaviour (weights, config, tokenizer)."""
    folder = Path(model_dir)
    names = sorted(
        p.name for p in folder.iterdir()
        if p.is_file() and (p.suffix in (".safetensors", ".json", ".jinja", ".model", ".txt"))
    )
    return [file_fingerprint(folder / name) for name in names]


def content_digest(texts: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()


def cache_key(description: Mapping) -> str:
    """A stable hash of everything a feature pass's result depends on."""
    blob = json.dumps(description, sort_keys=True, ensure_ascii=True)
    return hashlib.sha256(blob.encode("ascii")).hexdigest()


def cache_path(cache_dir: str | os.PathLike, role: str, key: str) -> Path:
    return Path(cache_dir) / f"salora-{role}-{key[:20]}.safetensors"


def save_directions(path: Path, directions: FeatureDirections, description: Mapping) -> Path:
    """Write the per-layer bases to ``path`` (atomically) with the description as metadata."""
    from safetensors.torch import save_file

    from csulora.io.atomic import atomic_output_file

    tensors: dict[str, Tensor] = {}
    for name, V in directions.bases.items():
        tensors[f"{name}.V"] = V.contiguous()
        tensors[f"{name}.S"] = directions.singular_values[name].contiguous()
    metadata = {
        "format": CACHE_FORMAT,
        "key": cache_key(description),
        "description": json.dumps(description, sort_keys=True),
        "tokens": str(directions.tokens),
        "samples": str(directions.samples),
        "seconds": repr(directions.seconds),
        "captured": json.dumps(directions.captured),
        "info": json.dumps(directions.info, ensure_ascii=False),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def load_directions(path: Path, description: Mapping, module_names: Iterable[str]) -> FeatureDirections | None:
    """The cached result for ``description``, or None when absent, stale or unreadable."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != CACHE_FORMAT or metadata.get("key") != cache_key(description):
                return None
            names = list(module_names)
            keys = set(handle.keys())
            if any(f"{n}.V" not in keys or f"{n}.S" not in keys for n in names):
                return None
            bases = {n: handle.get_tensor(f"{n}.V") for n in names}
            values = {n: handle.get_tensor(f"{n}.S") for n in names}
        return FeatureDirections(
            bases=bases,
            singular_values=values,
            tokens=int(metadata["tokens"]),
            samples=int(metadata["samples"]),
            seconds=float(metadata["seconds"]),
            captured=json.loads(metadata.get("captured") or "{}"),
            info={**json.loads(metadata.get("info") or "{}"), "cached": True, "cache_file": str(path)},
        )
    except Exception:  # a truncated or foreign file is recomputed, never trusted
        return None

