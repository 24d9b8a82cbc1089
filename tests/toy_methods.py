"""A toy correction method the tests register to show that the registry and tuning need no
knowledge of a method's name: one config class, one method class (docs/design.md §9)."""

from __future__ import annotations

import dataclasses

from csulora.methods.base import CorrectionMethod, MethodConfig, Tuning, require_number
from csulora.methods.common import finish_report
from csulora.types import REPORT_KEYS, LoraUpdate, ModuleInput, ModuleResult


@dataclasses.dataclass(frozen=True)
class StrengthConfig(MethodConfig):
    strength: float = dataclasses.field(default=0.0, metadata={"help": "s in [0, 1]: the update becomes (1 - s) dW"})

    def __post_init__(self) -> None:
        require_number("strength", self.strength, low=0.0, high=1.0)


class Dampen(CorrectionMethod[StrengthConfig]):
    """A toy method defined only in the tests: nothing in csulora.tuning knows its name."""

    name = "toy-dampen"
    pretty_name = "Toy dampening"
    config_cls = StrengthConfig
    inputs = frozenset()
    tuning = Tuning(knob="strength", grid=(0.0, 1.0), identity=0.0)

    def correct_module(self, module: ModuleInput, config: StrengthConfig) -> ModuleResult:
        update = module.update
        if config.strength:
            update = LoraUpdate(A=update.A, B=(1.0 - config.strength) * update.B, scale=update.scale)
        report = dict.fromkeys(REPORT_KEYS)
        report.update(dw_norm_before=None, rank_in=module.update.rank)
        return ModuleResult(module.name, update, finish_report(report, update))


class DenseHalve(CorrectionMethod[StrengthConfig]):
    """A toy method with only a dense form (as Safe Delta): ``X = (1 - s) dW``. On an adapter the
    pipeline hands it ``s B A`` and writes the corrected model (or a rank-r LoRA of it)."""

    name = "toy-dense"
    pretty_name = "Toy dense dampening"
    config_cls = StrengthConfig
    inputs = frozenset()
    tuning = Tuning(knob="strength", grid=(0.0, 0.5), identity=0.0)

    def correct_dense(self, module, config: StrengthConfig):
        from csulora.methods.common import finish_dense_report, method_report
        from csulora.linalg.geometry import DenseGeometry
        from csulora.types import DenseModuleResult

        report = method_report(DenseGeometry(module))
        update = None if config.strength == 0.0 else module.update.mul_(1.0 - config.strength)
        return DenseModuleResult(module.name, update, finish_dense_report(report, update))
