"""The subspace stage and corrected adapters (csulora.pipeline.api), cached by their options."""

from __future__ import annotations

import time
from typing import Any

from benchmarks.smol.evaluation import Variant
from benchmarks.smol.pipeline import LORA_ROWS, Context, stage


SUBSPACE_FILE = ("subspace", "subspace.safetensors")


def subspace_config(ctx: Context):
    from csulora.linalg.subspace import SubspaceConfig

    # tune's default (what `csulora tune --base` builds): energy 0.9, capped at 64 directions.
    return SubspaceConfig(energy=ctx.recipe.subspace_energy, max_rank=ctx.recipe.subspace_max_rank)


@stage("subspace", "safety subspace of D = aligned - base, and the audit of the attacked adapter", needs=("attacked",),
       for_rows=LORA_ROWS)
def stage_subspace(ctx: Context) -> dict:
    from csulora.references.subspace import build_subspace
    from csulora.pipeline.api import audit_adapter
    from csulora.io.adapters import read_adapter

    targets = read_adapter(ctx.path("adapters", "attacked")).module_names()
    start = time.perf_counter()
    build_subspace(
        ctx.path("base"), ctx.path("aligned"), ctx.path(*SUBSPACE_FILE),
        config=subspace_config(ctx), targets=list(targets), progress=False,
    )
    build_seconds = time.perf_counter() - start
    summaries = {}
    for name in ("attacked",):
        report = audit_adapter(
            ctx.path("adapters", name), subspace=ctx.path(*SUBSPACE_FILE),
            base=ctx.path("base"), aligned=ctx.path("aligned"), progress=False,
        )
        report.to_json(ctx.path("subspace", f"audit_{name}.json"))
        summaries[name] = report.summary
    return {"build_seconds": round(build_seconds, 1), "audit_summaries": summaries}


def format_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def correction_key(adapter: str, method: str, options: dict) -> str:
    return f"{adapter}__{method}_" + "_".join(f"{k}={format_value(v)}" for k, v in sorted(options.items()))


CALIBRATION_FILE = ("calibration", "calibration.safetensors")


def correction_sources(ctx: Context, method: str, options: dict) -> dict[str, Any]:
    """What the method needs with these options, as correct_adapter's keyword arguments,
    read off the method itself: the exact D (the pair: Safe LoRA's published projection)
    and the calibration statistics (the calibrated method). The subspace cache is always
    given: methods that do not need it still report the audit numbers (rho, cosines)."""
    from csulora.methods.registry import get_method, make_config

    impl = get_method(method)
    config = make_config(impl, options)
    sources: dict[str, Any] = {"subspace": ctx.path(*SUBSPACE_FILE)}
    if impl.needs_displacement(config):
        sources.update(base=ctx.path("base"), aligned=ctx.path("aligned"))
    if impl.needs_calibration(config):
        sources["calibration"] = ctx.path(*CALIBRATION_FILE)
    return sources


def corrected_variant(ctx: Context, adapter: str, method: str, options: dict) -> Variant:
    """Correct ``adapters/<adapter>`` with csulora.pipeline.api.correct_adapter (cached by options)."""
    from csulora.pipeline.api import correct_adapter

    key = correction_key(adapter, method, options)
    out = ctx.path("adapters", key)
    if not (out / "adapter_model.safetensors").exists():
        sources = correction_sources(ctx, method, options)
        start = time.perf_counter()
        correct_adapter(ctx.path("adapters", adapter), out, method, force=True, progress=False, **sources, **options)
        ctx.log(f"[smol]   corrected {key} in {time.perf_counter() - start:.1f} s")
    return Variant(key, "aligned", f"adapters/{key}")
