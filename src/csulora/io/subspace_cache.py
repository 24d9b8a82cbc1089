"""The subspace cache: one ``.safetensors`` file with each module's top-k SVD of D.

Computing the safety subspace reads two whole checkpoints; correcting an adapter from the
cache reads a few MB. Layout:

- tensors ``<module>.U`` (m x k), ``<module>.S`` (k), ``<module>.V`` (n x k), float32
  (D is float32, so more digits would be noise); an empty subspace (D == 0) has k = 0;
- metadata ``csulora`` (a JSON string): format name and version, source paths, the
  subspace options, and per module its shape, rank, captured energy, exact ``||D||``
  and a fingerprint of D, so a cache used beside ``--base/--aligned`` can be checked
  against the pair it claims to come from.

Bytes are deterministic for the same inputs and options (sorted keys, no timestamps).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from csulora.errors import InputError, excerpt
from csulora.io.atomic import atomic_output_file
from csulora.io.checkpoints import natural_key, open_safetensors, read_tensor
from csulora.types import ModuleSubspace

CACHE_FORMAT = "csulora-subspace"
CACHE_VERSION = 1
METADATA_KEY = "csulora"
_FINGERPRINT_ROWS = 64


def round_trip(subspace: ModuleSubspace) -> ModuleSubspace:
    """The subspace as the cache stores it (float32 values, float64 tensors for the methods).

    Subspaces computed on the fly go through the same rounding, so ``--subspace FILE`` and
    ``--base/--aligned`` give the methods identical numbers and identical outputs.
    """

    def rounded(t: Tensor) -> Tensor:
        return t.detach().to(device="cpu", dtype=torch.float32).to(torch.float64)

    return ModuleSubspace(
        U=rounded(subspace.U),
        S=rounded(subspace.S),
        V=rounded(subspace.V),
        energy=float(subspace.energy),
        d_norm=float(subspace.d_norm),
    )


def displacement_fingerprint(displacement: Tensor) -> str:
    """A cheap fingerprint of D: its shape and a fixed sample of its rows, hashed.

    Hashing all of D would cost as much as reading it again; evenly spaced rows catch a
    different checkpoint pair (or different layer) with near certainty.
    """
    rows = displacement.shape[0]
    index = torch.linspace(0, rows - 1, min(rows, _FINGERPRINT_ROWS)).round().long().unique()
    sample = displacement.detach().to(device="cpu", dtype=torch.float32)[index].contiguous()
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps(list(displacement.shape)).encode())
    digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class ModuleEntry:
    """What the cache knows about one module without reading its tensors."""

    name: str
    shape: tuple[int, int]
    rank: int
    energy: float
    d_norm: float
    fingerprint: str | None


@dataclass
class SubspaceCache:
    """An opened cache file; :meth:`get` reads one module's U, S, V on demand."""

    path: Path
    meta: dict[str, Any]
    entries: dict[str, ModuleEntry] = field(default_factory=dict)
    _handle: Any = None

    def modules(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, module: object) -> bool:
        return module in self.entries

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.meta.get("options", {}))

    def entry(self, module: str) -> ModuleEntry:
        try:
            return self.entries[module]
        except KeyError:
            raise InputError(
                f"{self.path}: no subspace for module {module} (rebuild the cache with its module in --targets)"
            ) from None

    def get(self, module: str) -> ModuleSubspace:
        entry = self.entry(module)
        if self._handle is None:
            self._handle = open_safetensors(self.path)
        U = read_tensor(self._handle, self.path, f"{module}.U", dtype=torch.float64)
        S = read_tensor(self._handle, self.path, f"{module}.S", dtype=torch.float64)
        V = read_tensor(self._handle, self.path, f"{module}.V", dtype=torch.float64)
        m, n = entry.shape
        k = entry.rank
        if tuple(U.shape) != (m, k) or tuple(S.shape) != (k,) or tuple(V.shape) != (n, k):
            raise InputError(
                f"{self.path}: module {module} has U {list(U.shape)}, S {list(S.shape)}, V {list(V.shape)} "
                f"but its metadata says shape {[m, n]} and rank {k}"
            )
        return ModuleSubspace(U=U, S=S, V=V, energy=entry.energy, d_norm=entry.d_norm)

    def close(self) -> None:
        self._handle = None


def save_subspace_cache(
    path: str | Path,
    subspaces: Mapping[str, ModuleSubspace],
    *,
    shapes: Mapping[str, tuple[int, int]],
    fingerprints: Mapping[str, str] | None = None,
    sources: Mapping[str, str] | None = None,
    options: Mapping[str, Any] | None = None,
) -> Path:
    """Write the cache atomically (temp file beside ``path``, renamed at the end)."""
    from safetensors.torch import save_file

    out = Path(path)
    tensors: dict[str, Tensor] = {}
    modules_meta: dict[str, Any] = {}
    for name in sorted(subspaces, key=natural_key):
        sub = subspaces[name]
        tensors[f"{name}.U"] = sub.U.detach().to(device="cpu", dtype=torch.float32).contiguous()
        tensors[f"{name}.S"] = sub.S.detach().to(device="cpu", dtype=torch.float32).contiguous()
        tensors[f"{name}.V"] = sub.V.detach().to(device="cpu", dtype=torch.float32).contiguous()
        modules_meta[name] = {
            "shape": [int(d) for d in shapes[name]],
            "rank": int(sub.S.shape[0]),
            "energy": float(sub.energy),
            "d_norm": float(sub.d_norm),
            "fingerprint": (fingerprints or {}).get(name),
        }
    meta = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "sources": dict(sources or {}),
        "options": _jsonable(dict(options or {})),
        "modules": modules_meta,
    }
    # One metadata key only: safetensors keeps metadata in a hash map whose serialised
    # order varies between runs, so a second key would make the bytes non-deterministic.
    metadata = {METADATA_KEY: json.dumps(meta, sort_keys=True)}
    with atomic_output_file(out) as tmp:
        save_file(dict(sorted(tensors.items())), str(tmp), metadata=metadata)
    return out


def load_subspace_cache(path: str | Path) -> SubspaceCache:
    """Open a cache and check its metadata and tensor headers (no tensor data is read)."""
    cache_path = Path(path)
    if not cache_path.exists():
        raise InputError(f"{cache_path}: no such subspace cache file")
    if cache_path.is_dir():
        raise InputError(f"{cache_path}: expected a subspace cache .safetensors file, got a folder")
    handle = open_safetensors(cache_path)
    raw = (handle.metadata() or {}).get(METADATA_KEY)
    if raw is None:
        raise InputError(f"{cache_path}: not a csulora subspace cache (no '{METADATA_KEY}' metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InputError(f"{cache_path}: corrupt subspace cache metadata ({excerpt(exc)})") from None
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise InputError(f"{cache_path}: not a csulora subspace cache (format {excerpt(repr(found))})")
    if meta.get("version") != CACHE_VERSION:
        raise InputError(
            f"{cache_path}: subspace cache version {excerpt(repr(meta.get('version')))} is not supported "
            f"(expected {CACHE_VERSION}); rebuild it with `csulora subspace`"
        )
    if not isinstance(meta.get("modules", {}), dict):
        raise InputError(f"{cache_path}: corrupt subspace cache metadata ('modules' is not an object)")
    keys = set(handle.keys())
    entries: dict[str, ModuleEntry] = {}
    for name, info in sorted(meta.get("modules", {}).items(), key=lambda kv: natural_key(kv[0])):
        for part in ("U", "S", "V"):
            if f"{name}.{part}" not in keys:
                raise InputError(f"{cache_path}: tensor {excerpt(name)}.{part} is missing")
        try:
            entry = ModuleEntry(
                name=name,
                shape=(int(info["shape"][0]), int(info["shape"][1])),
                rank=int(info["rank"]),
                energy=float(info["energy"]),
                d_norm=float(info["d_norm"]),
                fingerprint=info.get("fingerprint"),
            )
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise InputError(f"{cache_path}: corrupt metadata for module {name} ({excerpt(repr(exc))})") from None
        if not (math.isfinite(entry.energy) and math.isfinite(entry.d_norm)):
            raise InputError(f"{cache_path}: module {name} has non-finite energy or ||D|| in its metadata")
        u_shape = tuple(handle.get_slice(f"{name}.U").get_shape())
        if u_shape != (entry.shape[0], entry.rank):
            raise InputError(
                f"{cache_path}: tensor {name}.U has shape {list(u_shape)} but the metadata says "
                f"{[entry.shape[0], entry.rank]}"
            )
        entries[name] = entry
    if not entries:
        raise InputError(f"{cache_path}: the subspace cache holds no modules")
    return SubspaceCache(path=cache_path, meta=meta, entries=entries, _handle=handle)


def check_fingerprint(cache: SubspaceCache, module: str, displacement: Tensor) -> None:
    """Refuse a cache built from a different base/aligned pair than the one given."""
    entry = cache.entry(module)
    if entry.fingerprint is None:
        return
    if displacement_fingerprint(displacement) != entry.fingerprint:
        raise InputError(
            f"{cache.path}: subspace of module {module} was built from a different base/aligned pair "
            "than the one given (rebuild the cache or drop --subspace)"
        )


def _jsonable(value: Any) -> Any:
    """Options as plain JSON (tuples -> lists, paths -> str) so metadata bytes are stable."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in sorted(value.items())}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)
