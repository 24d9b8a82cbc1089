"""Parity: csulora's Safe LoRA against the published Safe LoRA code, run side by side.

    python -m benchmarks.safelora_parity --published DIR --base B --aligned A --adapter L \
        [--out benchmarks/results/safelora_parity.json]

DIR is a checkout of the published repository (github.com/IBM/SafeLoRA: ``model.py`` with
the ``SafeLoRA`` class, ``config.py`` with ``SafeLoRAConfig``). It is not vendored here and
not needed for anything else: the script loads its two files by path, runs them on a real
PEFT model, and compares, module by module, the LoRA ``B`` factors it projected with the
adapter ``csulora.pipeline.api.correct_adapter(method="safelora", projection="approx")`` writes
for the same settings, in threshold mode and in number mode.

What it records per setting: the number of modules each side projected, whether the two
sets are identical, and the largest absolute and relative difference of any ``lora_B``.
The published code works in place on a deep copy of the whole PEFT model and loads base
and aligned in full, so this script needs about 4x the model in memory; csulora streams.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

# (select, knob) settings compared: the thresholds of the SmolLM2 sweep and the published default
SETTINGS: tuple[dict, ...] = (
    {"select": "threshold", "threshold": 0.25},
    {"select": "threshold", "threshold": 0.3},
    {"select": "threshold", "threshold": 0.4},
    {"select": "number", "num_layers": 10},
    {"select": "number", "num_layers": 40},
)


def load_published(directory: Path):
    """The published ``SafeLoRA`` and ``SafeLoRAConfig`` classes, imported from their files."""
    classes = []
    for file, name in (("model.py", "SafeLoRA"), ("config.py", "SafeLoRAConfig")):
        path = directory / file
        if not path.is_file():
            raise SystemExit(f"{path}: not found; --published must be a checkout of the published Safe LoRA code")
        spec = importlib.util.spec_from_file_location(f"published_safelora_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if hasattr(module, "AutoModelForCausalLM"):
            module.AutoModelForCausalLM = _Transformers5Loader
        classes.append(getattr(module, name))
    return classes


class _Transformers5Loader:
    """The published code passes ``load_in_8bit=False``, a keyword transformers 5 removed;
    False was a no-op, so it is dropped. Models load in float32, as csulora reads them."""

    @staticmethod
    def from_pretrained(path, **kwargs):
        from transformers import AutoModelForCausalLM

        kwargs.pop("load_in_8bit", None)
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)


def published_lora_b(published, config_cls, base: Path, aligned: Path, adapter: Path, setting: dict) -> dict:
    """``{module: lora_B}`` after the published code projected the attacked PEFT model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(aligned), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, str(adapter))
    config = config_cls(
        base_model_path=str(base), aligned_model_path=str(aligned), devices="cpu",
        select_layers_type=setting["select"], threshold=setting.get("threshold", 0.5),
        num_proj_layers=setting.get("num_layers", 10),
    )
    with torch.no_grad():
        projected = published(peft_model, config).model
    return {
        name.replace(".lora_B.default.weight", ""): param.detach().clone()
        for name, param in projected.named_parameters()
        if name.endswith(".lora_B.default.weight")
    }


def csulora_lora_b(base: Path, aligned: Path, adapter: Path, setting: dict) -> tuple[dict, dict, float]:
    """``{module: lora_B}`` of csulora's corrected adapter, the originals, and csulora's seconds."""
    from csulora.pipeline.api import correct_adapter
    from csulora.io.adapters import read_adapter

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        correct_adapter(adapter, Path(tmp) / "out", "safelora", base=base, aligned=aligned, projection="approx",
                        progress=False, **setting)
        seconds = time.perf_counter() - start
        corrected = read_adapter(Path(tmp) / "out")
    original = read_adapter(adapter)
    return ({m: mod.B.float() for m, mod in corrected.modules.items()},
            {m: mod.B.float() for m, mod in original.modules.items()}, seconds)


def compare(ours: dict, theirs: dict, original: dict) -> dict:
    def key(name: str) -> str:  # PEFT's parameter names carry a "base_model.model." prefix
        return name.removeprefix("base_model.model.")

    ours = {key(k): v for k, v in ours.items()}
    theirs = {key(k): v for k, v in theirs.items()}
    original = {key(k): v for k, v in original.items()}
    if set(ours) != set(theirs):
        raise SystemExit(f"module sets differ: {sorted(set(ours) ^ set(theirs))[:5]}")
    ours_projected = {m for m in ours if not torch.equal(ours[m], original[m])}
    theirs_projected = {m for m in theirs if not torch.equal(theirs[m], original[m])}
    max_abs = max(float((ours[m] - theirs[m]).abs().max()) for m in ours)
    max_rel = max(float((ours[m] - theirs[m]).norm() / theirs[m].norm().clamp_min(1e-30)) for m in ours)
    return {
        "modules": len(ours),
        "projected_csulora": len(ours_projected),
        "projected_published": len(theirs_projected),
        "same_modules_projected": ours_projected == theirs_projected,
        "only_csulora": sorted(ours_projected - theirs_projected)[:10],
        "only_published": sorted(theirs_projected - ours_projected)[:10],
        "max_abs_diff_lora_B": max_abs,
        "max_rel_diff_lora_B": max_rel,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--published", type=Path, required=True, help="checkout of github.com/IBM/SafeLoRA")
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--aligned", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/safelora_parity.json"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    published, config_cls = load_published(args.published)
    results = []
    for setting in SETTINGS:
        start = time.perf_counter()
        theirs = published_lora_b(published, config_cls, args.base, args.aligned, args.adapter, setting)
        published_seconds = time.perf_counter() - start
        ours, original, ours_seconds = csulora_lora_b(args.base, args.aligned, args.adapter, setting)
        row = {"setting": setting, **compare(ours, theirs, original),
               "seconds_published": round(published_seconds, 1), "seconds_csulora": round(ours_seconds, 1)}
        results.append(row)
        print(json.dumps(row), flush=True)
    report = {
        "published": {"repository": "github.com/IBM/SafeLoRA", "files": ["model.py", "config.py"]},
        "base": str(args.base), "aligned": str(args.aligned), "adapter": str(args.adapter),
        "projection": "approx (P = D D^T / ||D||_F, the published one)",
        "results": results,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(r["same_modules_projected"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
