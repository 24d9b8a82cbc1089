"""Synthetic 7B-shaped base/aligned pair and a PEFT LoRA adapter, written by streaming.

The benchmark needs checkpoints the size of a real 7B model without downloading one. The
generator writes hub-style folders (``config.json`` with a llama architecture,
``model.safetensors.index.json`` and one shard per decoder layer) and never holds more
than one tensor pair in memory: each shard's header is computed from the known shapes
first, then tensors are generated and appended one at a time.

``aligned = base + D`` where ``D`` is a low-rank matrix plus small dense noise, the shape
alignment displacements have in practice (a few strong directions over a noise floor).
Every tensor is seeded from its name, so a shallower view and the full model agree.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

# (module path inside a decoder layer, is it an MLP projection)
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
TARGET_MODULES = ATTENTION_PROJECTIONS + MLP_PROJECTIONS

SAFETENSORS_DTYPE_NAMES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16"}
# safetensors' header is padded to a multiple of 8 bytes so the data that follows is aligned.
HEADER_ALIGNMENT = 8


@dataclass(frozen=True)
class ModelShape:
    """Llama-style dimensions; the defaults are Llama-2-7B's."""

    hidden: int = 4096
    intermediate: int = 11008
    layers: int = 12
    vocab: int = 32000
    heads: int = 32

    def module_shape(self, module: str) -> tuple[int, int]:
        """(out, in) of a target projection, as transformers stores ``weight``."""
        if module in ATTENTION_PROJECTIONS:
            return (self.hidden, self.hidden)
        if module in ("gate_proj", "up_proj"):
            return (self.intermediate, self.hidden)
        if module == "down_proj":
            return (self.hidden, self.intermediate)
        raise KeyError(module)


@dataclass(frozen=True)
class DisplacementSpec:
    """How far ``aligned`` is from ``base``: ``D = low_rank + noise`` per target weight.

    Sizes are relative to the base weight's entry scale (``init_std``) so the same spec
    reads sensibly at toy and 7B shape.
    """

    init_std: float = 0.02
    rank: int = 8  # strong directions per module
    low_rank_rel: float = 0.05  # entry RMS of the low-rank part / init_std
    noise_rel: float = 0.005  # entry RMS of the dense noise / init_std


def module_prefix(layer: int, module: str) -> str:
    group = "self_attn" if module in ATTENTION_PROJECTIONS else "mlp"
    return f"model.layers.{layer}.{group}.{module}"


def target_weight_names(layers: int) -> list[str]:
    """Names of the base/aligned tensors a correction reads, in layer order."""
    return [f"{module_prefix(i, m)}.weight" for i in range(layers) for m in TARGET_MODULES]


def name_seed(name: str, salt: str = "") -> int:
    """A stable 63-bit seed per tensor name: views of any depth regenerate the same values."""
    digest = hashlib.sha256(f"{salt}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator_for(name: str, salt: str) -> torch.Generator:
    return torch.Generator().manual_seed(name_seed(name, salt))


# --------------------------------------------------------------------------- tensor math


def base_weight(shape: tuple[int, int], std: float, gen: torch.Generator) -> Tensor:
    return torch.randn(shape, generator=gen) * std


def displacement(shape: tuple[int, int], spec: DisplacementSpec, gen: torch.Generator) -> Tensor:
    """``D = L R + noise`` with entry RMS ``low_rank_rel * init_std`` for ``L R``."""
    m, n = shape
    k = min(spec.rank, m, n)
    left = torch.randn(m, k, generator=gen)
    right = torch.randn(k, n, generator=gen)
    # Entries of L @ R have variance k; rescale to the requested RMS.
    low_rank = (left @ right) * (spec.low_rank_rel * spec.init_std / k**0.5)
    low_rank.add_(torch.randn(shape, generator=gen), alpha=spec.noise_rel * spec.init_std)
    return low_rank


# --------------------------------------------------------------------------- streaming writer


def _tensor_bytes(t: Tensor) -> memoryview:
    """Raw little-endian bytes of a contiguous tensor (bf16 has no numpy dtype: view as int16)."""
    t = t.contiguous()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")


class StreamingSafetensorsWriter:
    """Write one safetensors file tensor by tensor, with the header computed up front.

    The format is an 8-byte header length, a JSON header with each tensor's dtype, shape
    and byte range, then the raw data. Knowing every shape in advance lets us write the
    header first and append data as each tensor is generated, so the writer holds one
    tensor at a time instead of the whole shard (``safetensors.torch.save_file`` needs
    them all in a dict).
    """

    def __init__(
        self, path: Path, layout: list[tuple[str, tuple[int, ...], torch.dtype]], metadata: dict[str, str] | None = None
    ):
        self.path = path
        self._expected = list(layout)
        self._next = 0
        header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
        offset = 0
        for name, shape, dtype in layout:
            nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {
                "dtype": SAFETENSORS_DTYPE_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % HEADER_ALIGNMENT)
        self.total_bytes = offset
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)

    def write(self, name: str, tensor: Tensor) -> None:
        exp_name, exp_shape, exp_dtype = self._expected[self._next]
        if (name, tuple(tensor.shape), tensor.dtype) != (exp_name, tuple(exp_shape), exp_dtype):
            raise ValueError(f"{self.path}: expected {exp_name} {exp_shape} {exp_dtype}, got {name}")
        self._file.write(_tensor_bytes(tensor))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._expected):
            raise ValueError(f"{self.path}: {len(self._expected) - self._next} tensors never written")
        self._file.close()

    def __enter__(self) -> StreamingSafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# --------------------------------------------------------------------------- model folders


def llama_config(shape: ModelShape, layers: int) -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.heads,
        "vocab_size": shape.vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def layer_layout(shape: ModelShape, layer: int) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """Tensors of one decoder layer's shard: the seven projections and two norms."""
    layout: list[tuple[str, tuple[int, ...], torch.dtype]] = [
        (f"{module_prefix(layer, m)}.weight", shape.module_shape(m), torch.bfloat16) for m in TARGET_MODULES
    ]
    for norm in ("input_layernorm", "post_attention_layernorm"):
        layout.append((f"model.layers.{layer}.{norm}.weight", (shape.hidden,), torch.bfloat16))
    return layout


def extras_layout(shape: ModelShape) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """Embeddings, final norm and LM head: read by a full model load, never corrected."""
    return [
        ("model.embed_tokens.weight", (shape.vocab, shape.hidden), torch.bfloat16),
        ("model.norm.weight", (shape.hidden,), torch.bfloat16),
        ("lm_head.weight", (shape.vocab, shape.hidden), torch.bfloat16),
    ]


def shard_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def _pair_tensors(
    layout: list[tuple[str, tuple[int, ...], torch.dtype]], shape: ModelShape, spec: DisplacementSpec
) -> Iterator[tuple[str, Tensor, Tensor]]:
    """Yield (name, base, aligned) in bf16, one pair at a time. Only target weights move."""
    targets = set(target_weight_names(shape.layers))
    for name, tshape, _ in layout:
        if len(tshape) == 1:  # RMSNorm weights start at one, as in a fresh llama
            ones = torch.ones(tshape, dtype=torch.bfloat16)
            yield name, ones, ones
            continue
        base = base_weight(tshape, spec.init_std, generator_for(name, "base"))  # type: ignore[arg-type]
        if name in targets:
            aligned = base + displacement(tshape, spec, generator_for(name, "displacement"))  # type: ignore[arg-type]
        else:
            aligned = base
        yield name, base.to(torch.bfloat16), aligned.to(torch.bfloat16)
        del base, aligned


def write_model_pair(
    base_dir: Path, aligned_dir: Path, shape: ModelShape, spec: DisplacementSpec, progress: bool = False
) -> list[str]:
    """Write both checkpoint folders (one shard per layer plus one for the extras).

    Returns the shard file names (identical in both folders), layer shards first.
    """
    count = shape.layers + 1
    layouts = [layer_layout(shape, i) for i in range(shape.layers)] + [extras_layout(shape)]
    shards = [shard_name(i, count) for i in range(count)]
    for folder in (base_dir, aligned_dir):
        folder.mkdir(parents=True, exist_ok=True)
    for shard, layout in zip(shards, layouts, strict=True):
        with (
            StreamingSafetensorsWriter(base_dir / shard, layout) as base_out,
            StreamingSafetensorsWriter(aligned_dir / shard, layout) as aligned_out,
        ):
            for name, base, aligned in _pair_tensors(layout, shape, spec):
                base_out.write(name, base)
                aligned_out.write(name, aligned)
        if progress:
            print(f"  wrote {shard}", flush=True)
    for folder in (base_dir, aligned_dir):
        _write_index(folder, dict(zip(shards, layouts, strict=True)))
        (folder / "config.json").write_text(json.dumps(llama_config(shape, shape.layers), indent=2))
    return shards


def _write_index(folder: Path, shard_layouts: dict[str, list[tuple[str, tuple[int, ...], torch.dtype]]]) -> None:
    weight_map = {name: shard for shard, layout in shard_layouts.items() for name, _, _ in layout}
    total = sum(
        _numel(s) * torch.empty((), dtype=d).element_size() for lay in shard_layouts.values() for _, s, d in lay
    )
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_depth_view(full_dir: Path, view_dir: Path, shape: ModelShape, layers: int) -> None:
    """A checkpoint folder with only the first ``layers`` layers, by symlinking shards.

    Each layer lives in its own shard, so a shallower model is an index over a prefix of
    the shards: no copy, the same bytes, and correction code sees a real ``layers``-deep
    checkpoint whatever its own module filtering does.
    """
    full_count = shape.layers + 1
    count = layers + 1
    view_dir.mkdir(parents=True, exist_ok=True)
    layouts: dict[str, list[tuple[str, tuple[int, ...], torch.dtype]]] = {}
    sources = [shard_name(i, full_count) for i in range(layers)] + [shard_name(shape.layers, full_count)]
    for i, source in enumerate(sources):
        name = shard_name(i, count)
        link = view_dir / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to((full_dir / source).resolve())
        layouts[name] = layer_layout(shape, i) if i < layers else extras_layout(shape)
    _write_index(view_dir, layouts)
    (view_dir / "config.json").write_text(json.dumps(llama_config(shape, layers), indent=2))


# --------------------------------------------------------------------------- PEFT adapter


@dataclass(frozen=True)
class AdapterSpec:
    rank: int = 16
    alpha: int = 32
    # Trained LoRA B is far from its zero init; this sets its entry RMS relative to the
    # base weights' so the update is a visible fraction of W.
    b_std: float = 0.01


def adapter_tensors(shape: ModelShape, layers: int, spec: AdapterSpec) -> Iterator[tuple[str, Tensor]]:
    """PEFT key names and fp32 factors (``lora_A``: r x in, ``lora_B``: out x r)."""
    for i in range(layers):
        for m in TARGET_MODULES:
            out_f, in_f = shape.module_shape(m)
            key = f"base_model.model.{module_prefix(i, m)}"
            a = torch.randn(spec.rank, in_f, generator=generator_for(key, "lora_A")) / in_f**0.5
            b = torch.randn(out_f, spec.rank, generator=generator_for(key, "lora_B")) * spec.b_std
            yield f"{key}.lora_A.weight", a
            yield f"{key}.lora_B.weight", b


def write_adapter(out_dir: Path, shape: ModelShape, layers: int, spec: AdapterSpec, base_path: str) -> None:
    """Write a PEFT adapter folder (LoRA on all seven projections of the first ``layers``)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    # An r = 16 adapter on 7B is ~40M parameters per 12 layers: small enough to save in one go.
    save_file(dict(adapter_tensors(shape, layers, spec)), str(out_dir / "adapter_model.safetensors"), {"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_path,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": 0.0,
        "target_modules": list(TARGET_MODULES),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "inference_mode": True,
        "init_lora_weights": True,
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))


@dataclass(frozen=True)
class SyntheticWorkdir:
    """Paths of everything the generator wrote."""

    root: Path
    shape: ModelShape

    def model(self, which: str, layers: int) -> Path:
        if layers == self.shape.layers:
            return self.root / "full" / which
        return self.root / f"depth{layers}" / which

    def adapter(self, layers: int) -> Path:
        return self.root / f"adapter-L{layers}"

    def manifest(self) -> dict[str, object]:
        return {"root": str(self.root), "shape": asdict(self.shape)}


def build_workdir(
    root: Path,
    shape: ModelShape,
    depths: list[int],
    displacement_spec: DisplacementSpec | None = None,
    adapter_spec: AdapterSpec | None = None,
    progress: bool = False,
) -> SyntheticWorkdir:
    """Write the full pair once, depth views for every other depth, an adapter per depth."""
    work = SyntheticWorkdir(root, shape)
    disp = displacement_spec or DisplacementSpec()
    ad = adapter_spec or AdapterSpec()
    base_full, aligned_full = work.model("base", shape.layers), work.model("aligned", shape.layers)
    write_model_pair(base_full, aligned_full, shape, disp, progress=progress)
    for depth in sorted(set(depths)):
        if depth != shape.layers:
            write_depth_view(base_full, work.model("base", depth), shape, depth)
            write_depth_view(aligned_full, work.model("aligned", depth), shape, depth)
        write_adapter(work.adapter(depth), shape, depth, ad, str(work.model("base", depth)))
    return work


def drop_from_page_cache(root: Path) -> None:
    """Ask the kernel to evict our files' clean pages, so every case reads from disk.

    ``POSIX_FADV_DONTNEED`` needs no privileges for files we can open; dirty pages are
    flushed first with ``fsync`` or the advice would skip them.
    """
    for dirpath, _, filenames in os.walk(root):
        for filename in filenames:
            path = Path(dirpath) / filename
            if path.is_symlink():
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
