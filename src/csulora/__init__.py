"""csulora: audit and correct fine-tuned LLM updates so aligned models keep their refusals.

The public API (imported on first use, so ``import csulora`` stays light)::

    import csulora

    csulora.build_subspace("base/", "aligned/", "subspace.safetensors")      # once per model pair
    csulora.calibrate("aligned/", "calib.safetensors", task="train.jsonl")   # once per model and task
    report = csulora.audit_adapter("adapter/", subspace="subspace.safetensors")
    csulora.correct_adapter("adapter/", "fixed/", "calibrated", calibration="calib.safetensors", aligned="aligned/")
    result = csulora.tune_adapter("adapter/", "fixed/", aligned="aligned/", calibration="calib.safetensors",
                                  config=csulora.TuneConfig(), task="val.jsonl")

ADAPTER may be a PEFT LoRA folder or a fully fine-tuned checkpoint folder everywhere.
"""

from __future__ import annotations

import importlib
from typing import Any

from csulora.version import __version__

# public name -> the module that owns it (docs/design.md §9)
_PUBLIC = {
    "audit_adapter": "csulora.pipeline.api",
    "correct_adapter": "csulora.pipeline.api",
    "AuditReport": "csulora.pipeline.reports",
    "CorrectionReport": "csulora.pipeline.reports",
    "build_subspace": "csulora.references.subspace",
    "SubspaceConfig": "csulora.linalg.subspace",
    "calibrate": "csulora.references.calibration",
    "tune_adapter": "csulora.tuning.runner",
    "TuneConfig": "csulora.tuning.config",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'csulora' has no attribute {name!r}")
