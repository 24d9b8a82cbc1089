"""Uniform scaling, ``X = c * dW`` (docs/design.md §5b): the null baseline every method must beat.

Scales ``lora_B`` by c and keeps rank and scaling. It needs no subspace; when one is given
anyway the report still carries the audit numbers (rho, cosines) of the input update.
Dense form (a full fine-tune, docs/design.md §5d): ``W_aligned + c dW``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from csulora.linalg.geometry import DenseGeometry, ModuleGeometry
from csulora.errors import OptionError
from csulora.methods.registry import register
from csulora.methods.base import (
    CorrectionMethod,
    MethodConfig,
    Tuning,
    require_number,
)
from csulora.methods.common import (
    finish_dense_report,
    finish_report,
    method_report,
)
from csulora.types import DenseModuleInput, DenseModuleResult, LoraUpdate, ModuleInput, ModuleResult


@dataclass(frozen=True)
class ScaleConfig(MethodConfig):
    # No default on purpose: a silent factor of 1 would write the adapter unchanged.
    factor: float | None = field(
        default=None, metadata={"help": "c in [0, 1]: the corrected update is c * dW (required)"}
    )

    def __post_init__(self) -> None:
        if self.factor is None:
            raise OptionError("--method scale needs --factor C (0 <= C <= 1)")
        require_number("factor", self.factor, low=0.0, high=1.0)
        self._store_as("factor", float)


class Scale(CorrectionMethod[ScaleConfig]):
    name = "scale"
    report_columns = (("factor", "c", ".3g"),)
    pretty_name = "Uniform scaling"
    baseline = True  # docs/design.md §5b
    paper_url = None
    config_cls = ScaleConfig
    inputs = frozenset()
    # factor 1 is the adapter itself: weaker settings are the larger factors.
    tuning = Tuning(
        knob="factor",
        grid=(1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3),
        weaker_when_smaller=False,
        identity=1.0,
    )

    def correct_module(self, module: ModuleInput, config: ScaleConfig) -> ModuleResult:
        geometry = ModuleGeometry(module)
        report: dict[str, Any] = method_report(geometry)
        factor = float(config.factor)  # type: ignore[arg-type]
        report["factor"] = factor
        if factor == 1.0:
            update = module.update
        else:
            update = LoraUpdate(A=geometry.A, B=factor * geometry.B, scale=module.update.scale)
        return ModuleResult(name=module.name, update=update, report=finish_report(report, update))

    def correct_dense(self, module: DenseModuleInput, config: ScaleConfig) -> DenseModuleResult:
        """``X = c dW``, scaled in dW's own buffer; c = 1 leaves the fine-tuned weight as is."""
        report = method_report(DenseGeometry(module))
        factor = float(config.factor)  # type: ignore[arg-type]
        report["factor"] = factor
        update = None if factor == 1.0 else module.update.mul_(factor)
        return DenseModuleResult(name=module.name, update=update, report=finish_dense_report(report, update))


register(Scale())
