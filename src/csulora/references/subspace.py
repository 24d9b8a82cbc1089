"""``csulora subspace``: the safety subspace of a base/aligned pair, streamed once and cached (docs/design.md §3).

Reads one ``(W_base, W_aligned)`` pair at a time (memory maps of the shards), forms
``D = W_aligned - W_base`` in float32, computes its top-k SVD
(:func:`csulora.linalg.subspace.compute_subspace`), frees D and moves on; the cache file
(:mod:`csulora.io.subspace_cache`) then serves any number of audits and corrections.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from tqdm.auto import tqdm

from csulora.errors import InputError
from csulora.io.atomic import check_apart, check_output_file
from csulora.io.checkpoints import (
    CheckpointReader,
    check_same_architecture,
    decoder_linear_modules,
    read_displacement,
    target_list,
    weight_name,
)
from csulora.io.hub import resolve_model_dir
from csulora.io.subspace_cache import displacement_fingerprint, save_subspace_cache
from csulora.linalg.subspace import SubspaceConfig, check_subspace_config, compute_subspace
from csulora.types import ModuleSubspace

PathLike = str | os.PathLike


def build_subspace(
    base: PathLike,
    aligned: PathLike,
    out_file: PathLike,
    *,
    config: SubspaceConfig | None = None,
    targets: Sequence[str] | str | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Compute every target module's safety subspace from a base/aligned pair and cache it.

    ``targets`` (module names or their suffixes, e.g. ``["q_proj", "v_proj"]``) defaults to
    every linear layer inside the decoder blocks. Streams one weight pair at a time. An
    existing ``out_file`` is replaced only with ``force``. Returns the written cache's path.
    """
    config = check_subspace_config(config)
    out = Path(out_file)
    if out.is_dir():
        raise InputError(f"{out}: is a folder; give the cache file name, e.g. {out / 'subspace.safetensors'}")
    wanted = target_list(targets)
    base, aligned = resolve_model_dir(base, "BASE"), resolve_model_dir(aligned, "ALIGNED")
    # Apart first: "exists (use --force)" would be the wrong advice for an input.
    check_apart({"-o/--output": out}, {"BASE": base, "ALIGNED": aligned})
    check_output_file(out, force)
    with ExitStack() as stack:
        base_reader = stack.enter_context(CheckpointReader(base))
        aligned_reader = stack.enter_context(CheckpointReader(aligned))
        modules = decoder_linear_modules(base_reader, wanted)
        if not modules:
            what = f"matching --targets {','.join(wanted)}" if wanted else "inside decoder blocks"
            raise InputError(f"{base_reader.folder}: no linear layers {what}")
        check_same_architecture(base_reader, aligned_reader, modules)
        subspaces: dict[str, ModuleSubspace] = {}
        shapes: dict[str, tuple[int, int]] = {}
        fingerprints: dict[str, str] = {}
        for name in tqdm(modules, desc="subspace", unit="module", disable=None if progress else True):
            displacement = read_displacement(base_reader, aligned_reader, name)
            label = f"{aligned_reader.folder}: {weight_name(name)}"
            subspaces[name] = compute_subspace(displacement, config, name=label)
            shapes[name] = (int(displacement.shape[0]), int(displacement.shape[1]))
            fingerprints[name] = displacement_fingerprint(displacement)
            del displacement
        sources = {"base": str(Path(base).resolve()), "aligned": str(Path(aligned).resolve())}
        return save_subspace_cache(
            out, subspaces, shapes=shapes, fingerprints=fingerprints, sources=sources, options=dataclasses.asdict(config)
        )
