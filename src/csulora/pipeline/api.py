"""The typed Python API of the correction pipeline: audit and correct any update.

::

    from csulora import audit_adapter, correct_adapter

    report = audit_adapter("adapter/", subspace="subspace.safetensors")          # changes nothing
    print(report.format_table())
    correct_adapter("adapter/", "fixed/", "resta", subspace="subspace.safetensors", restore=1.0)
    correct_adapter("ft/", "fixed/", "calibrated", aligned="aligned/", calibration="calib.safetensors")

ADAPTER is a PEFT LoRA folder or a fully fine-tuned checkpoint folder (``dW = W_ft -
W_aligned``; ``aligned`` required): the same functions, checks, report and model card serve
both (docs/design.md §5d, §9). Where D comes from: ``subspace=`` (a cache from
``csulora subspace``) or ``base=``/``aligned=`` (the exact D streamed module by module, one
weight pair in memory). Every option is validated before any tensor is read; every input
problem is a one-line :class:`~csulora.errors.InputError`/:class:`~csulora.errors.OptionError`;
outputs appear atomically (a temporary folder beside OUTDIR, renamed at the end) and may never
be, contain or lie inside an input.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from csulora.errors import InputError
from csulora.io.adapters import DEFAULT_REPORT_NAME
from csulora.io.atomic import atomic_output_dir, check_apart, check_output_dir, check_output_file
from csulora.linalg.subspace import SubspaceConfig
from csulora.methods.registry import get_method, make_config
from csulora.pipeline.audit import audit_rows, audit_summary
from csulora.pipeline.correction import Correction, open_correction, resolve_inputs
from csulora.pipeline.model_card import base_model_for, correction_card
from csulora.pipeline.options import SourcePaths, relative_inside
from csulora.pipeline.outputs import write_corrected
from csulora.pipeline.reports import AuditReport, CorrectionReport, correction_summary
from csulora.pipeline.updates import AdapterUpdate

PathLike = str | os.PathLike

__all__ = ["AuditReport", "CorrectionReport", "SubspaceConfig", "audit_adapter", "correct_adapter"]


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
    """Measure how an update sits against the safety subspace; changes nothing.

    Per module: rho_F/rho_P/rho_O (energy split of dW), the Safe LoRA cosine, cos(dW, D),
    ||dW||/||D||, subspace rank and captured energy; for a full checkpoint also every
    untargeted tensor's relative change from the aligned model. ``subspace_config`` applies
    when the subspace is computed on the fly from ``base``/``aligned``.
    """
    update_path, base, aligned = resolve_inputs(adapter_dir, base, aligned)
    paths = SourcePaths(subspace=subspace, base=base, aligned=aligned)
    with ExitStack() as stack:
        audit = open_correction(stack, update_path, None, paths=paths, subspace_config=subspace_config,
                                targets=targets, progress=progress)  # fmt: skip
        rows, untargeted = audit_rows(audit, progress=progress)
        return AuditReport(
            adapter=str(audit.update.path),
            d_source=rows[0].get("d_source") if rows else None,
            sources=audit.refs.describe(),
            modules=rows,
            summary=audit_summary(audit, rows, untargeted),
            untargeted=untargeted,
        )


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
    lora_rank: int | None = None,
    update_statistics: PathLike | None = None,
    **method_options: Any,
) -> CorrectionReport:
    """Write a corrected copy of an update (PEFT adapter or full checkpoint) to ``out_dir``.

    ``method`` is a registry name (``csulora.methods.registry.METHODS``) and ``method_options``
    its config fields (e.g. ``gamma=1.0, restore=0.5``). An adapter's output is a PEFT folder
    stock ``PeftModel.from_pretrained`` loads (every module keeps its scaling; ranks that
    change go to ``rank_pattern``/``alpha_pattern``); a checkpoint's output has the input's
    shards, index, config and tokenizer files (``reset_others`` copies the untargeted tensors
    from ``aligned``). The per-module report goes to ``report_path`` (default
    ``out_dir/csulora_report.json``), the model card to ``out_dir/README.md``. ``targets``
    restricts the correction to some modules (refused for a method that must correct every
    module, such as ``calibrated``). ``calibration`` (``csulora calibrate``'s statistics) is
    checked against ``aligned``, else against the adapter's recorded base model. A method with only
    a dense form (Safe Delta) corrects an adapter's ``s B A`` and writes the corrected model, or with
    ``lora_rank`` its best rank-r LoRA (the report gives the energy dropped).
    """
    get_method(method)
    make_config(method, method_options)  # bad options fail before a hub id is fetched
    input_spec, aligned_spec = adapter_dir, aligned  # as given: hub ids stay ids in the card and config
    update_path, base, aligned = resolve_inputs(adapter_dir, base, aligned)
    paths = SourcePaths(subspace=subspace, base=base, aligned=aligned, calibration=calibration,
                        update_statistics=update_statistics)  # fmt: skip
    out, report_file = _check_outputs(out_dir, report_path, force, update_path, paths)
    with ExitStack() as stack:
        correction = open_correction(
            stack, update_path, method, paths=paths, subspace_config=subspace_config, targets=targets,
            reset_others=reset_others, method_options=method_options, progress=progress, lora_rank=lora_rank,
        )  # fmt: skip
        with atomic_output_dir(out, force) as staging:
            return write_correction(correction, staging, input_spec=input_spec, aligned_spec=aligned_spec,
                                    report_file=report_file, out=out, progress=progress)  # fmt: skip


def write_correction(correction: Correction, folder: Path, *, input_spec: PathLike, aligned_spec: PathLike | None,
                     report_file: Path | None = None, out: Path | None = None,
                     progress: bool = False) -> CorrectionReport:  # fmt: skip
    """Correct into ``folder`` (an existing staging folder the caller renames into place): the
    update in its kind, ``README.md`` and the report (``folder/csulora_report.json`` unless
    ``report_file`` lies elsewhere). Sources inside ``folder`` (tune's statistics) are named
    relative to it, so the output never names a temporary path. ``out`` is the folder's final name."""
    out = out or folder
    inside = relative_inside(report_file, out) if report_file is not None else Path(DEFAULT_REPORT_NAME)
    base_model = base_model_for(aligned_spec) if correction.update.kind == "adapter" else str(aligned_spec)
    output_kind = "adapter" if isinstance(correction.update, AdapterUpdate) or correction.lora_rank else "checkpoint"
    reports: dict[str, CorrectionReport] = {}

    def card(done: Correction, untargeted: list[dict[str, Any]] | None) -> str:
        reports["report"] = _report(done, out, report_file, untargeted, folder)
        return correction_card(
            method=done.method, options=reports["report"].options, update=done.update, input_spec=input_spec,
            corrected=done.modules, base_model=base_model, refs=done.refs, sources=reports["report"].sources,
            report_file=None if inside is None else inside.as_posix(), summary=reports["report"].summary,
            output_kind=output_kind,
        )  # fmt: skip

    write_corrected(correction, folder, progress=progress, base_model=base_model, card=card)
    report = reports["report"]
    if inside is not None:  # the report travels with the output folder (one atomic rename)
        (folder / inside).parent.mkdir(parents=True, exist_ok=True)
        report.to_json(folder / inside)
    else:
        report.to_json(report_file)
    return report


def _check_outputs(out_dir: PathLike, report_path: PathLike | None, force: bool, update_path: Path,
                   paths: SourcePaths) -> tuple[Path, Path | None]:  # fmt: skip
    """OUTDIR and a --report file: may be replaced only with ``force``, never an input (or inside one)."""
    out = Path(out_dir)
    report_file = Path(report_path) if report_path is not None else None
    if report_file is not None and report_file.is_dir():
        raise InputError(f"{report_file}: is a folder; give the report's file name")
    inputs = {"ADAPTER": update_path, "--subspace": paths.subspace, "--base": paths.base,
              "--aligned": paths.aligned, "--calibration": paths.calibration,
              "--update-statistics": paths.update_statistics}  # fmt: skip
    # Apart first: "exists (use --force)" would be the wrong advice for an input.
    check_apart({"-o/--output": out, "--report": report_file}, inputs)
    out = check_output_dir(out, force)
    if report_file is not None and relative_inside(report_file, out) is None:
        check_output_file(report_file, force, flag="--report")  # a file of its own: same rule as OUTDIR
    return out, report_file


def _report(correction: Correction, out: Path, report_file: Path | None, untargeted: list | None,
            folder: Path) -> CorrectionReport:  # fmt: skip
    method, options = correction.method, correction.options
    assert method is not None and options is not None
    results = correction.ordered_results()
    rows = [{"module": r.name, **r.report} for r in results]
    for row in rows:
        row.setdefault("d_source", correction.refs.d_source)
    shown = options.to_dict()
    if correction.update.kind == "checkpoint":
        shown["reset_others"] = correction.reset_others
    return CorrectionReport(
        method=method.name,
        options=shown,
        adapter=str(correction.update.path),
        out_dir=str(out),
        report_path=str(report_file if report_file is not None else out / DEFAULT_REPORT_NAME),
        d_source=rows[0].get("d_source") if rows else None,
        sources=correction.refs.describe(within=folder),
        modules=rows,
        summary=correction_summary(method, options, results, rows, untargeted, reset_others=correction.reset_others),
        untargeted=untargeted,
        columns=method.report_columns,
    )
