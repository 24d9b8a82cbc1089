"""The calibrated closest safe update: shrink the update's action on harmful inputs (docs/design.md §5c).

Per module, with the aligned model's input statistics ``S_h`` (harmful prompts + its own
refusals) and ``S_t`` (task data), keep ``B`` and the scaling and solve for

    A' = A (S_t + mu I)(S_t + mu I + lam S_h)^-1

the argmin of ``||B (A' - A)||^2_{S_t + mu I} + lam ||B A'||^2_{S_h}``: same rank, an exact
PEFT LoRA (``csulora.linalg.gram`` does the math). ``restore = beta > 0`` then appends
``beta D_k`` exactly as RESTA/CSULoRA do (:func:`~csulora.methods.common.append_restoration`),
which also needs the safety subspace.

The guarantee of §5c (an update that adds nothing on the aligned model's own activations
leaves every layer's activations unchanged) needs every changed module corrected, so
``corrects_every_module`` is set and the API refuses ``--targets`` that leave one out.

Modules of one Gram group (q/k/v, gate/up) share one factorisation per run: ``correct``
keeps the last few groups' solves.

Dense form (a full fine-tune, docs/design.md §5d): ``dW' = dW (S_t + mu I)(S_t + mu I + lam S_h)^-1``
(the same objective with X free), solved by blocks of rows written back into dW's buffer;
the shares of the action kept are measured on the same blocks. :meth:`Calibrated.dense_run`
holds the run's factorisations, so a group's modules share one here too.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from csulora.linalg.geometry import DenseGeometry, ModuleGeometry
from csulora.errors import InputError, OptionError
from csulora.linalg.gram import CalibratedSolve, action_kept, rows_action_norm_sq
from csulora.linalg.lowrank import add_low_rank_
from csulora.methods.registry import register
from csulora.methods.base import (
    CALIBRATION,
    SUBSPACE,
    CorrectionMethod,
    MethodConfig,
    Tuning,
    flag_name,
    require_number,
)
from csulora.methods.common import (
    append_restoration,
    finish_dense_report,
    finish_report,
    method_report,
    restoration_energy_fraction,
)
from csulora.types import (
    DenseModuleInput,
    DenseModuleResult,
    LoraUpdate,
    ModuleCalibration,
    ModuleInput,
    ModuleResult,
)

# Solves kept per run: a decoder layer has at most four groups (q/k/v, o, gate/up, down),
# so any module order within a layer reuses its group's factorisation.
_SOLVES_IN_MEMORY = 4
# Elements of a dense update solved at a time (float64 temporaries of 8 MB: 256 rows of a
# 4096-wide module). Every block streams the n x n factors (T, the Cholesky factor, both Grams
# for the sampled rows) from memory once, so blocks of a few rows are memory-bound: 1024 rows
# of a 4096-wide update took 87 s of CPU in 32-row blocks and 14 s in 256-row blocks (one
# thread, busy machine); the memory benchmark measures the peak with these blocks.
_DENSE_BLOCK_ELEMENTS = 1 << 20
# The shares of a dense update's action kept are measured on at most this many evenly spaced
# rows: exact, each costs as much as the solve itself (4 m n^2 flops for the four norms
# against n x n Grams, 2 m n^2 for the solve); the rows give a ratio estimate.
_ACTION_SAMPLE_ROWS = 512


@dataclass(frozen=True)
class CalibratedConfig(MethodConfig):
    # tune's pick with its defaults on the SmolLM2 world's validation split (docs/results.md,
    # docs/design.md §5c); the feasibility pilot's 30 had been read off test-side numbers.
    strength: float = field(
        default=10.0,
        metadata={"help": "lam >= 0: how hard the update's action on harmful inputs is shrunk (0: off)"},
    )
    mu: float = field(
        default=0.01,
        metadata={"help": "mu > 0: ridge on the task metric, as a share of the mean task eigenvalue"},
    )
    restore: float = field(
        default=0.0,
        metadata={"help": "beta >= 0: add beta * D_k, the top-k alignment displacement (0: off)"},
    )

    def __post_init__(self) -> None:
        require_number("strength", self.strength, low=0.0)
        require_number("mu", self.mu)
        if not self.mu > 0.0:
            raise OptionError(f"{flag_name('mu')} must be > 0, got {self.mu!r}")
        require_number("restore", self.restore, low=0.0)
        for name in ("strength", "mu", "restore"):
            self._store_as(name, float)


@dataclass
class _Solves:
    """The last few (group, lam, mu) factorisations of one correction run."""

    # The statistics are held by a weak reference: a solve must not keep its group's statistics
    # alive once the file has let them go (a 7B group's are 268 MB, docs/design.md §5d).
    held: OrderedDict[tuple[str, float, float], tuple[weakref.ref[ModuleCalibration], CalibratedSolve]] = field(
        default_factory=OrderedDict
    )
    limit: int = _SOLVES_IN_MEMORY

    def get(self, calibration: ModuleCalibration, strength: float, mu: float) -> CalibratedSolve:
        key = (calibration.group, strength, mu)
        entry = self.held.get(key)
        # Reuse only for the very statistics it was built from (the file hands out one
        # object per group while it holds it), never for another object of the same name.
        if entry is not None and entry[0]() is calibration:
            self.held.move_to_end(key)
            return entry[1]
        while len(self.held) >= self.limit:  # before the new one is built: never limit + 1 at once
            self.held.popitem(last=False)
        solve = CalibratedSolve(calibration, strength, mu)
        self.held[key] = (weakref.ref(calibration), solve)
        return solve


@dataclass(frozen=True)
class DenseRun:
    """One dense correction run: the options and the factorisations its modules share."""

    config: CalibratedConfig
    solves: _Solves


def _solve_dense_in_place(dW: Any, solve: CalibratedSolve, calibration: ModuleCalibration) -> dict[str, float | None]:
    """Replace dW by ``dW (S_t + mu I)(S_t + mu I + lam S_h)^-1`` block by block; the shares of
    its action kept on harmful and on task inputs, ``||dW'||^2_S / ||dW||^2_S``, over every
    ``stride``-th row (all rows up to ``_ACTION_SAMPLE_ROWS``)."""
    before = {"harmful": 0.0, "task": 0.0}
    after = {"harmful": 0.0, "task": 0.0}
    step = max(1, _DENSE_BLOCK_ELEMENTS // max(1, dW.shape[1]))
    stride = -(-dW.shape[0] // _ACTION_SAMPLE_ROWS)  # ceil: at most _ACTION_SAMPLE_ROWS rows
    for start in range(0, dW.shape[0], step):
        block = dW[start : start + step]
        new = solve.apply(block)
        first = -start % stride  # the block's first row that is a multiple of stride
        for kind, moment in (("harmful", calibration.harmful), ("task", calibration.task)):
            before[kind] += rows_action_norm_sq(block[first::stride], moment)
            after[kind] += rows_action_norm_sq(new[first::stride], moment)
        block.copy_(new)
    return {f"{kind}_action_kept": (after[kind] / before[kind] if before[kind] > 0.0 else None) for kind in before}


class Calibrated(CorrectionMethod[CalibratedConfig]):
    name = "calibrated"
    # The shares of the update's action kept on harmful inputs (want ~0) and on task inputs (~1).
    report_columns = (
        ("harmful_action_kept", "kept harmful", ".3g"),
        ("task_action_kept", "kept task", ".3g"),
        ("restore_energy_added", "restore", ".3g"),
    )
    pretty_name = "Calibrated closest safe update"
    paper_url = None  # ours: docs/design.md §5c
    config_cls = CalibratedConfig
    inputs = frozenset({CALIBRATION})
    tuning = Tuning(knob="strength", grid=(0.0, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0), identity=0.0)
    corrects_every_module = True

    def needs(self, config: CalibratedConfig) -> frozenset[str]:
        return self.inputs | {SUBSPACE} if config.restore > 0.0 else self.inputs

    def is_identity(self, config: CalibratedConfig) -> bool:
        return config.strength == 0.0 and config.restore == 0.0

    def correct(self, modules: Iterable[ModuleInput], config: CalibratedConfig) -> Iterator[ModuleResult]:
        solves = _Solves()
        for module in modules:
            yield self._correct(module, config, solves)

    def correct_module(self, module: ModuleInput, config: CalibratedConfig) -> ModuleResult:
        return self._correct(module, config, _Solves())

    def _correct(self, module: ModuleInput, config: CalibratedConfig, solves: _Solves) -> ModuleResult:
        calibration = self._calibration_of(module)
        beta = float(config.restore)
        if beta > 0.0 and module.subspace is None:
            raise InputError(f"{module.name}: --restore needs the module's safety subspace")
        geometry = ModuleGeometry(module)
        report: dict[str, Any] = method_report(geometry)
        B, A = geometry.B, geometry.A
        if config.strength == 0.0 or geometry.dw_is_zero:
            A_new = A  # the identity (and dW == 0 stays as it is, docs/design.md §10)
        else:
            A_new = solves.get(calibration, config.strength, config.mu).apply(A)
        B_out, A_out = append_restoration(B, A_new, module, beta)
        if A_out is A and B_out is B:
            update = module.update  # nothing changed: keep the input bytes
        else:
            update = LoraUpdate(A=A_out, B=B_out, scale=module.update.scale)
        report.update(
            restore_energy_added=restoration_energy_fraction(geometry, beta),
            # Shares of the input update's action kept by the calibrated part (before any
            # restoration): on harmful inputs (want ~0) and on task inputs (want ~1).
            harmful_action_kept=action_kept(B, A, A_new, calibration.harmful),
            task_action_kept=action_kept(B, A, A_new, calibration.task),
            calibration_group=calibration.group,
            strength=config.strength,
            mu=config.mu,
        )
        return ModuleResult(name=module.name, update=update, report=finish_report(report, update))

    # --- dense form: full fine-tunes (docs/design.md §5d) ---------------------------------
    def dense_run(self, config: CalibratedConfig, measures: Any = None) -> DenseRun:
        # One factorisation at a time: a 7B group's is two 4096^2 float64 matrices (268 MB), and
        # the dense path's memory bound allows one module's statistics (docs/design.md §5d).
        return DenseRun(config=config, solves=_Solves(limit=1))

    def correct_dense(self, module: DenseModuleInput, config: CalibratedConfig | DenseRun) -> DenseModuleResult:
        """``dW (S_t + mu I)(S_t + mu I + lam S_h)^-1`` (+ ``beta D_k``), in dW's own buffer."""
        run = config if isinstance(config, DenseRun) else self.dense_run(config)
        options = run.config
        calibration = self._calibration_of(module)  # type: ignore[arg-type]
        beta = float(options.restore)
        if beta > 0.0 and module.subspace is None:
            raise InputError(f"{module.name}: --restore needs the module's safety subspace")
        geometry = DenseGeometry(module)
        report: dict[str, Any] = method_report(geometry)
        dW = module.update
        kept: dict[str, float | None] = {"harmful_action_kept": None, "task_action_kept": None}
        solved = options.strength != 0.0 and not geometry.dw_is_zero
        if solved:
            solve = run.solves.get(calibration, options.strength, options.mu)
            kept = _solve_dense_in_place(dW, solve, calibration)
        restored = beta > 0.0 and not geometry.subspace_is_empty
        if restored:
            add_low_rank_(dW, geometry.U * (beta * geometry.S), geometry.V.T)
        update = dW if (solved or restored) else None
        report.update(
            restore_energy_added=restoration_energy_fraction(geometry, beta),
            calibration_group=calibration.group,
            strength=options.strength,
            mu=options.mu,
            **kept,
        )
        return DenseModuleResult(name=module.name, update=update, report=finish_dense_report(report, update))

    @staticmethod
    def _calibration_of(module: ModuleInput) -> ModuleCalibration:
        calibration = module.calibration
        if calibration is None:
            raise InputError(f"{module.name}: the calibrated method needs the module's activation statistics")
        n = module.update.shape[1]
        if calibration.n != n:
            raise InputError(
                f"{module.name}: activation statistics (group {calibration.group}) are for inputs of size "
                f"{calibration.n} but the adapter's lora_A has {n} columns"
            )
        return calibration


register(Calibrated())
