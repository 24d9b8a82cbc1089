"""The cases the correction benchmark times, each run in its own interpreter.

Run as ``python -m benchmarks.correction.cases '<json spec>'``; the last line of
stdout is ``BENCH_CORRECTION_RESULT {json}``. The parent (:mod:`benchmarks.correction.process`)
samples this process's private memory from outside.

Cases:
- ``idle``: imports only, the floor every other case stands on;
- ``read``: read every base and aligned target tensor once, one at a time (the I/O floor);
- ``dense_reference``: Safe LoRA the way the published code does it (both models' target
  weights resident in fp32, one m x m ``C = D D^T / ||D||`` kept per module, dense
  products for the cosine), written here so its cost is measured on the same footing;
- ``safelora``, ``build_subspace``, ``csulora``: csulora's public API;
- ``published_safelora``: the published Safe LoRA code itself, loaded by path;
- ``subspace_accuracy``: a subspace cache's captured energies against the exact SVD's;
- ``calibration_pass``: ``csulora calibrate``'s statistics pass against a plain forward.

The csulora CLI runs as a plain command beside these (:mod:`benchmarks.correction.cli`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.correction.memory import rss_anon_bytes
from benchmarks.correction.synth import target_weight_names

RESULT_MARKER = "BENCH_CORRECTION_RESULT "  # the child's one line of JSON for the parent
ROUND_DECIMALS = 5  # the published code rounds every cosine to 5 decimals before comparing


class Clock:
    """Elapsed time and private memory at named points of a case."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.checkpoints: list[dict[str, Any]] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def mark(self, phase: str, layer: int | None = None) -> None:
        self.checkpoints.append(
            {"phase": phase, "layer": layer, "t_s": round(self.elapsed(), 4), "rss_anon_bytes": rss_anon_bytes()}
        )


# --------------------------------------------------------------------------- helpers


def _weight_map(model_dir: Path) -> dict[str, Path]:
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    return {name: model_dir / shard for name, shard in index["weight_map"].items()}


def _target_names(model_dir: Path) -> list[str]:
    layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    return target_weight_names(layers)


def _layer_of(name: str) -> int:
    return int(name.split(".layers.")[1].split(".")[0])


def _adapter_key(weight_name: str) -> str:
    """``model.layers.0.self_attn.q_proj.weight`` -> PEFT's ``base_model.model.model.layers.0.self_attn.q_proj``."""
    return "base_model.model." + weight_name.removesuffix(".weight")


# --------------------------------------------------------------------------- cases


def case_idle(spec: dict[str, Any], clock: Clock) -> dict[str, Any]:
    return {}


PAGE_BYTES = 4096


def touch_every_page(tensor: torch.Tensor) -> float:
    """Read one element per memory page, so every byte of the tensor comes off the disk.

    safetensors' ``get_tensor`` may hand back a zero-copy view of the memory-mapped file;
    nothing is read from disk until a page is touched. Touching one element per page
    faults the whole tensor in at the cost of the I/O alone, the floor any correction
    that looks at every weight must pay.
    """
    flat = tensor.reshape(-1)
    stride = max(1, PAGE_BYTES // tensor.element_size())
    return float(flat[::stride].float().sum()) + float(flat[-1].float())


def case_read(spec: dict[str, Any], clock: Clock) -> dict[str, Any]:
    """Read each base and aligned target tensor once, one at a time, and drop it."""
    from safetensors import safe_open

    base, aligned = Path(spec["base"]), Path(spec["aligned"])
    names = _target_names(base)
    maps = {"base": _weight_map(base), "aligned": _weight_map(aligned)}
    nbytes = 0
    checksum = 0.0
    for name in names:
        for which in ("base", "aligned"):
            with safe_open(str(maps[which][name]), framework="pt") as handle:
                tensor = handle.get_tensor(name)
                nbytes += tensor.numel() * tensor.element_size()
                checksum += touch_every_page(tensor)
            del tensor
        if name.endswith("down_proj.weight"):
            clock.mark("read", _layer_of(name))
    return {"bytes_read": nbytes, "tensors_read": 2 * len(names)}


def _load_fp32(model_dir: Path, names: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    weight_map = _weight_map(model_dir)
    weights: dict[str, torch.Tensor] = {}
    for name in names:
        with safe_open(str(weight_map[name]), framework="pt") as handle:
            weights[name] = handle.get_tensor(name).float()
    return weights


def case_dense_reference(spec: dict[str, Any], clock: Clock) -> dict[str, Any]:
    """Safe LoRA as the published implementation computes it, in dense fp32 on CPU.

    1. both models' target weights loaded and kept in fp32;
    2. per module ``C = D @ D.T / ||D||`` (m x m), all kept;
    3. per module ``W = C @ B``, ``cos = cosine(vec(W @ A), vec(B @ A))`` rounded to 5
       decimals; number mode projects every module whose cos is <= the N-th smallest,
       threshold mode every module with cos <= threshold; the new adapter is saved.
    Loading only target weights (not embeddings or norms) is kinder to the reference
    than loading whole models, so its memory here is a lower bound.
    """
    from safetensors.torch import load_file, save_file

    base, aligned = Path(spec["base"]), Path(spec["aligned"])
    adapter, out = Path(spec["adapter"]), Path(spec["out"])
    names = _target_names(base)
    layers = sorted({_layer_of(n) for n in names})

    base_w: dict[str, torch.Tensor] = {}
    aligned_w: dict[str, torch.Tensor] = {}
    for layer in layers:
        layer_names = [n for n in names if _layer_of(n) == layer]
        base_w.update(_load_fp32(base, layer_names))
        aligned_w.update(_load_fp32(aligned, layer_names))
        clock.mark("load", layer)

    projections: dict[str, torch.Tensor] = {}
    for layer in layers:
        for name in (n for n in names if _layer_of(n) == layer):
            d = aligned_w[name] - base_w[name]
            projections[name] = torch.mm(d, d.t()) / torch.norm(d)
            del d
        clock.mark("projection_matrices", layer)

    factors = load_file(str(adapter / "adapter_model.safetensors"))
    cosines: dict[str, float] = {}
    projected_b: dict[str, torch.Tensor] = {}
    for name in names:
        key = _adapter_key(name)
        a = factors[f"{key}.lora_A.weight"].float()
        b = factors[f"{key}.lora_B.weight"].float()
        w = torch.mm(projections[name], b)
        projected = torch.mm(w, a)
        original = torch.mm(b, a)
        cos = torch.nn.functional.cosine_similarity(projected.reshape(1, -1), original.reshape(1, -1)).item()
        cosines[name] = round(cos, ROUND_DECIMALS)
        projected_b[name] = w
        del projected, original
        if name.endswith("down_proj.weight"):
            clock.mark("project", _layer_of(name))

    threshold = _selection_threshold(list(cosines.values()), spec.get("mode", "number"), spec)
    chosen = [n for n, c in cosines.items() if c <= threshold]
    for name in chosen:
        factors[f"{_adapter_key(name)}.lora_B.weight"] = projected_b[name].to(
            factors[f"{_adapter_key(name)}.lora_B.weight"].dtype
        )
    out.mkdir(parents=True, exist_ok=True)
    save_file(factors, str(out / "adapter_model.safetensors"), {"format": "pt"})
    (out / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    clock.mark("saved")
    return {
        "modules": len(names),
        "projected": sorted(chosen),
        "threshold": threshold,
        "cosines": cosines,
        "kept_matrix_bytes": sum(p.numel() * p.element_size() for p in projections.values()),
        "kept_weight_bytes": sum(w.numel() * w.element_size() for w in (*base_w.values(), *aligned_w.values())),
    }


def _selection_threshold(cosines: list[float], mode: str, spec: dict[str, Any]) -> float:
    if mode == "threshold":
        return float(spec.get("threshold", 0.5))
    n = int(spec.get("num_proj_layers", 10))
    ordered = sorted(cosines)
    return ordered[min(n, len(ordered)) - 1]


def _api_options(spec: dict[str, Any]) -> dict[str, Any]:
    return dict(spec.get("options") or {})


def case_safelora(spec: dict[str, Any], clock: Clock) -> dict[str, Any]:
    import csulora as api

    api.correct_adapter(
        spec["adapter"],
        spec["out"],
        "safelora",
        base=spec["base"],
        aligned=spec["aligned"],
        force=True,
        progress=False,
        **_api_options(spec),
    )
    return {}


def case_build_subspace(spec: dict[str, Any], clock: Clock) -> dict[str, Any]:
    import csulora as api

    # force: the benchmark owns this file; a rerun on a kept workdir (--keep) writes it again.
    path = api.build_subspace(spec["base"], spec["aligned"], spec["subspace"], force=True, progress=False)
    return {"subspace_bytes": Path(path).stat().st_size}


def case_csulora(spec: dict[str, Any], clock: Clock) -> dict[str, Any]:
    import csulora as api

    api.correct_adapter(
        spec["adapter"], spec["out"], "csulora", subspace=spec["subspace"], force=True, progress=False,
        **_api_options(spec),
    )
    return {}


def case_published_safelora(spec: dict[str, Any], clock: Clock) -> dict[str, Any]:
    """The published Safe LoRA code (github.com/IBM/SafeLoRA) in number mode, by path.

    ``spec["published"]`` is a checkout of it: never vendored, never downloaded here. The
    two patches it needs under transformers 5 are :mod:`benchmarks.safelora_parity`'s
    (``load_in_8bit=False`` dropped; checkpoints loaded in float32, since its bf16 path
    crashes). Its projected ``lora_B`` factors are saved for the comparison with ours.
    """
    from safetensors.torch import save_file

    from benchmarks.safelora_parity import load_published, published_lora_b

    published, config_cls = load_published(Path(spec["published"]))
    setting = {"select": "number", "num_layers": int(spec.get("num_proj_layers", 10))}
    lora_b = published_lora_b(
        published, config_cls, Path(spec["base"]), Path(spec["aligned"]), Path(spec["adapter"]), setting
    )
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    save_file({name: b.contiguous() for name, b in lora_b.items()}, str(out / "lora_B.safetensors"))
    return {"modules": len(lora_b), "setting": setting}


def exact_squared_singular_values(D: torch.Tensor) -> torch.Tensor:
    """All squared singular values of D, descending: eigenvalues of its smaller float64 Gram.

    An exact method (LAPACK's symmetric eigensolver) accurate to float64 rounding of the
    largest, which is what an energy fraction needs; cheaper than ``svdvals`` at 7B shapes.
    """
    d = D.to(torch.float64)
    gram = d @ d.T if d.shape[0] <= d.shape[1] else d.T @ d
    del d
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0.0)


def case_subspace_accuracy(spec: dict[str, Any], clock: Clock) -> dict[str, Any]:
    """Each module's captured energy in a subspace cache against the exact SVD's, same k.

    ``error = exact - cached`` (the randomized estimate is a lower bound); ``rank_exact`` is
    the k the energy rule would keep from the exact singular values.
    """
    from csulora.io.checkpoints import CheckpointReader, read_displacement
    from csulora.io.subspace_cache import load_subspace_cache
    from csulora.linalg.subspace import SubspaceConfig, _choose_rank

    cache = load_subspace_cache(spec["subspace"])
    options = {k: v for k, v in cache.options.items() if k in {f for f in SubspaceConfig.__dataclass_fields__}}
    config = SubspaceConfig(**options)
    modules = []
    with CheckpointReader(spec["base"]) as base, CheckpointReader(spec["aligned"]) as aligned:
        for name in cache.modules():
            entry = cache.entry(name)
            squared = exact_squared_singular_values(read_displacement(base, aligned, name))
            total = float(squared.sum())
            exact = float(squared[: entry.rank].sum()) / total
            modules.append({
                "module": name,
                "rank": entry.rank,
                "rank_exact": _choose_rank(squared.sqrt(), total, config),
                "energy": entry.energy,
                "energy_exact": exact,
                "error": exact - entry.energy,
            })
            clock.mark("module")
    return {
        "modules": modules,
        "max_abs_error": max(abs(m["error"]) for m in modules),
        "same_rank_everywhere": all(m["rank"] == m["rank_exact"] for m in modules),
    }


def case_calibration_pass(spec: dict[str, Any], clock: Clock) -> dict[str, Any]:
    """``csulora calibrate``'s statistics pass against a plain forward over the same tokens.

    The model is the synthetic aligned checkpoint itself (7B layer shapes, random weights),
    loaded in float32 as ``calibrate`` does on a CPU; the tokens are random ids (the cost
    does not depend on them), half standing for the harmful sequences and half for the
    task's. The plain forward is :func:`benchmarks.bench_calibration.plain_forward` (whole
    model, LM head included, no hooks); the statistics pass is
    :func:`benchmarks.bench_calibration.statistics_pass`: the sums of every Gram group, harmful then
    task, in the same batches, then each group's full symmetric sums as the build reads them.
    CPU seconds of this process (all threads) for each.
    """
    from transformers import AutoModelForCausalLM

    from benchmarks.bench_calibration import plain_forward, statistics_pass
    from csulora.references.calibration.groups import linear_modules, shared_input_groups
    from csulora.references.calibration.statistics import product_dtype_for
    from csulora.io.checkpoints import layer_index, natural_key

    model = AutoModelForCausalLM.from_pretrained(spec["aligned"], dtype=torch.float32).eval()
    clock.mark("loaded")
    generator = torch.Generator().manual_seed(0)
    sequences, length = int(spec.get("sequences", 8)), int(spec.get("tokens_per_sequence", 64))
    examples = [
        {"input_ids": torch.randint(1, model.config.vocab_size, (length,), generator=generator).tolist()}
        for _ in range(sequences)
    ]
    harmful, task = examples[: sequences // 2], examples[sequences // 2 :]
    names = sorted(
        (n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and layer_index(n) is not None),
        key=natural_key,
    )
    linears = linear_modules(model, names, spec["aligned"])
    groups = shared_input_groups(model, linears, examples[0]["input_ids"][:16])
    batches = {"pad_id": 0, "batch_size": int(spec.get("batch_size", 4))}
    product_dtype = product_dtype_for(torch.device("cpu"), torch.float32)

    start = time.process_time()
    plain_forward(model, examples, decoder_only=False, **batches)
    forward_cpu = time.process_time() - start
    clock.mark("plain_forward")
    start = time.process_time()
    statistics_pass(model, harmful, task, groups, linears, product_dtype=product_dtype, progress=False, **batches)
    statistics_cpu = time.process_time() - start
    clock.mark("statistics")
    return {
        "tokens": sequences * length,
        "sequences": sequences,
        "batch_size": batches["batch_size"],
        "groups": len(groups),
        "gram_sizes": sorted({g.n for g in groups}),
        "plain_forward_cpu_s": round(forward_cpu, 3),
        "statistics_cpu_s": round(statistics_cpu, 3),
        "statistics_over_forward": round(statistics_cpu / forward_cpu, 3),
    }


CASES: dict[str, Callable[[dict[str, Any], Clock], dict[str, Any]]] = {
    "idle": case_idle,
    "read": case_read,
    "dense_reference": case_dense_reference,
    "safelora": case_safelora,
    "build_subspace": case_build_subspace,
    "csulora": case_csulora,
    "published_safelora": case_published_safelora,
    "subspace_accuracy": case_subspace_accuracy,
    "calibration_pass": case_calibration_pass,
}
# Cases that need csulora's API; imported before the clock starts so the import cost
# and memory land in the floor, not in the measured work.
API_CASES = {"safelora", "build_subspace", "csulora", "subspace_accuracy"}


def run(spec: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(int(spec.get("threads", 2)))
    if spec["case"] in API_CASES or spec.get("import_api"):
        import csulora.pipeline.api  # noqa: F401
    floor = rss_anon_bytes()
    clock = Clock()
    cpu_start = time.process_time()
    result = CASES[spec["case"]](spec, clock)
    wall = clock.elapsed()
    # CPU seconds of all threads: far less sensitive than wall time to other processes
    # sharing the cores (but blind to time spent waiting on the disk).
    cpu = time.process_time() - cpu_start
    return {
        "wall_s": round(wall, 4),
        "cpu_s": round(cpu, 4),
        "rss_anon_after_imports_bytes": floor,
        "checkpoints": clock.checkpoints,
        **result,
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    spec = json.loads(args[0])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run(spec)
    print(RESULT_MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
