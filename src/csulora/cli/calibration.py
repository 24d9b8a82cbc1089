"""``csulora calibrate``: argument parsing over :func:`csulora.references.calibration.calibrate`."""

from __future__ import annotations

import argparse

from csulora.cli.common import add_device_flags, device_options
from csulora.eval.generation import DEFAULT_BATCH_SIZE
from csulora.references.calibration import CALIBRATION_MAX_NEW_TOKENS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "calibrate",
        help="measure the aligned model's activation statistics for the calibrated correction",
        description="Run ALIGNED on harmful prompts (each followed by its own greedy answer) and on the "
        "adapter's task data, and write per target module the Gram of its inputs on each set "
        "(docs/design.md §5c). Once per aligned model and task. The aligned model's answers are cached "
        "(--answer-cache), so a calibration of the same model for another task generates nothing. "
        "Beside the output, OUTPUT.run.json records the run's timings and machine; the statistics file "
        "itself is byte-identical on a rerun.",
    )
    parser.add_argument("aligned", metavar="ALIGNED", help="aligned checkpoint folder (safetensors) or hub id")
    parser.add_argument(
        "-o", "--output", required=True, metavar="FILE.safetensors",
        help="statistics file to write (never inside ALIGNED or onto an input)",
    )  # fmt: skip
    parser.add_argument(
        "--task", required=True, metavar="FILE.jsonl|date:train",
        help='the adapter\'s training data (JSONL of {"prompt", "response"}) or date:train; '
        "never a split tune selects on or a test split",
    )  # fmt: skip
    parser.add_argument(
        "--harmful", nargs="+", metavar="SPEC",
        help="harmful prompt sets replacing the default (AdvBench align + requests); must not share a "
        "prompt with any validation or test set",
    )  # fmt: skip
    parser.add_argument(
        "--targets", metavar="LIST",
        help="comma-separated module names or suffixes (default: every linear layer in the decoder blocks)",
    )  # fmt: skip
    add_generation_flags(parser)
    parser.add_argument(
        "--memory-budget", type=float, metavar="GB",
        help="memory the Gram sums of one pass may take; more groups than fit are done in several passes "
        "over the tokens (default: half the memory free once the model is loaded)",
    )  # fmt: skip
    add_device_flags(parser)
    parser.add_argument("--force", action="store_true", help="replace an existing output file (and its run record)")
    parser.set_defaults(handler=run_calibrate)


def add_generation_flags(parser: argparse.ArgumentParser) -> None:
    """The aligned model's answers: their length, the batch size, and their cache."""
    parser.add_argument(
        "--max-new-tokens", type=int, default=CALIBRATION_MAX_NEW_TOKENS,
        help=f"length of the aligned model's greedy answers (default {CALIBRATION_MAX_NEW_TOKENS}, as "
        "tune --calibration-task)",
    )  # fmt: skip
    parser.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
        help=f"sequences per batch, for generation and statistics (default {DEFAULT_BATCH_SIZE})",
    )  # fmt: skip
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument(
        "--answer-cache", metavar="DIR",
        help="folder of cached aligned-model answers (default: $CSULORA_CACHE/calibration-answers, else "
        "~/.cache/csulora/calibration-answers)",
    )  # fmt: skip
    cache.add_argument(
        "--no-answer-cache", action="store_true", help="generate the answers, neither reading nor storing them"
    )


def run_calibrate(args: argparse.Namespace) -> int:
    from csulora.references.calibration import calibrate

    answer_cache = False if args.no_answer_cache else (args.answer_cache or True)
    result = calibrate(
        args.aligned, args.output, task=args.task, harmful=args.harmful, targets=args.targets,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, memory_budget_gb=args.memory_budget,
        force=args.force, answer_cache=answer_cache, **device_options(args),
    )  # fmt: skip
    harmful, task = result.info["harmful"], result.info["task"]
    passes = "one pass" if result.passes == 1 else f"{result.passes} passes"
    generation = "answers read from the cache" if result.answers_read_back else (
        f"generation {result.seconds['generation']:.1f} s"
    )  # fmt: skip
    print(
        f"wrote {result.path}: {len(result.modules)} modules in {len(result.groups)} Gram groups ({passes}); "
        f"harmful {harmful['prompts']} prompts, {result.harmful_tokens} tokens; "
        f"task {task['examples']} examples, {result.task_tokens} tokens; "
        f"{generation}, statistics {result.seconds['statistics']:.1f} s; run record {result.record_path}"
    )
    return 0
