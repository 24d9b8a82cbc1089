"""Full fine-tunes: audit and correct a fully fine-tuned checkpoint, streamed (docs/design.md §5d).

The same methods, reports and CLI commands as for LoRA adapters, on the dense update of each
target module ``dW = W_ft - W_aligned``::

    from csulora.pipeline.checkpoint_api import audit_checkpoint, correct_checkpoint

    report = audit_checkpoint("ft/", aligned="aligned/", base="base/")      # changes nothing
    correct_checkpoint("ft/", "fixed/", "resta", aligned="aligned/", base="base/", restore=1.0)

(``csulora.pipeline.api.audit_adapter`` / ``correct_adapter`` recognise a checkpoint folder and come
here too.) The output is a checkpoint folder with the fine-tuned input's shard layout,
index, config, generation config and tokenizer files, which stock
``AutoModelForCausalLM.from_pretrained`` loads.

- **Targets** (default: every linear layer of the decoder blocks; ``targets`` as for
  adapters) are written as ``W_aligned + X`` with the method's dense ``X``
  (``CorrectionMethod.correct_dense``), in the fine-tuned tensor's dtype.
- **Every other tensor** (embeddings, norms, LM head, modules outside ``targets``) is copied
  byte for byte from the fine-tuned checkpoint, or from the aligned one with
  ``reset_others``; the report lists each one's relative change from the aligned model,
  because a full fine-tune changes them too and they then carry part of the update.
- **Memory.** One (W_ft, W_aligned[, W_base]) triple at a time: the weights are memory
  maps of the shards, ``dW`` and ``D`` are float32 buffers formed by blocks, the method
  writes ``X`` into ``dW``'s buffer, and ``W_aligned`` is added back in place before the
  cast to the output dtype. Copied tensors never become tensors at all.
- **Bad input** (a checkpoint whose architecture or shapes differ from the aligned one, a
  missing or truncated shard, NaN/Inf, pickled weights, an existing OUTDIR without
  ``force``) is one line naming the file and tensor, before anything is written; the
  output appears by one rename (temporary folder beside OUTDIR).

Where D comes from: ``aligned`` is required (it defines dW). ``base`` streams the exact
``D = W_aligned - W_base`` (subspaces computed on the fly); ``subspace`` is a cache of
``csulora subspace``. Which one a method needs is its own business
(``CorrectionMethod.dense_inputs``); ``scale`` needs neither.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from csulora.pipeline.api import _check_subspace_config, _relative_inside, _target_list
from csulora.linalg.geometry import DenseGeometry, audit_dense_report
from csulora.errors import InputError, OptionError
from csulora.io.adapters import DEFAULT_REPORT_NAME
from csulora.io.atomic import atomic_output_dir, check_output_dir, check_output_file
from csulora.io.calibration_file import CalibrationFile, load_calibration
from csulora.io.checkpoint_writer import (
    TORCH_DTYPES,
    CheckpointLayout,
    PlannedTensor,
    ShardLayout,
    ShardWriter,
    TensorEntry,
    copy_side_files,
    read_checkpoint_layout,
    write_index,
)
from csulora.io.checkpoints import (
    CONFIG_JSON,
    CheckpointReader,
    check_finite,
    check_same_architecture,
    decoder_linear_modules,
    read_displacement,
    weight_name,
)
from csulora.io.fingerprint import model_fingerprint
from csulora.io.subspace_cache import SubspaceCache, check_fingerprint, load_subspace_cache, round_trip
from csulora.linalg.lowrank import finite_by_blocks, rows_per_block
from csulora.methods.base import SUBSPACE, CorrectionMethod, MethodConfig
from csulora.methods.registry import get_method, make_config
from csulora.pipeline.reports import AuditReport, CorrectionReport, mean_of, weighted_rho
from csulora.linalg.subspace import SubspaceConfig, compute_subspace
from csulora.types import DenseModuleInput, DenseModuleResult, ModuleSubspace

PathLike = str | os.PathLike

__all__ = ["audit_checkpoint", "correct_checkpoint", "CheckpointCorrection", "open_checkpoint_correction"]

NEEDS_ALIGNED = (
    "a full checkpoint's update is dW = W_ft - W_aligned: give --aligned ALIGNED (the model it was fine-tuned from)"
)
# config.json keys that fix the tensors' shapes: a fine-tune of another model is refused on them.
_ARCH_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")


# -- the opened inputs ----------------------------------------------------------------------------
@dataclass
class CheckpointSources:
    """The fine-tuned checkpoint, its aligned model and where D comes from (all opened lazily)."""

    finetuned: CheckpointReader
    aligned: CheckpointReader
    layout: CheckpointLayout  # the fine-tuned checkpoint's shards: the output's layout
    aligned_layout: CheckpointLayout
    base: CheckpointReader | None = None
    cache: SubspaceCache | None = None
    calibration: CalibrationFile | None = None  # activation statistics (docs/design.md §5c)

    def describe(self) -> dict[str, str | None]:
        described = {
            "subspace": str(self.cache.path) if self.cache else None,
            "base": str(self.base.folder) if self.base else None,
            "aligned": str(self.aligned.folder),
        }
        if self.calibration is not None:
            described["calibration"] = str(self.calibration.path)
        return described


def check_checkpoint_sources(
    aligned: PathLike | None,
    subspace: PathLike | None,
    base: PathLike | None,
    method: tuple[CorrectionMethod, MethodConfig] | None = None,
    calibration: PathLike | None = None,
) -> None:
    """Where dW and D come from, checked before any tensor is read.

    ``aligned`` always (it defines dW); the audit needs a subspace or ``base`` besides; a
    method exactly what its dense form needs with its options.
    """
    if aligned is None:
        raise OptionError(NEEDS_ALIGNED)
    if method is None:
        if subspace is None and base is None:
            raise OptionError("give --subspace FILE or --base BASE (with --aligned ALIGNED)")
        return
    impl, config = method
    impl.check_dense_options(config)
    if calibration is not None and not impl.needs_calibration(config):
        raise OptionError(f"--calibration does not apply to --method {impl.name} (it reads no activation statistics)")
    impl.check_sources(
        config,
        has_displacement=base is not None,
        has_subspace=base is not None or subspace is not None,
        has_calibration=calibration is not None,
    )


def _open_checkpoint_sources(
    stack: ExitStack,
    checkpoint: PathLike,
    aligned: PathLike,
    subspace: PathLike | None,
    base: PathLike | None,
    calibration: PathLike | None = None,
) -> CheckpointSources:
    layout = read_checkpoint_layout(checkpoint)  # missing/truncated shards, pickles: refused here
    aligned_layout = read_checkpoint_layout(aligned)
    sources = CheckpointSources(
        finetuned=stack.enter_context(CheckpointReader(checkpoint)),
        aligned=stack.enter_context(CheckpointReader(aligned)),
        layout=layout,
        aligned_layout=aligned_layout,
    )
    if base is not None:
        read_checkpoint_layout(base)
        sources.base = stack.enter_context(CheckpointReader(base))
    if subspace is not None:
        sources.cache = load_subspace_cache(subspace)
        stack.callback(sources.cache.close)
    if calibration is not None:
        sources.calibration = load_calibration(calibration, groups_in_memory=1)  # one group at a time
        stack.callback(sources.calibration.close)
    return sources


def _select_target_modules(sources: CheckpointSources, targets: Sequence[str] | None) -> list[str]:
    modules = decoder_linear_modules(sources.finetuned, targets)
    if not modules:
        what = f"matching --targets {','.join(targets)}" if targets else "inside the decoder blocks"
        raise OptionError(f"{sources.finetuned.folder}: no linear layers {what}")
    return modules


def _check_against_aligned(sources: CheckpointSources, modules: Sequence[str]) -> None:
    """The fine-tune and the aligned model hold the same tensors with the same shapes (headers only)."""
    ft, al = sources.finetuned, sources.aligned
    ft_cfg, al_cfg = ft.config, al.config
    for key in _ARCH_KEYS:
        if key in ft_cfg and key in al_cfg and ft_cfg[key] != al_cfg[key]:
            raise InputError(
                f"{ft.folder / CONFIG_JSON}: different architecture from the aligned model: {key} is "
                f"{ft_cfg[key]!r} vs {al_cfg[key]!r} in {al.folder / CONFIG_JSON}"
            )
    for name in ft.keys():
        if name not in al:
            raise InputError(f"{ft.files[name]}: tensor {name} has no counterpart in the aligned model {al.folder}")
        if ft.shape(name) != al.shape(name):
            raise InputError(
                f"{ft.files[name]}: tensor {name} has shape {list(ft.shape(name))} but the aligned model "
                f"({al.files[name]}) has {list(al.shape(name))}"
            )
    extra = [name for name in al.keys() if name not in ft]
    if extra:
        raise InputError(f"{al.files[extra[0]]}: tensor {extra[0]} of the aligned model is missing from {ft.folder}")
    for module in modules:
        name = weight_name(module)
        for reader in (ft, al):
            if reader.dtype_name(name) not in ("F32", "F16", "BF16", "F64"):
                raise InputError(f"{reader.files[name]}: tensor {name} has dtype {reader.dtype_name(name)} (float only)")
    if sources.base is not None:
        check_same_architecture(sources.base, al, modules)
    if sources.calibration is not None:
        shapes = {module: tuple(ft.shape(weight_name(module))) for module in modules}
        sources.calibration.check_modules(shapes, ft.folder)  # type: ignore[arg-type]
        sources.calibration.check_model(model_fingerprint(al.folder)["digest"], al.folder)
    if sources.cache is not None:
        for module in modules:
            entry = sources.cache.entry(module)
            shape = ft.shape(weight_name(module))
            if tuple(entry.shape) != tuple(shape):
                raise InputError(
                    f"{sources.cache.path}: module {module} has shape {list(entry.shape)} but "
                    f"{ft.files[weight_name(module)]} has {list(shape)}"
                )


def _check_corrects_every_module(impl: CorrectionMethod, sources: CheckpointSources, modules: Sequence[str]) -> None:
    """A method whose guarantee needs every changed module corrected refuses a --targets subset."""
    left_out = [m for m in decoder_linear_modules(sources.finetuned) if m not in set(modules)]
    if left_out:
        more = f" and {len(left_out) - 1} more" if len(left_out) > 1 else ""
        raise OptionError(
            f"--method {impl.name} must correct every linear layer (docs/design.md §5c): --targets leaves "
            f"{left_out[0]}{more} of {sources.finetuned.folder} uncorrected; drop --targets"
        )


# -- one correction, opened ----------------------------------------------------------------------
@dataclass
class CheckpointCorrection:
    """An opened correction of one checkpoint: the sources, the targets, the method and config.

    :meth:`corrected_weight` streams one target module (dW, D and the subspace read, the
    method run, ``W_aligned + X`` formed in the output dtype); :meth:`untargeted` measures a
    tensor outside the targets. Used by :func:`correct_checkpoint` (shard by shard, to disk)
    and by ``csulora.tuning.checkpoint`` (into a loaded model, in memory).
    """

    sources: CheckpointSources
    modules: list[str]
    method: CorrectionMethod | None  # None: the audit
    options: MethodConfig | None = None  # the method's validated config
    config: Any = None  # what correct_dense receives: ``options``, or the plan of a first pass
    subspace_config: SubspaceConfig = field(default_factory=SubspaceConfig)
    reset_others: bool = False
    need_subspace: bool = True
    results: dict[str, DenseModuleResult] = field(default_factory=dict)

    @property
    def targets(self) -> set[str]:
        return {weight_name(m) for m in self.modules}

    # --- inputs ------------------------------------------------------------------------------
    def module_input(self, module: str) -> DenseModuleInput:
        """One target's dW (float32), with D and the subspace when available / needed."""
        src = self.sources
        dW = read_displacement(src.aligned, src.finetuned, module)  # W_ft - W_aligned, by blocks
        D = read_displacement(src.base, src.aligned, module) if src.base is not None else None
        subspace = self._subspace(module, D) if (self.need_subspace or src.cache is not None) else None
        calibration = src.calibration.module(module) if src.calibration is not None else None
        return DenseModuleInput(name=module, update=dW, subspace=subspace, displacement=D, calibration=calibration)

    def _subspace(self, module: str, D: Tensor | None) -> ModuleSubspace | None:
        cache = self.sources.cache
        if cache is not None:
            if D is not None:
                check_fingerprint(cache, module, D)
            return cache.get(module)
        if D is None:
            return None
        label = f"{self.sources.aligned.folder}: {weight_name(module)}"
        return round_trip(compute_subspace(D, self.subspace_config, name=label))

    # --- the method --------------------------------------------------------------------------
    def run_first_pass(self, config: Any, progress: bool) -> Any:
        """The per-module config for methods with a global decision (one extra stream)."""
        from tqdm import tqdm

        assert self.method is not None
        if not self.method.needs_dense_first_pass(config):
            return self.method.dense_run(config)
        measures = {}
        for module in tqdm(self.modules, desc=f"{self.method.name}: first pass", unit="module",
                           disable=None if progress else True):
            measures[module] = self.method.dense_first_pass(self.module_input(module), config)
        return self.method.dense_run(config, measures)

    def corrected_weight(self, module: str) -> Tensor | None:
        """Correct one module; the weight to write (output dtype), or None to keep W_ft as is."""
        assert self.method is not None
        name = weight_name(module)
        dtype = TORCH_DTYPES[self.sources.finetuned.dtype_name(name)]
        dense_input = self.module_input(module)
        result = self.method.correct_dense(dense_input, self.config)
        dense_input.displacement = None  # D is no longer needed: free it before W is formed
        self.results[module] = DenseModuleResult(name=result.name, update=None, report=result.report)
        if result.update is None:
            return None
        return self._output_weight(name, result.update, dtype)

    def _output_weight(self, name: str, X: Tensor, dtype: torch.dtype) -> Tensor:
        """``W_aligned + X`` added in X's own buffer by blocks of rows, then cast; NaN/Inf refused.

        W_aligned is not checked on its own (a whole-tensor check costs a float32 copy of it):
        a NaN/Inf in it reaches the result, which is checked block by block.
        """
        aligned = self.sources.aligned.get(name, dtype=None, finite_check=False)  # a view of the memory map
        step = rows_per_block(X.shape[1])
        for start in range(0, X.shape[0], step):
            X[start : start + step] += aligned[start : start + step].to(X.dtype)
        out = X if X.dtype == dtype else X.to(dtype)
        if not finite_by_blocks(out):
            raise InputError(
                f"{self.sources.finetuned.files[name]}: corrected tensor {name} is not finite in {dtype} "
                "(NaN/Inf after the correction); nothing written"
            )
        return out

    # --- untargeted tensors ------------------------------------------------------------------------
    def untargeted(self, name: str) -> dict[str, Any]:
        """How a tensor outside the targets moved: ``||W_ft - W_aligned|| / ||W_aligned||``.

        Both are memory-map views, compared by blocks; a NaN/Inf in either makes the sums
        non-finite, and only then are they checked whole (naming the file and tensor).
        """
        ft = self.sources.finetuned.get(name, dtype=None, finite_check=False)
        al = self.sources.aligned.get(name, dtype=None, finite_check=False)
        rel, changed = relative_change(ft, al)
        if rel is not None and not math.isfinite(rel) or (rel is None and ft.is_floating_point() and changed):
            for reader, tensor in ((self.sources.finetuned, ft), (self.sources.aligned, al)):
                check_finite(tensor, reader.files[name], name)
        return {"tensor": name, "shape": list(ft.shape), "rel_change": rel, "changed": changed}


def relative_change(new: Tensor, old: Tensor) -> tuple[float | None, bool]:
    """``(||new - old|| / ||old||, new != old)`` by blocks of rows (None when ``old`` is 0 or not float)."""
    if not new.is_floating_point():
        return None, not torch.equal(new, old)
    rows = new.shape[0] if new.dim() else 1
    a, b = new.reshape(rows, -1), old.reshape(rows, -1)
    diff_sq = ref_sq = 0.0
    step = rows_per_block(a.shape[1])
    for start in range(0, a.shape[0], step):
        x, y = a[start : start + step].to(torch.float32), b[start : start + step].to(torch.float32)
        diff_sq += float((x - y).square().sum(dtype=torch.float64))
        ref_sq += float(y.square().sum(dtype=torch.float64))
    changed = diff_sq > 0.0
    if ref_sq == 0.0:
        return (0.0 if not changed else None), changed
    return math.sqrt(diff_sq / ref_sq), changed


def open_checkpoint_correction(
    stack: ExitStack,
    checkpoint: PathLike,
    method: str | None,
    *,
    aligned: PathLike | None,
    subspace: PathLike | None = None,
    base: PathLike | None = None,
    subspace_config: SubspaceConfig | None = None,
    targets: Sequence[str] | str | None = None,
    reset_others: bool = False,
    progress: bool = True,
    method_options: Mapping[str, Any] | None = None,
    calibration: PathLike | None = None,
) -> CheckpointCorrection:
    """Validate every option and input (before any tensor is read), open the sources, run the
    method's first pass if it needs one, and return the correction ready to stream.

    ``method=None`` opens an audit. The readers close with ``stack``.
    """
    impl = config = None
    if method is not None:
        impl = get_method(method)
        config = make_config(impl, dict(method_options or {}))
        check_checkpoint_sources(aligned, subspace, base, (impl, config), calibration)
    else:
        check_checkpoint_sources(aligned, subspace, base)
    sub_config = _check_subspace_config(subspace_config, cache=subspace)
    target_list = _target_list(targets)
    sources = _open_checkpoint_sources(stack, checkpoint, aligned, subspace, base, calibration)  # type: ignore[arg-type]
    modules = _select_target_modules(sources, target_list)
    if impl is not None and impl.corrects_every_module:
        _check_corrects_every_module(impl, sources, modules)
    _check_against_aligned(sources, modules)
    need_subspace = True
    if impl is not None:
        need_subspace = SUBSPACE in impl.dense_inputs(config, has_displacement=base is not None)
    correction = CheckpointCorrection(
        sources=sources,
        modules=modules,
        method=impl,
        options=config,
        config=config,
        subspace_config=sub_config,
        reset_others=reset_others,
        need_subspace=need_subspace,
    )
    if impl is not None:
        correction.config = correction.run_first_pass(config, progress)
    return correction


# -- audit_checkpoint -------------------------------------------------------------------------------
def audit_checkpoint(
    checkpoint: PathLike,
    *,
    aligned: PathLike | None,
    subspace: PathLike | None = None,
    base: PathLike | None = None,
    progress: bool = True,
    subspace_config: SubspaceConfig | None = None,
    targets: Sequence[str] | str | None = None,
) -> AuditReport:
    """:func:`csulora.pipeline.api.audit_adapter` for a full fine-tune; changes nothing.

    Per target module the same keys as for an adapter (rho_F/P/O, the Safe LoRA cosine,
    cos(dW, D), ||dW||/||D||, subspace rank and energy) on ``dW = W_ft - W_aligned``;
    ``untargeted`` lists every other tensor's relative change from the aligned model.
    """
    from tqdm import tqdm

    rows: list[dict[str, Any]] = []
    with ExitStack() as stack:
        audit = open_checkpoint_correction(
            stack, checkpoint, None, aligned=aligned, subspace=subspace, base=base,
            subspace_config=subspace_config, targets=targets, progress=progress,
        )  # fmt: skip
        projection = "approx" if base is not None else "exact"
        for module in tqdm(audit.modules, desc="audit", unit="module", disable=None if progress else True):
            geometry = DenseGeometry(audit.module_input(module))
            rows.append({"module": module, **audit_dense_report(geometry, safelora_projection=projection)})
            del geometry
        others = [audit.untargeted(name) for name in audit.sources.layout.tensor_names() if name not in audit.targets]
        described = audit.sources.describe()
    summary = {
        "modules": len(rows),
        **weighted_rho(rows, "dw_norm"),
        "mean_cos_dW_D": mean_of(row.get("cos_dW_D") for row in rows),
        "min_safelora_cos": min((r["safelora_cos"] for r in rows if r.get("safelora_cos") is not None), default=None),
        "safelora_projection": projection,
        **untargeted_summary(others, reset_others=False),
    }
    return AuditReport(
        adapter=str(Path(checkpoint)),
        d_source=rows[0].get("d_source") if rows else None,
        sources=described,
        modules=rows,
        summary=summary,
        untargeted=others,
    )


def untargeted_summary(others: Sequence[Mapping[str, Any]], *, reset_others: bool) -> dict[str, Any]:
    """How many untargeted tensors the fine-tune changed, the largest change, and what it means."""
    changed = [o for o in others if o["changed"]]
    largest = max((o for o in changed if o["rel_change"] is not None), key=lambda o: o["rel_change"], default=None)
    out: dict[str, Any] = {
        "untargeted_tensors": len(others),
        "untargeted_changed": len(changed),
        "largest_untargeted_change": None if largest is None else f"{largest['tensor']} {largest['rel_change']:.3g}",
    }
    if changed and not reset_others:
        # docs/design.md §5c/§5d: a changed module left uncorrected carries part of the update.
        out["note"] = (
            f"{len(changed)} untargeted tensors differ from the aligned model and are not corrected "
            "(they carry part of the fine-tune's update); --reset-others copies them from ALIGNED"
        )
    return out


# -- correct_checkpoint ---------------------------------------------------------------------------
def correct_checkpoint(
    checkpoint: PathLike,
    out_dir: PathLike,
    method: str,
    *,
    aligned: PathLike | None,
    subspace: PathLike | None = None,
    base: PathLike | None = None,
    force: bool = False,
    report_path: PathLike | None = None,
    progress: bool = True,
    subspace_config: SubspaceConfig | None = None,
    targets: Sequence[str] | str | None = None,
    reset_others: bool = False,
    calibration: PathLike | None = None,
    **method_options: Any,
) -> CorrectionReport:
    """Write a corrected copy of a fully fine-tuned checkpoint to ``out_dir`` with ``method``.

    Each target module becomes ``W_aligned + X`` with the method's dense form (docs/design.md
    §5d: ``scale`` c dW; ``resta`` dW + beta D (D_k from a subspace cache alone); ``safelora``
    C dW on the selected modules; ``csulora`` F + c_P P + c_O O (+ beta D_k)). Every other
    tensor is copied byte for byte from the fine-tuned checkpoint (``reset_others``: from
    ``aligned``). Same shard files, index, dtypes and side files as the input; the report is
    written to ``report_path`` (default ``out_dir/csulora_report.json``).
    """
    from tqdm import tqdm

    out = check_output_dir(out_dir, force)
    report_file = Path(report_path) if report_path is not None else None
    if report_file is not None and _relative_inside(report_file, out) is None:
        check_output_file(report_file, force, flag="--report")
    with ExitStack() as stack:
        correction = open_checkpoint_correction(
            stack, checkpoint, method, aligned=aligned, subspace=subspace, base=base,
            subspace_config=subspace_config, targets=targets, reset_others=reset_others, progress=progress,
            method_options=method_options, calibration=calibration,
        )  # fmt: skip
        impl = correction.method
        assert impl is not None
        src = correction.sources
        others: list[dict[str, Any]] = []
        inside = _relative_inside(report_file, out) if report_file is not None else Path(DEFAULT_REPORT_NAME)
        total = len(src.layout.tensor_names())
        with atomic_output_dir(out, force) as tmp:
            bar = tqdm(total=total, desc=f"correct ({impl.name})", unit="tensor", disable=None if progress else True)
            total_size = 0
            for shard in src.layout.shards:
                plan = [_planned(correction, entry.name, entry) for entry in shard.entries]
                writer = ShardWriter(tmp / shard.path.name, plan, shard.metadata)
                try:
                    for entry in shard.entries:
                        _write_one(correction, writer, shard, entry, others)
                        bar.update(1)
                    writer.close()
                except BaseException:
                    writer.abort()
                    raise
                total_size += writer.total_bytes
            bar.close()
            write_index(tmp, src.layout, total_size)
            copy_side_files(src.layout.folder, tmp)
            report = _correction_report(correction, checkpoint, out, report_file, others)
            if inside is not None:  # the report travels with the checkpoint (one atomic rename)
                (tmp / inside).parent.mkdir(parents=True, exist_ok=True)
                report.to_json(tmp / inside)
            else:
                report.to_json(report_file)
    return report


def _planned(correction: CheckpointCorrection, name: str, entry: TensorEntry) -> PlannedTensor:
    """A tensor of the output shard: the fine-tuned one's, or the aligned one's with reset_others."""
    if correction.reset_others and name not in correction.targets:
        _, entry = correction.sources.aligned_layout.locate(name)
    return PlannedTensor(name=name, dtype=entry.dtype, shape=entry.shape, nbytes=entry.nbytes)


def _write_one(
    correction: CheckpointCorrection, writer: ShardWriter, shard: ShardLayout, entry: TensorEntry, others: list[dict]
) -> None:
    """One tensor of the output: a corrected target, or an untargeted tensor's raw bytes (measured)."""
    name = entry.name
    if name in correction.targets:
        module = name[: -len(".weight")]
        weight = correction.corrected_weight(module)
        if weight is None:
            writer.copy_tensor(name, shard, entry)  # unchanged: W_ft byte for byte
        else:
            writer.write_tensor(name, weight)
        del weight
        return
    written_from = "aligned" if correction.reset_others else "fine-tuned"
    others.append({**correction.untargeted(name), "written_from": written_from})
    if correction.reset_others:
        writer.copy_tensor(name, *correction.sources.aligned_layout.locate(name))
    else:
        writer.copy_tensor(name, shard, entry)


def _correction_report(
    correction: CheckpointCorrection, checkpoint: PathLike, out: Path, report_file: Path | None, others: list
) -> CorrectionReport:
    impl = correction.method
    assert impl is not None
    results = [correction.results[m] for m in correction.modules]
    rows = [{"module": r.name, **r.report} for r in results]
    options = correction.options
    assert options is not None
    summary = {
        "modules": len(rows),
        **impl.summary(results, options),  # type: ignore[arg-type]
        **{f"input_{k}": v for k, v in weighted_rho(rows, "dw_norm_before").items()},
        "mean_cos_dW_D": mean_of(row.get("cos_dW_D") for row in rows),
        **untargeted_summary(others, reset_others=correction.reset_others),
    }
    return CorrectionReport(
        method=impl.name,
        options={**options.to_dict(), "reset_others": correction.reset_others},
        adapter=str(Path(checkpoint)),
        out_dir=str(out),
        report_path=str(report_file if report_file is not None else out / DEFAULT_REPORT_NAME),
        d_source=rows[0].get("d_source") if rows else None,
        sources=correction.sources.describe(),
        modules=rows,
        summary=summary,
        untargeted=others,
    )


def iter_corrected_weights(correction: CheckpointCorrection) -> Iterator[tuple[str, Tensor]]:
    """Every tensor whose value differs from the fine-tuned one, as ``(name, tensor)``:
    corrected targets (unchanged ones skipped) and, with ``reset_others``, the aligned model's
    other tensors. One tensor alive at a time (the caller copies it before asking for the next)."""
    for module in correction.modules:
        weight = correction.corrected_weight(module)
        if weight is not None:
            yield weight_name(module), weight
        del weight
    if correction.reset_others:
        for name in correction.sources.layout.tensor_names():
            if name not in correction.targets:
                yield name, correction.sources.aligned.get(name, dtype=None)
