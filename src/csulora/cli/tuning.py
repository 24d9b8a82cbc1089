"""`csulora tune`: choose a correction's strength on validation data (thin over the API).

Everything is decided in :mod:`csulora.tuning`; this module parses arguments, builds a
:class:`~csulora.tuning.TuneConfig` (which validates every option before any model is
read), calls :func:`~csulora.tuning.tune_adapter`, and prints the sweep. Exit code 0
when a setting was chosen, 1 when none qualified (tune.json is still written), 2 on
bad input.
"""

from __future__ import annotations

import argparse

from csulora.errors import OptionError
from csulora.methods.registry import get_method, tunable_methods
from csulora.tuning.config import DEFAULT_MAX_NEW_TOKENS, DEFAULT_METHOD, TuneConfig, parse_grid

NO_SETTING_QUALIFIES = 1


def _default_grids() -> str:
    grids = {name: get_method(name).tuning for name in tunable_methods()}
    return "; ".join(f"{m}: {t.knob} {','.join(f'{v:g}' for v in t.grid)}" for m, t in grids.items() if t is not None)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "tune",
        help="choose a correction's strength on validation data and write the corrected adapter",
        description=(
            "Sweep one knob of a correction method from weakest to strongest, score every setting "
            "by keyword ASR on each harmful validation source (and task exact match with --task), "
            "and keep the weakest setting whose ASR is within --max-asr-gap of the aligned model's "
            "and whose utility drop is within --max-utility-drop. Writes the chosen adapter, "
            "tune.json and tune.png to OUTDIR. Exit 1 when no setting qualifies."
        ),
    )
    p.add_argument("adapter", metavar="ADAPTER", help="PEFT LoRA adapter folder trained on ALIGNED")
    p.add_argument("-o", "--output", metavar="OUTDIR", required=True, help="output folder")
    p.add_argument("--aligned", metavar="ALIGNED", required=True, help="the model the adapter was trained on")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--subspace", metavar="FILE", help="subspace cache from `csulora subspace`")
    source.add_argument("--base", metavar="BASE", help="base checkpoint; D = ALIGNED - BASE is streamed")
    p.add_argument(
        "--method", choices=tunable_methods(), default=DEFAULT_METHOD, help=f"method whose knob is swept ({DEFAULT_METHOD})"
    )
    p.add_argument(
        "--grid",
        metavar="LIST",
        help=f"comma-separated knob values, tried weakest first (defaults: {_default_grids()})",
    )
    p.add_argument(
        "--restore",
        type=float,
        metavar="B",
        help="csulora only: restore beta held fixed while gamma is swept (default 0)",
    )
    p.add_argument(
        "--harmful",
        nargs="+",
        metavar="FILE",
        help="harmful validation prompts, one source per file or set spec, each judged on its own "
        "(default: advbench:validation and airt:val, from pyrit); never a test split",
    )
    p.add_argument("--task", metavar="FILE.jsonl", help='task validation data, {"prompt", "response"} per line')
    p.add_argument("--benign", metavar="FILE", help="benign prompts: adds over-refusal to the scores")
    p.add_argument("--max-asr-gap", type=float, default=0.05, metavar="GAP", help="largest ASR above the aligned model's (0.05)")
    p.add_argument(
        "--max-utility-drop",
        type=float,
        default=0.05,
        metavar="FRACTION",
        help="largest utility drop as a fraction of the uncorrected adapter's (0.05)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=DEFAULT_MAX_NEW_TOKENS,
        metavar="N",
        help=f"greedy tokens per answer (eval's default, {DEFAULT_MAX_NEW_TOKENS})",
    )
    p.add_argument("--force", action="store_true", help="replace a non-empty OUTDIR")
    p.set_defaults(handler=run_tune)


def config_from_args(args: argparse.Namespace) -> TuneConfig:
    options = {}
    if args.restore is not None:
        if args.method != "csulora":
            hint = " (for resta the restore is the swept knob: use --grid)" if args.method == "resta" else ""
            raise OptionError(f"--restore applies to --method csulora only{hint}")
        options["restore"] = args.restore
    return TuneConfig(
        method=args.method,
        grid=parse_grid(args.grid) if args.grid is not None else None,
        max_asr_gap=args.max_asr_gap,
        max_utility_drop=args.max_utility_drop,
        max_new_tokens=args.max_new_tokens,
        method_options=options,
    )


def run_tune(args: argparse.Namespace) -> int:
    from csulora.tuning.runner import tune_adapter

    config = config_from_args(args)
    result = tune_adapter(
        args.adapter,
        args.output,
        aligned=args.aligned,
        subspace=args.subspace,
        base=args.base,
        config=config,
        harmful=args.harmful,
        task=args.task,
        benign=args.benign,
        force=args.force,
    )
    print(format_sweep(result.record))
    for note in list(result.record["choice"]["notes"]) + list(result.record.get("warnings", [])):
        print(f"note: {note}")
    if not result.qualified:
        print(f"csulora tune: {result.selection.summary}; sweep written to {result.out_dir}")
        return NO_SETTING_QUALIFIES
    print(f"chose {result.selection.summary}")
    print(f"corrected adapter, tune.json and tune.png written to {result.out_dir}")
    return 0


def format_sweep(record: dict) -> str:
    """A plain-text table of the sweep: one row per model state, ASR per source."""
    sources = list(record["aligned"]["asr"])
    knob = record["config"]["knob"]
    header = [knob] + [f"ASR {s}" for s in sources] + ["utility", "over-refusal", "margin", "verdict"]

    def cells(label: str, scores: dict, verdict: str) -> list[str]:
        row = [label] + [f"{scores['asr'][s]['value']:.2f}" for s in sources]
        row.append(f"{scores['utility']['value']:.2f}" if scores["utility"] else "-")
        row.append(f"{scores['over_refusal']['value']:.2f}" if scores["over_refusal"] else "-")
        row.append(f"{scores['margin']:.2f}" if scores.get("margin") is not None else "-")
        return row + [verdict]

    rows = [cells("aligned", record["aligned"], "reference")]
    if record["adapter"] is not None:
        rows.append(cells("adapter", record["adapter"], "uncorrected"))
    for setting in record["settings"]:
        verdict = setting["verdict"]
        text = "CHOSEN" if setting["chosen"] else ("qualifies" if verdict["qualifies"] else "no")
        if not verdict["qualifies"]:
            why = []
            if verdict["failed_sources"]:
                why.append("ASR on " + ",".join(verdict["failed_sources"]))
            if not verdict["utility_ok"]:
                why.append("utility")
            text += f" ({'; '.join(why)})"
        rows.append(cells(f"{setting['value']:g}", setting["scores"], text))
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]
    return "\n".join(lines)
