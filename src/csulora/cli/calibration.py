"""``csulora calibrate``: argument parsing over :func:`csulora.references.calibration.calibrate` and,
with ``--update``, :func:`csulora.references.calibration.calibrate_update` (Antidote's statistics)."""

from __future__ import annotations

import argparse

from csulora.cli.common import add_device_flags, add_framing_flag, device_options
from csulora.errors import OptionError
from csulora.eval.generation import DEFAULT_BATCH_SIZE
from csulora.references.calibration import CALIBRATION_MAX_NEW_TOKENS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "calibrate",
        help="measure activation statistics: the aligned model's (calibrated, safedelta) or, with --update, "
        "the fine-tuned model's (antidote)",
        description="Run ALIGNED on harmful prompts (each followed by its own greedy answer) and on the "
        "adapter's task data, and write per target module the Gram of its inputs on each set "
        "(docs/design.md §5c). Once per aligned model and task. The aligned model's answers are cached "
        "(--answer-cache), so a calibration of the same model for another task generates nothing. "
        "With --update UPDATE --pairs FILE.jsonl instead: write Antidote's statistics, the Gram of each "
        "module's inputs when the fine-tuned model (ALIGNED with the adapter UPDATE merged, or the full "
        "fine-tune UPDATE) reads each harmful prompt followed by its harmful answer from FILE.jsonl "
        "(nothing generated, no task pass); correct/tune --method antidote read it as --update-statistics. "
        "Beside the output, OUTPUT.run.json records the run's timings and machine; the statistics file "
        "itself is byte-identical on a rerun.",
    )
    parser.add_argument("aligned", metavar="ALIGNED", help="aligned checkpoint folder (safetensors) or hub id")
    parser.add_argument(
        "-o", "--output", required=True, metavar="FILE.safetensors",
        help="statistics file to write (never inside ALIGNED or onto an input)",
    )  # fmt: skip
    parser.add_argument(
        "--task", metavar="FILE.jsonl|date:train",
        help='the adapter\'s training data (JSONL of {"prompt", "response"}), date:train or triage:train; '
        "never a split tune selects on or a test split (required unless --update)",
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
    add_framing_flag(parser, "the harmful and the task prompts, for their answers and statistics (recorded in the file)")
    add_generation_flags(parser)
    add_update_flags(parser)
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


def add_update_flags(parser: argparse.ArgumentParser) -> None:
    """The fine-tuned model's statistics (Antidote's): the update and the harmful pairs."""
    group = parser.add_argument_group("the fine-tuned model's statistics, for antidote (instead of --task)")
    group.add_argument(
        "--update", metavar="UPDATE",
        help="a PEFT adapter trained on ALIGNED (run merged into it) or a full fine-tune of ALIGNED: write its "
        "statistics, which correct/tune --method antidote read as --update-statistics",
    )  # fmt: skip
    group.add_argument(
        "--pairs", metavar="FILE.jsonl",
        help='with --update: JSONL of {"prompt", "response"}, each a harmful prompt followed by a harmful answer '
        "(read as given; every token of both counts)",
    )  # fmt: skip


def check_mode(args: argparse.Namespace) -> None:
    """``--task`` or ``--update`` with ``--pairs``; flags of the other mode are refused, not ignored."""
    if args.update is None:
        if args.pairs is not None:
            raise OptionError("--pairs applies with --update UPDATE (Antidote's statistics of the fine-tuned model)")
        if args.task is None:
            raise OptionError(
                "give --task FILE.jsonl|date:train (the aligned model's statistics), or --update UPDATE --pairs "
                "FILE.jsonl (the fine-tuned model's, for antidote)"
            )
        return
    if args.pairs is None:
        raise OptionError("--update needs --pairs FILE.jsonl: harmful prompts, each with a harmful answer")
    given = {
        "--task": args.task is not None, "--harmful": args.harmful is not None,
        "--answer-cache": args.answer_cache is not None, "--no-answer-cache": args.no_answer_cache,
        "--max-new-tokens": args.max_new_tokens != CALIBRATION_MAX_NEW_TOKENS,
        "--framing": args.framing is not None,
    }  # fmt: skip
    for flag, present in given.items():
        if present:
            raise OptionError(
                f"{flag} does not apply with --update: the fine-tuned model reads --pairs as given "
                "(no task pass, nothing generated)"
            )


def run_calibrate(args: argparse.Namespace) -> int:
    from csulora.references.calibration import calibrate

    check_mode(args)
    if args.update is not None:
        return run_calibrate_update(args)
    answer_cache = False if args.no_answer_cache else (args.answer_cache or True)
    result = calibrate(
        args.aligned, args.output, task=args.task, harmful=args.harmful, targets=args.targets,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, memory_budget_gb=args.memory_budget,
        force=args.force, answer_cache=answer_cache, framing=args.framing, **device_options(args),
    )  # fmt: skip
    harmful, task = result.info["harmful"], result.info["task"]
    framed = "" if result.info["framing"]["name"] == "plain" else f" (framing {result.info['framing']['name']})"
    passes = "one pass" if result.passes == 1 else f"{result.passes} passes"
    generation = "answers read from the cache" if result.answers_read_back else (
        f"generation {result.seconds['generation']:.1f} s"
    )  # fmt: skip
    print(
        f"wrote {result.path}: {len(result.modules)} modules in {len(result.groups)} Gram groups ({passes}); "
        f"harmful {harmful['prompts']} prompts, {result.harmful_tokens} tokens; "
        f"task {task['examples']} examples, {result.task_tokens} tokens{framed}; "
        f"{generation}, statistics {result.seconds['statistics']:.1f} s; run record {result.record_path}"
    )
    return 0


def run_calibrate_update(args: argparse.Namespace) -> int:
    from csulora.references.calibration import calibrate_update

    result = calibrate_update(
        args.aligned, args.output, update=args.update, pairs=args.pairs, targets=args.targets,
        batch_size=args.batch_size, memory_budget_gb=args.memory_budget, force=args.force, **device_options(args),
    )  # fmt: skip
    passes = "one pass" if result.passes == 1 else f"{result.passes} passes"
    update = result.info["update"]
    print(
        f"wrote {result.path} (antidote's --update-statistics): {len(result.modules)} modules in "
        f"{len(result.groups)} Gram groups ({passes}) of {update['model']}; "
        f"{result.info['pairs']['examples']} pairs, {result.harmful_tokens} tokens; "
        f"statistics {result.seconds['statistics']:.1f} s; run record {result.record_path}"
    )
    return 0
