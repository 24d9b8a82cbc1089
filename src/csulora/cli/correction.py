"""``csulora subspace | audit | correct``: thin commands over :mod:`csulora.pipeline.api`.

Method flags are not written here: they come from each registered method's config
dataclass (field name -> ``--flag``, metadata ``help``/``choices``, the type from the
annotation), so ``--method`` choices, flags and help text live with the methods. A flag
given for a method that does not take it is an error (raised by the registry).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any

from csulora.errors import OptionError
from csulora.methods.base import flag_name

# ADAPTER of audit/correct: either input kind (csulora.io.input_kind; docs/design.md §5d).
INPUT_HELP = (
    "PEFT LoRA adapter folder, or a fully fine-tuned checkpoint folder (config.json + model*.safetensors; "
    "its update is W_ft - W_aligned, so --aligned is required)"
)
# SubspaceConfig fields exposed on the command line (the randomized-SVD knobs included).
SUBSPACE_FIELDS = ("rank", "energy", "max_rank", "seed", "oversample", "power_iterations", "power_tolerance", "algorithm")


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_subspace(subparsers)
    _register_audit(subparsers)
    _register_correct(subparsers)


# -- flags from dataclasses ----------------------------------------------------------------------
def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _field_type(cls: type, field: dataclasses.Field) -> tuple[Any, list[Any] | None]:
    """(argparse type, choices) of a config field from its annotation and metadata."""
    hints = typing.get_type_hints(cls)
    hint = hints.get(field.name, str)
    choices = field.metadata.get("choices")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        non_none = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        hint = non_none[0] if len(non_none) == 1 else str
        origin = typing.get_origin(hint)
    if origin is typing.Literal:
        literal = list(typing.get_args(hint))
        return type(literal[0]), choices or literal
    if hint is bool:
        return _parse_bool, choices
    if hint in (int, float, str):
        return hint, choices
    return str, choices


def _metavar(kind: Any) -> str | None:
    return {int: "N", float: "X"}.get(kind)


def _add_subspace_flags(parser: argparse.ArgumentParser, *, title: str) -> None:
    from csulora.linalg.subspace import SubspaceConfig

    group = parser.add_argument_group(title)
    fields = {f.name: f for f in dataclasses.fields(SubspaceConfig)}
    exclusive = group.add_mutually_exclusive_group()
    for name in SUBSPACE_FIELDS:
        field = fields[name]
        kind, choices = _field_type(SubspaceConfig, field)
        help_text = field.metadata.get("help", "")
        if field.default is not None:
            help_text += f" (default {field.default})"
        target = exclusive if name in ("rank", "energy") else group
        target.add_argument(
            flag_name(name), dest=f"sub_{name}", type=kind, choices=choices, default=None,
            metavar=None if choices else _metavar(kind), help=help_text,
        )


def _subspace_config(args: argparse.Namespace) -> Any:
    """A SubspaceConfig from the flags that were given; None when none were."""
    from csulora.linalg.subspace import SubspaceConfig

    given = {name: getattr(args, f"sub_{name}") for name in SUBSPACE_FIELDS}
    given = {name: value for name, value in given.items() if value is not None}
    if not given:
        return None
    return SubspaceConfig(**given)


def _add_method_flags(parser: argparse.ArgumentParser) -> list[str]:
    """One flag per config field over all methods; returns the dest names."""
    from csulora.methods.registry import METHODS

    owners: dict[str, list[tuple[str, dataclasses.Field, type]]] = {}
    for method in METHODS.values():
        for field in dataclasses.fields(method.config_cls):
            owners.setdefault(field.name, []).append((method.name, field, method.config_cls))
    group = parser.add_argument_group(
        "method options", "each flag applies only to the methods named in its brackets; defaults per method"
    )
    for name, entries in owners.items():
        _, field, cls = entries[0]
        kind, choices = _field_type(cls, field)
        defaults = [
            f"{method}: {f.default}" for method, f, _ in entries if f.default not in (dataclasses.MISSING, None)
        ]
        help_text = f"[{', '.join(m for m, _, _ in entries)}] {_merged_help(entries)}"
        if defaults:
            help_text += f" (default {'; '.join(defaults)})"
        group.add_argument(
            flag_name(name), dest=f"opt_{name}", type=kind, choices=choices, default=None,
            metavar=None if choices else _metavar(kind), help=help_text,
        )
    return list(owners)


def _merged_help(entries: Sequence[tuple[str, dataclasses.Field, type]]) -> str:
    """One flag's help over the methods that share it, each distinct text said once:
    ``text`` when all agree, else ``m1, m2: text; m3: other text``."""
    by_text: dict[str, list[str]] = {}
    for method, field, _ in entries:
        text = field.metadata.get("help", "")
        if text:
            by_text.setdefault(text, []).append(method)
    if len(by_text) <= 1:
        return next(iter(by_text), "")
    return "; ".join(f"{', '.join(methods)}: {text}" for text, methods in by_text.items())


def _method_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        key[len("opt_"):]: value for key, value in vars(args).items() if key.startswith("opt_") and value is not None
    }


def _add_source_flags(parser: argparse.ArgumentParser, *, calibration: bool = False) -> None:
    where_d = "where D comes from: --subspace, or --base and --aligned"
    description = f"{where_d} (as the method needs); --calibration for --method calibrated" if calibration else where_d
    group = parser.add_argument_group("inputs", description)
    group.add_argument("--subspace", metavar="FILE", help="subspace cache written by `csulora subspace`")
    group.add_argument("--base", metavar="BASE", help="base checkpoint folder (safetensors)")
    group.add_argument("--aligned", metavar="ALIGNED", help="aligned checkpoint folder (safetensors)")
    if calibration:
        group.add_argument(
            "--calibration", metavar="FILE",
            help="the aligned model's activation statistics written by `csulora calibrate` (calibrated, safedelta)",
        )
        group.add_argument(
            "--update-statistics", metavar="FILE",
            help="the fine-tuned model's activation statistics, for antidote "
            "(`csulora calibrate ALIGNED --update ADAPTER --pairs FILE.jsonl -o FILE`)",
        )


def _add_targets_flag(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--targets", metavar="LIST", help=f"comma-separated module names or suffixes ({default})"
    )


# -- subspace -------------------------------------------------------------------------------------
def _register_subspace(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "subspace",
        help="compute the safety subspace of a base/aligned pair and cache it",
        description="Top-k SVD of D = W_aligned - W_base for every target linear layer, streamed one "
        "tensor pair at a time, cached to one .safetensors file.",
    )
    parser.add_argument("base", metavar="BASE", help="base checkpoint folder (safetensors)")
    parser.add_argument("aligned", metavar="ALIGNED", help="aligned checkpoint folder (safetensors)")
    parser.add_argument("-o", "--output", required=True, metavar="FILE.safetensors", help="cache file to write")
    parser.add_argument("--force", action="store_true", help="replace FILE if it exists")
    _add_targets_flag(parser, "default: every linear layer in the decoder blocks")
    _add_subspace_flags(parser, title="subspace options")
    parser.set_defaults(handler=_run_subspace)


def _run_subspace(args: argparse.Namespace) -> int:
    from csulora.references.subspace import build_subspace
    from csulora.io.subspace_cache import load_subspace_cache

    config = _subspace_config(args)
    path = build_subspace(args.base, args.aligned, args.output, config=config, targets=args.targets, force=args.force)
    cache = load_subspace_cache(path)
    entries = list(cache.entries.values())
    ranks = [e.rank for e in entries]
    energies = [e.energy for e in entries if e.rank]
    mean_energy = sum(energies) / len(energies) if energies else 0.0
    print(
        f"wrote {path}: {len(entries)} modules, rank {min(ranks)}-{max(ranks)}, "
        f"mean captured energy {mean_energy:.3f}, {sum(1 for r in ranks if r == 0)} untouched (D == 0)"
    )
    return 0


# -- audit ----------------------------------------------------------------------------------------
def _register_audit(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "audit",
        help="report how an adapter's (or full fine-tune's) update sits against the safety subspace (changes nothing)",
        description="Per module: rho_F/rho_P/rho_O, the Safe LoRA cosine, cos(dW, D), ||dW||/||D||.",
    )
    parser.add_argument("adapter", metavar="ADAPTER", help=INPUT_HELP)
    _add_source_flags(parser)
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="plot per-layer rho_F/rho_P/rho_O")
    parser.add_argument("--force", action="store_true", help="replace the --json / --plot files if they exist")
    _add_targets_flag(parser, "default: every module of the adapter")
    _add_subspace_flags(parser, title="subspace options (computed from --base/--aligned; not with --subspace)")
    parser.set_defaults(handler=_run_audit)


def _run_audit(args: argparse.Namespace) -> int:
    from csulora.pipeline.api import audit_adapter
    from csulora.io.atomic import check_apart, check_output_file

    config = _subspace_config(args)
    if args.plot is not None and Path(args.plot).suffix.lower() != ".png":
        raise OptionError(f"--plot {args.plot}: expected a .png file name")
    outputs = {"--json": args.json, "--plot": args.plot}
    for flag, value in outputs.items():
        if value is not None:
            check_output_file(value, args.force, flag=flag)  # before any tensor is read
    inputs = {"ADAPTER": args.adapter, "--subspace": args.subspace, "--base": args.base, "--aligned": args.aligned}
    check_apart(outputs, inputs)  # --force never lets a report replace or enter an input
    report = audit_adapter(
        args.adapter, subspace=args.subspace, base=args.base, aligned=args.aligned, subspace_config=config,
        targets=args.targets,
    )
    print(report.format_table())
    if args.json is not None:
        report.to_json(args.json)
        print(f"wrote {args.json}")
    if args.plot is not None:
        from csulora.pipeline.plots import plot_audit

        plot_audit(report.modules, args.plot)
        print(f"wrote {args.plot}")
    return 0


# -- correct --------------------------------------------------------------------------------------
def _register_correct(subparsers: argparse._SubParsersAction) -> None:
    from csulora.methods.registry import METHODS

    method_lines = "\n".join(
        f"  {m.name:9s} {m.pretty_name}" + (f" ({m.paper_url})" if m.paper_url else "") for m in METHODS.values()
    )
    parser = subparsers.add_parser(
        "correct",
        help="write a corrected copy of a LoRA adapter or of a fully fine-tuned checkpoint",
        description=f"methods:\n{method_lines}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("adapter", metavar="ADAPTER", help=INPUT_HELP)
    parser.add_argument(
        "-o", "--output", required=True, metavar="OUTDIR",
        help="folder for the corrected adapter (a checkpoint folder for a checkpoint input)",
    )  # fmt: skip
    parser.add_argument(
        "--reset-others", action="store_true",
        help="checkpoint input: copy the tensors outside the targets (embeddings, norms, LM head, ...) from "
        "ALIGNED instead of the fine-tuned checkpoint",
    )  # fmt: skip
    parser.add_argument(
        "--lora-rank", type=int, metavar="R",
        help="adapter input, method with only a dense form (e.g. safedelta): write the corrected update as its "
        "best rank-R LoRA (the report gives the energy dropped) instead of the corrected model",
    )  # fmt: skip
    _add_source_flags(parser, calibration=True)
    parser.add_argument("--method", required=True, choices=list(METHODS), help="correction method")
    parser.add_argument("--force", action="store_true", help="replace OUTDIR if it exists")
    parser.add_argument("--report", metavar="FILE", help="per-module report JSON (default OUTDIR/csulora_report.json)")
    whole = [m.name for m in METHODS.values() if m.corrects_every_module]
    refused = f"; --method {', '.join(whole)} must correct every module and refuses a --targets that leaves one out"
    _add_targets_flag(
        parser, "default: every module of the adapter; the others are copied unchanged" + (refused if whole else "")
    )
    _add_method_flags(parser)
    _add_subspace_flags(parser, title="subspace options (computed from --base/--aligned; not with --subspace)")
    parser.set_defaults(handler=_run_correct)


def _run_correct(args: argparse.Namespace) -> int:
    from csulora.pipeline.api import correct_adapter
    from csulora.methods.registry import get_method, make_config

    options = _method_options(args)
    make_config(get_method(args.method), options)  # flag/method mismatches before anything else
    config = _subspace_config(args)
    report = correct_adapter(
        args.adapter,
        args.output,
        args.method,
        subspace=args.subspace,
        base=args.base,
        aligned=args.aligned,
        force=args.force,
        report_path=args.report,
        subspace_config=config,
        targets=args.targets,
        calibration=args.calibration,
        reset_others=args.reset_others,
        lora_rank=args.lora_rank,
        update_statistics=args.update_statistics,
        **options,
    )
    print(report.format_table())
    print(f"wrote {report.out_dir} (report: {report.report_path})", file=sys.stdout)
    return 0
