"""The typed Python API: build a safety subspace, audit an adapter, correct an adapter.

Three functions, the same three as the CLI commands (which only parse arguments and call
these)::

    from csulora.pipeline.api import build_subspace, audit_adapter, correct_adapter

    build_subspace("base/", "aligned/", "subspace.safetensors")          # once per model pair
    report = audit_adapter("adapter/", subspace="subspace.safetensors")  # changes nothing
    print(report.format_table())
    correct_adapter("adapter/", "fixed/", "resta", subspace="subspace.safetensors", restore=1.0)

Where D comes from: ``subspace=`` (a cache from :func:`build_subspace`) needs only that
file; ``base=``/``aligned=`` stream the exact ``D = W_aligned - W_base`` module by module
(one pair of weight tensors in memory, never two models) and compute subspaces on the fly.
Both may be given: then the cached subspaces are used, checked against the pair, and the
exact D serves the methods and reports that want it.

Every option is validated before any tensor is read; every input problem is a one-line
:class:`~csulora.errors.InputError`/:class:`~csulora.errors.OptionError`; outputs appear
atomically (a temporary folder beside OUTDIR, renamed at the end).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from csulora.errors import InputError, OptionError
from csulora.io.adapters import DEFAULT_REPORT_NAME, LoraAdapter, as_stored_update, read_adapter, write_adapter
from csulora.io.hub import resolve_model_dir
from csulora.io.atomic import atomic_output_dir, check_output_dir, check_output_file
from csulora.io.calibration_file import CalibrationFile, load_calibration
from csulora.io.input_kind import is_local_checkpoint
from csulora.io.checkpoints import (
    CheckpointReader,
    check_same_architecture,
    decoder_linear_modules,
    layer_index,
    matches_target,
    read_displacement,
    weight_name,
)
from csulora.io.subspace_cache import (
    SubspaceCache,
    check_fingerprint,
    displacement_fingerprint,
    load_subspace_cache,
    round_trip,
    save_subspace_cache,
)
from csulora.methods.base import CorrectionMethod, MethodConfig
from csulora.methods.registry import get_method, make_config
from csulora.pipeline.model_card import base_model_for, correction_card
from csulora.pipeline.reports import AuditReport, CorrectionReport, mean_of, weighted_rho
from csulora.linalg.subspace import SubspaceConfig, compute_subspace
from csulora.types import ModuleInput, ModuleResult, ModuleSubspace

PathLike = str | os.PathLike

__all__ = [
    "AuditReport",
    "CorrectionReport",
    "SubspaceConfig",
    "audit_adapter",
    "build_subspace",
    "correct_adapter",
]


# -- options ------------------------------------------------------------------------------------
@dataclass
class _Sources:
    """The opened inputs D can come from; closed by the ExitStack of the caller."""

    cache: SubspaceCache | None = None
    base: CheckpointReader | None = None
    aligned: CheckpointReader | None = None
    calibration: CalibrationFile | None = None  # activation statistics (docs/design.md §5c)

    @property
    def has_pair(self) -> bool:
        return self.base is not None

    def describe(self) -> dict[str, str | None]:
        described = {
            "subspace": str(self.cache.path) if self.cache else None,
            "base": str(self.base.folder) if self.base else None,
            "aligned": str(self.aligned.folder) if self.aligned else None,
        }
        if self.calibration is not None:  # only then: other methods' reports keep their bytes
            described["calibration"] = str(self.calibration.path)
        return described


def check_source_options(
    subspace: PathLike | None,
    base: PathLike | None,
    aligned: PathLike | None,
    method: tuple[CorrectionMethod, MethodConfig] | None = None,
    calibration: PathLike | None = None,
) -> None:
    """The one check of where D comes from, before any tensor is read.

    Without ``method`` (the audit) a subspace or a base/aligned pair is needed; with one,
    exactly what that method needs with that config (:meth:`CorrectionMethod.check_sources`):
    a method that needs neither (``scale``, ``calibrated``) needs no --subspace/--base.
    ``calibration`` (a statistics file) is for the methods that use one, and refused for
    the others rather than silently ignored.
    """
    if (base is None) != (aligned is None):
        raise OptionError("--base and --aligned go together: give both, or use --subspace")
    has_pair = base is not None
    if method is None:
        if subspace is None and not has_pair:
            raise OptionError("give --subspace FILE or --base BASE --aligned ALIGNED")
        return
    impl, config = method
    if calibration is not None and not impl.needs_calibration(config):
        raise OptionError(f"--calibration does not apply to --method {impl.name} (it reads no activation statistics)")
    impl.check_sources(
        config,
        has_displacement=has_pair,
        has_subspace=has_pair or subspace is not None,
        has_calibration=calibration is not None,
    )


def _open_sources(
    stack: ExitStack,
    subspace: PathLike | None,
    base: PathLike | None,
    aligned: PathLike | None,
    calibration: PathLike | None = None,
) -> _Sources:
    sources = _Sources()
    if calibration is not None:
        sources.calibration = load_calibration(calibration)
        stack.callback(sources.calibration.close)
    if subspace is not None:
        sources.cache = load_subspace_cache(subspace)
        stack.callback(sources.cache.close)
    if base is not None and aligned is not None:
        sources.base = stack.enter_context(CheckpointReader(base))
        sources.aligned = stack.enter_context(CheckpointReader(aligned))
    return sources


def _target_list(targets: Iterable[str] | str | None) -> list[str] | None:
    """Targets as a list; a comma-separated string (the CLI spelling) is accepted too."""
    if targets is None:
        return None
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    cleaned = [str(t).strip() for t in items if str(t).strip()]
    if not cleaned:
        raise OptionError("--targets is empty")
    return cleaned


def _select_modules(adapter: LoraAdapter, targets: Iterable[str] | None) -> list[str]:
    targets = _target_list(targets)
    names = [name for name in adapter.modules if matches_target(name, targets)]
    if not names:
        raise OptionError(f"--targets {','.join(targets or [])} matches no module of the adapter {adapter.path}")
    return names


def _check_modules_against_sources(adapter: LoraAdapter, names: Sequence[str], sources: _Sources) -> None:
    """Every check that headers and metadata allow, before any weight is read."""
    if sources.base is not None and sources.aligned is not None:
        check_same_architecture(sources.base, sources.aligned, names)
        for name in names:
            shape = sources.base.shape(weight_name(name))
            _check_shape(adapter, name, shape, f"{sources.base.folder}: tensor {weight_name(name)}")
    if sources.cache is not None:
        for name in names:
            entry = sources.cache.entry(name)
            _check_shape(adapter, name, entry.shape, f"{sources.cache.path}: module {name}")
    if sources.calibration is not None:
        _check_calibration(adapter, names, sources)


def _check_calibration(adapter: LoraAdapter, names: Sequence[str], sources: _Sources) -> None:
    """Statistics for every module, of the right size, and (given the aligned model) from it."""
    assert sources.calibration is not None
    sources.calibration.check_modules({name: adapter.modules[name].shape for name in names}, adapter.weights_file)
    if sources.aligned is not None:
        from csulora.io.fingerprint import model_fingerprint

        digest = model_fingerprint(sources.aligned.folder)["digest"]
        sources.calibration.check_model(digest, sources.aligned.folder)


def _check_corrects_every_module(impl: CorrectionMethod, adapter: LoraAdapter, names: Sequence[str]) -> None:
    """A method whose guarantee needs every changed module corrected refuses a --targets subset."""
    left_out = [name for name in adapter.modules if name not in set(names)]
    if impl.corrects_every_module and left_out:
        more = f" and {len(left_out) - 1} more" if len(left_out) > 1 else ""
        raise OptionError(
            f"--method {impl.name} must correct every adapted module (docs/design.md §5c): --targets leaves "
            f"{left_out[0]}{more} of {adapter.path} uncorrected; drop --targets"
        )


def _check_shape(adapter: LoraAdapter, name: str, shape: Sequence[int], where: str) -> None:
    module = adapter.modules[name]
    if tuple(shape) != module.shape:
        raise InputError(
            f"{adapter.weights_file}: module {name} updates a {list(module.shape)} weight "
            f"(lora_B {list(module.B.shape)}, lora_A {list(module.A.shape)}) but {where} has shape {list(shape)}"
        )


def _module_inputs(
    adapter: LoraAdapter,
    names: Sequence[str],
    sources: _Sources,
    *,
    need_subspace: bool,
    subspace_config: SubspaceConfig,
    progress: bool,
    desc: str,
) -> Iterator[ModuleInput]:
    """Stream one ModuleInput per target module: one weight pair and one D in memory."""
    from tqdm import tqdm

    for name in tqdm(names, desc=desc, unit="module", disable=None if progress else True):
        displacement = None
        if sources.has_pair:
            displacement = read_displacement(sources.base, sources.aligned, name)
        subspace = None
        if need_subspace or sources.cache is not None:
            subspace = _subspace_for(name, sources, displacement, subspace_config)
        calibration = sources.calibration.module(name) if sources.calibration is not None else None
        module = ModuleInput(
            name=name,
            update=adapter.modules[name].update(),
            subspace=subspace,
            displacement=displacement,
            calibration=calibration,
        )
        yield module
        # Drop D before the next pair is read: the consumer's loop variable (e.g. a list
        # comprehension in Safe LoRA's number mode) still references this ModuleInput.
        module.displacement = None
        del displacement, subspace, calibration, module


def _subspace_for(
    name: str, sources: _Sources, displacement: Any, config: SubspaceConfig
) -> ModuleSubspace:
    if sources.cache is not None:
        if displacement is not None:
            check_fingerprint(sources.cache, name, displacement)
        return sources.cache.get(name)
    assert displacement is not None and sources.aligned is not None
    label = f"{sources.aligned.folder}: {weight_name(name)}"
    return round_trip(compute_subspace(displacement, config, name=label))


def _check_subspace_config(config: SubspaceConfig | None, *, cache: PathLike | None = None) -> SubspaceConfig:
    """The options for subspaces computed on the fly; refused beside a cache (it fixes them)."""
    if config is None:
        return SubspaceConfig()
    if not isinstance(config, SubspaceConfig):
        raise OptionError(f"subspace config must be a SubspaceConfig, got {type(config).__name__}")
    if cache is not None:
        raise OptionError(
            f"subspace options (--rank, --energy, ...) do not apply with --subspace {cache}: the cache fixes them"
        )
    return config


def _resolve_inputs(
    adapter: PathLike | None, base: PathLike | None, aligned: PathLike | None
) -> tuple[PathLike | None, PathLike | None, PathLike | None]:
    """Folders for ADAPTER/BASE/ALIGNED: a hub id is fetched (or found in the hub cache), io/hub.py."""
    return (
        None if adapter is None else resolve_model_dir(adapter, "ADAPTER"),
        None if base is None else resolve_model_dir(base, "BASE"),
        None if aligned is None else resolve_model_dir(aligned, "ALIGNED"),
    )


# -- build_subspace -----------------------------------------------------------------------------
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
    every linear layer inside the decoder blocks. Streams one weight pair at a time.
    An existing ``out_file`` is replaced only with ``force``. Returns the path of the
    written ``.safetensors`` cache.
    """
    from tqdm import tqdm

    config = _check_subspace_config(config)
    out = Path(out_file)
    if out.is_dir():
        raise InputError(f"{out}: is a folder; give the cache file name, e.g. {out / 'subspace.safetensors'}")
    check_output_file(out, force)
    targets = _target_list(targets)
    _, base, aligned = _resolve_inputs(None, base, aligned)
    with ExitStack() as stack:
        base_reader = stack.enter_context(CheckpointReader(base))
        aligned_reader = stack.enter_context(CheckpointReader(aligned))
        modules = decoder_linear_modules(base_reader, targets)
        if not modules:
            what = f"matching --targets {','.join(targets)}" if targets else "inside decoder blocks"
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
            out,
            subspaces,
            shapes=shapes,
            fingerprints=fingerprints,
            sources=sources,
            options=dataclasses.asdict(config),
        )


# -- audit_adapter ------------------------------------------------------------------------------
def audit_adapter(
    adapter_dir: PathLike,
    *,
    subspace: PathLike | None = None,
    base: PathLike | None = None,
    aligned: PathLike | None = None,
    progress: bool = True,
    subspace_config: SubspaceConfig | None = None,
    targets: Sequence[str] | str | None = None,
) -> AuditReport:
    """Measure how an adapter's update sits against the safety subspace; changes nothing.

    Per module: rho_F/rho_P/rho_O (energy split of dW), the Safe LoRA cosine, cos(dW, D),
    ||dW||/||D||, subspace rank and captured energy. ``subspace_config`` applies when the
    subspace is computed on the fly from ``base``/``aligned``.
    """
    # Hub ids first: whether ADAPTER is a full checkpoint is read from the files it names.
    adapter_dir, base, aligned = _resolve_inputs(adapter_dir, base, aligned)
    if is_local_checkpoint(adapter_dir):  # a full fine-tune: the dense path (docs/design.md §5d)
        from csulora.pipeline.checkpoint_api import audit_checkpoint

        return audit_checkpoint(
            adapter_dir, aligned=aligned, subspace=subspace, base=base, progress=progress,
            subspace_config=subspace_config, targets=targets,
        )  # fmt: skip
    from csulora.linalg.geometry import audit_module

    check_source_options(subspace, base, aligned)
    config = _check_subspace_config(subspace_config, cache=subspace)
    targets = _target_list(targets)
    adapter = read_adapter(adapter_dir)
    names = _select_modules(adapter, targets)
    rows: list[dict[str, Any]] = []
    with ExitStack() as stack:
        sources = _open_sources(stack, subspace, base, aligned)
        _check_modules_against_sources(adapter, names, sources)
        projection = "approx" if sources.has_pair else "exact"
        stream = _module_inputs(
            adapter, names, sources, need_subspace=True, subspace_config=config, progress=progress, desc="audit"
        )
        for module in stream:
            rows.append({"module": module.name, **audit_module(module, safelora_projection=projection)})
        described = sources.describe()
    d_source = rows[0].get("d_source") if rows else None
    summary = {
        "modules": len(rows),
        **weighted_rho(rows, "dw_norm"),
        "mean_cos_dW_D": mean_of(row.get("cos_dW_D") for row in rows),
        "min_safelora_cos": min((row["safelora_cos"] for row in rows if row.get("safelora_cos") is not None), default=None),
        "safelora_projection": projection,
    }
    return AuditReport(adapter=str(adapter.path), d_source=d_source, sources=described, modules=rows, summary=summary)


# -- correct_adapter ----------------------------------------------------------------------------
def correct_adapter(
    adapter_dir: PathLike,
    out_dir: PathLike,
    method: str,
    *,
    subspace: PathLike | None = None,
    base: PathLike | None = None,
    aligned: PathLike | None = None,
    force: bool = False,
    report_path: PathLike | None = None,
    progress: bool = True,
    subspace_config: SubspaceConfig | None = None,
    targets: Sequence[str] | str | None = None,
    calibration: PathLike | None = None,
    reset_others: bool = False,
    **method_options: Any,
) -> CorrectionReport:
    """Write a corrected copy of a PEFT LoRA adapter to ``out_dir`` with ``method``.

    A full checkpoint folder instead of an adapter goes to
    :func:`csulora.pipeline.checkpoint_api.correct_checkpoint` (``aligned`` required; ``reset_others``
    copies the untargeted tensors from ``aligned``).

    ``method`` is a registry name (a key of ``csulora.methods.registry.METHODS``: calibrated,
    csulora, safelora, resta, scale) and
    ``method_options`` its config fields (e.g. ``gamma=1.0, restore=0.5``). The output
    is a PEFT folder stock ``PeftModel.from_pretrained`` loads; every module keeps its
    scaling, ranks that change go to ``rank_pattern``/``alpha_pattern``. The per-module
    report is written to ``report_path`` (default ``out_dir/csulora_report.json``).
    ``targets`` restricts the correction to some modules; the others are copied unchanged
    (refused for a method that must correct every module, such as ``calibrated``).
    ``calibration`` is the activation statistics file of ``csulora calibrate`` for the
    methods that need one (``calibrated``, docs/design.md §5c); with ``aligned`` too it is
    checked to come from that model.
    """
    impl = get_method(method)
    config = make_config(impl, method_options)  # bad options fail before a hub id is fetched
    input_spec, aligned_spec = adapter_dir, aligned  # as given: hub ids stay ids in the card and config
    # Hub ids first: whether ADAPTER is a full checkpoint is read from the files it names.
    adapter_dir, base, aligned = _resolve_inputs(adapter_dir, base, aligned)
    if is_local_checkpoint(adapter_dir):  # a full fine-tune: the dense path (docs/design.md §5d)
        from csulora.pipeline.checkpoint_api import correct_checkpoint

        return correct_checkpoint(
            adapter_dir, out_dir, method, aligned=aligned, subspace=subspace, base=base, force=force,
            report_path=report_path, progress=progress, subspace_config=subspace_config, targets=targets,
            calibration=calibration, reset_others=reset_others, **method_options,
        )  # fmt: skip
    if reset_others:
        raise OptionError("--reset-others applies to full checkpoints only (an adapter changes nothing else)")
    check_source_options(subspace, base, aligned, (impl, config), calibration=calibration)
    sub_config = _check_subspace_config(subspace_config, cache=subspace)
    targets = _target_list(targets)
    out = check_output_dir(out_dir, force)
    report_file = Path(report_path) if report_path is not None else None
    if report_file is not None and report_file.is_dir():
        raise InputError(f"{report_file}: is a folder; give the report's file name")
    if report_file is not None and _relative_inside(report_file, out) is None:
        check_output_file(report_file, force, flag="--report")  # a file of its own: same rule as OUTDIR

    adapter = read_adapter(adapter_dir)
    names = _select_modules(adapter, targets)
    _check_corrects_every_module(impl, adapter, names)
    results = {}
    with ExitStack() as stack:
        sources = _open_sources(stack, subspace, base, aligned, calibration)
        _check_modules_against_sources(adapter, names, sources)
        stream = _module_inputs(
            adapter,
            names,
            sources,
            need_subspace=impl.needs_subspace(config),
            subspace_config=sub_config,
            progress=progress,
            desc=f"correct ({impl.name})",
        )
        for result in impl.correct(stream, config):
            results[result.name] = _kept_for_writing(adapter, result)
        described = sources.describe()
    missing = [name for name in names if name not in results]
    if missing:
        raise InputError(f"method {impl.name} returned no result for module {missing[0]}")
    ordered = [results[name] for name in names]
    rows = [{"module": r.name, **r.report} for r in ordered]
    for row in rows:
        row.setdefault("d_source", "exact" if sources.has_pair else "rank-k")
    summary = {
        "modules": len(rows),
        **impl.summary(ordered, config),
        **{f"input_{k}": v for k, v in weighted_rho(rows, "dw_norm_before").items()},
        "mean_cos_dW_D": mean_of(row.get("cos_dW_D") for row in rows),
    }
    report = CorrectionReport(
        method=impl.name,
        options=config.to_dict(),
        adapter=str(adapter.path),
        out_dir=str(out),
        report_path=str(report_file if report_file is not None else out / DEFAULT_REPORT_NAME),
        d_source=rows[0].get("d_source") if rows else None,
        sources=described,
        modules=rows,
        summary=summary,
    )
    inside = _relative_inside(report_file, out) if report_file is not None else Path(DEFAULT_REPORT_NAME)
    base_model = base_model_for(aligned_spec)  # None keeps the input's base_model_name_or_path
    card = correction_card(
        method=impl, options=config.to_dict(), adapter=adapter, input_spec=input_spec, corrected=names,
        base_model=base_model, sources=sources, report_file=None if inside is None else inside.as_posix(),
        summary=summary,
    )
    with atomic_output_dir(out, force) as tmp:
        write_adapter(
            adapter, tmp, {name: results[name].update for name in names}, base_model_name_or_path=base_model,
            model_card=card,
        )
        if inside is not None:  # the report travels with the adapter folder (one atomic rename)
            (tmp / inside).parent.mkdir(parents=True, exist_ok=True)
            report.to_json(tmp / inside)
        else:
            report.to_json(report_file)
    return report


def _kept_for_writing(adapter: LoraAdapter, result: ModuleResult) -> ModuleResult:
    """A result as it waits for the single-file write: its factors already in the file's form.

    The methods hand back float64 factors; kept as they are until every module is done,
    they held twice the fp32 output's bytes, and the write's cast added a third copy
    (docs/benchmarks.md, issue 15). An unknown module is left for write_adapter to refuse.
    """
    module = adapter.modules.get(result.name)
    if module is None:
        return result
    return dataclasses.replace(result, update=as_stored_update(module, result.update))


def _relative_inside(path: Path, folder: Path) -> Path | None:
    """``path`` relative to ``folder`` when it lies inside it, else None."""
    try:
        return path.resolve().relative_to(folder.resolve())
    except ValueError:
        return None
