"""One correction (or audit), opened: the update, its references, the targets and the method.

:func:`open_correction` validates every option and input before any weight is read, opens
the update and its references, and returns a :class:`Correction` that streams one module at
a time (:meth:`Correction.inputs`: one weight pair and one D in memory) and runs the method on
the stream in the update's own form (:meth:`Correction.results`):

- factored (an adapter): ``method.correct(stream)`` — a method with a global decision (Safe
  LoRA's number mode) sees the whole stream;
- dense (a full checkpoint): a first stream when the method needs a global decision
  (``needs_dense_first_pass``), then ``method.correct_dense`` module by module.

The writers (:mod:`csulora.pipeline.outputs`), the audit and tune's in-memory states all
read through this one object.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from csulora.errors import InputError, OptionError
from csulora.io.checkpoint_writer import TORCH_DTYPES, read_checkpoint_layout
from csulora.io.checkpoints import target_list, weight_name
from csulora.io.hub import resolve_model_dir
from csulora.io.input_kind import ADAPTER, is_local_checkpoint
from csulora.linalg.lowrank import finite_by_blocks, rows_per_block
from csulora.linalg.subspace import SubspaceConfig, check_subspace_config, compute_subspace
from csulora.methods.base import ALIGNED_WEIGHT, SUBSPACE, CorrectionMethod, MethodConfig
from csulora.methods.registry import get_method, make_config
from csulora.pipeline.options import CHECKPOINT, SourcePaths, check_sources
from csulora.pipeline.references import References, open_references
from csulora.pipeline.updates import DENSE, AdapterUpdate, CheckpointUpdate, Update, open_update
from csulora.types import DenseModuleInput, DenseModuleResult, LoraUpdate, ModuleInput, ModuleResult

Result = ModuleResult | DenseModuleResult


@dataclass
class Correction:
    """An opened audit (``method is None``) or correction of one update."""

    update: Update
    refs: References
    modules: list[str]  # the targets, in report order
    method: CorrectionMethod | None = None
    options: MethodConfig | None = None  # the method's validated config
    run: Any = None  # what the dense form receives: the options, or a first pass's plan
    subspace_config: SubspaceConfig = field(default_factory=SubspaceConfig)
    need_subspace: bool = True
    need_aligned_weight: bool = False
    reset_others: bool = False
    lora_rank: int | None = None  # a dense correction of an adapter written back as a rank-r LoRA
    results: dict[str, Result] = field(default_factory=dict)  # reports of the modules corrected so far

    @property
    def targets(self) -> set[str]:
        """The targets' weight names (``<module>.weight``)."""
        return {weight_name(m) for m in self.modules}

    # --- the stream ------------------------------------------------------------------------
    def module_input(self, module: str) -> ModuleInput | DenseModuleInput:
        """One module's update in its form, with D, the subspace and the statistics it may use."""
        D = self.refs.displacement(module)
        subspace = None
        if self.need_subspace or self.refs.cache is not None:
            subspace = self.refs.subspace(module, D, self.subspace_config)
        common = {"name": module, "update": self.update.read(module), "subspace": subspace, "displacement": D,
                  "calibration": self.refs.statistics(module), "update_statistics": self.refs.update_statistics_of(module)}  # fmt: skip
        if self.update.form != DENSE:
            return ModuleInput(**common)
        aligned = None
        if self.need_aligned_weight:  # a view of the memory map (Antidote prunes W_ft = W_aligned + dW)
            aligned = self.update.aligned.get(weight_name(module), dtype=None, finite_check=False)  # type: ignore[attr-defined]
        return DenseModuleInput(**common, aligned_weight=aligned)

    def inputs(self, order: Sequence[str], *, progress: bool, desc: str) -> Iterator[ModuleInput | DenseModuleInput]:
        """Stream ``order``'s modules: one weight pair and one D in memory at a time."""
        for name in tqdm(order, desc=desc, unit="module", disable=None if progress else True):
            module = self.module_input(name)
            yield module
            # Drop D before the next pair is read: the consumer (e.g. a list in Safe LoRA's
            # number mode) may still hold this input.
            module.displacement = None
            del module

    def corrected(self, order: Sequence[str] | None = None, *, progress: bool = False) -> Iterator[Result]:
        """Run the method on the stream, in ``order`` (default: the update's stream order)."""
        assert self.method is not None and self.options is not None
        order = self.update.stream_order(self.modules) if order is None else order
        stream = self.inputs(order, progress=progress, desc=f"correct ({self.method.name})")
        if self.update.form == DENSE:
            results: Iterator[Result] = (self.method.correct_dense(m, self.run) for m in stream)  # type: ignore[arg-type]
        else:
            results = self.method.correct(stream, self.options)  # type: ignore[arg-type]
        for result in results:
            # Keep only the report: the update itself goes to the writer and is let go.
            self.results[result.name] = dataclasses.replace(result, update=None) if self.update.form == DENSE else result
            yield result

    def ordered_results(self) -> list[Result]:
        missing = [name for name in self.modules if name not in self.results]
        if missing:
            raise InputError(f"method {self.method.name if self.method else '?'} returned no result for module {missing[0]}")
        return [self.results[name] for name in self.modules]

    # --- a dense result as a weight --------------------------------------------------------
    def output_weight(self, module: str, X: Tensor) -> Tensor:
        """``W_aligned + X`` added in X's own buffer by blocks of rows, cast to the fine-tuned
        tensor's dtype; NaN/Inf refused (W_aligned is not checked on its own: a NaN in it reaches
        the result, which is checked block by block)."""
        assert isinstance(self.update, CheckpointUpdate)
        name = weight_name(module)
        dtype = TORCH_DTYPES[self.update.finetuned.dtype_name(name)]
        aligned = self.update.aligned.get(name, dtype=None, finite_check=False)  # a view of the memory map
        step = rows_per_block(X.shape[1])
        for start in range(0, X.shape[0], step):
            X[start : start + step] += aligned[start : start + step].to(X.dtype)
        out = X if X.dtype == dtype else X.to(dtype)
        if not finite_by_blocks(out):
            raise InputError(
                f"{self.update.finetuned.files[name]}: corrected tensor {name} is not finite in {dtype} "
                "(NaN/Inf after the correction); nothing written"
            )
        return out

    def weights(self) -> Iterator[tuple[str, Tensor]]:
        """Every tensor of a corrected checkpoint that differs from the fine-tuned one, as
        ``(name, tensor)``: corrected targets (unchanged ones skipped) and, with ``reset_others``,
        the aligned model's other tensors. One tensor alive at a time (tune's in-memory states)."""
        assert isinstance(self.update, CheckpointUpdate)
        for result in self.corrected():
            X = result.update if result.update is not None else self.update.unchanged(result.name)
            if X is not None:
                yield weight_name(result.name), self.output_weight(result.name, X)  # type: ignore[arg-type]
            del result, X
        if self.reset_others:
            for name in self.update.untargeted_names(self.modules):
                yield name, self.update.aligned.get(name, dtype=None)

    # --- the method's first stream ---------------------------------------------------------
    def prepare_run(self, progress: bool) -> None:
        """What the dense form receives for every module: the options, or the plan of a first
        stream for a method with a global decision (Safe LoRA's number mode)."""
        assert self.method is not None
        if self.update.form != DENSE:
            self.run = self.options
            return
        if not self.method.needs_dense_first_pass(self.options):
            self.run = self.method.dense_run(self.options)
            return
        measures = {
            module.name: self.method.dense_first_pass(module, self.options)  # type: ignore[arg-type]
            for module in self.inputs(self.modules, progress=progress, desc=f"{self.method.name}: first pass")
        }
        self.run = self.method.dense_run(self.options, measures)


def resolve_inputs(update: Any, base: Any, aligned: Any) -> tuple[Path | None, Path | None, Path | None]:
    """Folders for ADAPTER/BASE/ALIGNED: a hub id is fetched (or found in the hub cache), io/hub.py."""
    return (
        None if update is None else resolve_model_dir(update, "ADAPTER"),
        None if base is None else resolve_model_dir(base, "BASE"),
        None if aligned is None else resolve_model_dir(aligned, "ALIGNED"),
    )


def open_correction(
    stack: ExitStack,
    update_path: Path,
    method: str | None,
    *,
    paths: SourcePaths,
    subspace_config: SubspaceConfig | None = None,
    targets: Sequence[str] | str | None = None,
    reset_others: bool = False,
    method_options: Mapping[str, Any] | None = None,
    progress: bool = True,
    lora_rank: int | None = None,
) -> Correction:
    """Validate every option and input (before any tensor is read), open the update and its
    references, and run the method's first stream if it needs one. ``method=None`` opens an audit.
    ``lora_rank``: a method with only a dense form corrects an adapter as ``s B A``; its result is
    written as the best rank-r LoRA instead of the corrected model.

    ``update_path`` and the paths are local folders (hub ids resolved by the caller). The
    readers close with ``stack``.
    """
    # A path that does not exist is taken for an adapter until its reader says what is wrong:
    # the options are checked first (nothing is read for them).
    kind = CHECKPOINT if is_local_checkpoint(update_path) else ADAPTER
    impl, options = _method_and_options(kind, paths, method, method_options)
    sub_config = check_subspace_config(subspace_config, cache=paths.subspace)
    wanted = target_list(targets)
    if reset_others and kind != CHECKPOINT:
        raise OptionError("--reset-others applies to full checkpoints only (an adapter changes nothing else)")
    dense_adapter = kind == ADAPTER and impl is not None and not impl.has_factored_form
    check_lora_rank(lora_rank, dense_adapter)
    if kind == CHECKPOINT and paths.base is not None:
        read_checkpoint_layout(paths.base)  # missing/truncated shards, pickles: refused before anything
    refs = open_references(stack, paths, calibration_groups=1 if kind == CHECKPOINT else None)
    update = open_update(stack, update_path, kind, refs.aligned, dense=dense_adapter)
    modules = update.select(wanted)
    if impl is not None and impl.corrects_every_module:
        _check_corrects_every_module(impl, update, modules)
    update.check(modules)
    refs.check_modules({m: update.shape(m) for m in modules}, update.where)
    aligned_model = _model_of(update, refs)
    refs.check_calibration_model(aligned_model)
    refs.check_update_statistics_source(update.path, aligned_model)
    correction = Correction(
        update=update, refs=refs, modules=modules, method=impl, options=options, subspace_config=sub_config,
        need_subspace=_needs_subspace(impl, options, update, refs), reset_others=reset_others, lora_rank=lora_rank,
        need_aligned_weight=_needs(ALIGNED_WEIGHT, impl, options, update, refs),
    )  # fmt: skip
    if impl is not None:
        correction.prepare_run(progress)
    return correction


def check_lora_rank(lora_rank: int | None, dense_adapter: bool) -> None:
    if lora_rank is None:
        return
    if not dense_adapter:
        raise OptionError("--lora-rank applies to an adapter corrected by a method with only a dense form (e.g. safedelta)")
    if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1:
        raise OptionError(f"--lora-rank must be an integer >= 1, got {lora_rank!r}")


def refactored(result: DenseModuleResult, module: Any, rank: int) -> ModuleResult:
    """A dense correction of an adapter's module as its best rank-r LoRA (truncated SVD, §3's
    algorithm), under the adapter's own scaling; the report says how much energy was dropped.
    ``module``: the adapter's :class:`~csulora.io.adapters.AdapterModule`."""
    report = dict(result.report)
    if result.update is None:  # the method left the module as it was: the adapter's own factors
        report.update(lora_rank=module.rank, refactor_energy_lost=0.0, rank_in=module.rank, rank_out=module.rank)
        return ModuleResult(name=result.name, update=module.update(), report=report)
    found = compute_subspace(result.update, SubspaceConfig(rank=rank), name=result.name)
    root = found.S.to(torch.float64).sqrt()
    B = (found.U.to(torch.float64) * root) / module.scale
    A = (found.V.to(torch.float64) * root).T
    report.update(lora_rank=rank, refactor_energy_lost=1.0 - float(found.energy), rank_in=module.rank,
                  rank_out=int(found.rank))  # fmt: skip
    return ModuleResult(name=result.name, update=LoraUpdate(A=A, B=B, scale=module.scale), report=report)


def _method_and_options(
    kind: str, paths: SourcePaths, method: str | None, method_options: Mapping[str, Any] | None
) -> tuple[CorrectionMethod | None, MethodConfig | None]:
    if method is None:
        check_sources(kind, paths)
        return None, None
    impl = get_method(method)
    options = make_config(impl, dict(method_options or {}))
    check_sources(kind, paths, (impl, options))
    return impl, options


def _needs_subspace(impl: CorrectionMethod | None, options: Any, update: Update, refs: References) -> bool:
    if impl is None:
        return True  # the audit reports against the subspace
    return _needs(SUBSPACE, impl, options, update, refs)


def _needs(kind: str, impl: CorrectionMethod | None, options: Any, update: Update, refs: References) -> bool:
    """Whether the method reads ``kind`` for this update's form."""
    if impl is None:
        return False
    if update.form == DENSE:
        return kind in impl.dense_inputs(options, has_displacement=refs.has_displacement)
    return kind in impl.needs(options)


def _check_corrects_every_module(impl: CorrectionMethod, update: Update, modules: Sequence[str]) -> None:
    """A method whose guarantee needs every changed module corrected refuses a --targets subset (§5c)."""
    chosen = set(modules)
    left_out = [name for name in update.modules() if name not in chosen]
    if left_out:
        what = "adapted module" if isinstance(update, AdapterUpdate) else "linear layer"
        more = f" and {len(left_out) - 1} more" if len(left_out) > 1 else ""
        raise OptionError(
            f"--method {impl.name} must correct every {what} (docs/design.md §5c): --targets leaves "
            f"{left_out[0]}{more} of {update.path} uncorrected; drop --targets"
        )


def _model_of(update: Update, refs: References) -> Path | None:
    """The model a statistics file must come from: ALIGNED, else the adapter's recorded base
    model when it is a local folder or a hub id already in the hub cache (never fetched here)."""
    if refs.aligned is not None:
        return Path(refs.aligned.folder)
    if isinstance(update, AdapterUpdate) and update.recorded_base:
        from csulora.io.hub import cached_model_dir

        return cached_model_dir(update.recorded_base)
    return None

