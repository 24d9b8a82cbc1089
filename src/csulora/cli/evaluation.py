"""``csulora eval | train | demo``: thin commands over the evaluation and training API."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from csulora.cli.common import add_device_flags, add_framing_flag, add_output_flag, device_options
from csulora.errors import OptionError

TRAIN_METHODS = ("full", "lora", "salora")


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_eval(subparsers)
    _register_train(subparsers)
    _register_demo(subparsers)


# --------------------------------------------------------------------------- eval


def _register_eval(subparsers) -> None:
    from csulora.eval.generation import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS
    from csulora.eval.specs import DEFAULT_TEST_BENIGN, DEFAULT_TEST_HARMFUL

    p = subparsers.add_parser(
        "eval",
        help="measure ASR, over-refusal and task utility of a model (+ adapter)",
        description=(
            "Generate greedy answers (batched, chat template) to harmful, benign and task prompts and "
            "judge them: ASR (docs/judge.md: no GCG refusal string, no opening refusal, on-topic, not degenerate), "
            "over-refusal, exact-match utility, each with a bootstrap 95% interval; ASR and the share of empty "
            "answers per harmful source. SPEC: advbench[:align|attack|validation|test], objectives[:validation|test], "
            "airt[:val|test], benign[:validation|test], FILE.txt, "
            "FILE.csv:COLUMN, FILE.jsonl[:FIELD]; a harmful SPEC may end in @FRAMING (e.g. advbench:test@aoa: "
            "the same prompts in the identity-shift framing, a source of its own); "
            "task SPEC: date:SPLIT or FILE.jsonl of {prompt, response}. "
            "Writes OUTDIR/results.json, generations.jsonl and summary.md."
        ),
    )
    p.add_argument("model", metavar="MODEL", help="checkpoint folder (safetensors) or hub id (fetched first)")
    p.add_argument("--adapter", metavar="DIR", help="PEFT adapter folder (or hub id), merged into MODEL")
    p.add_argument(
        "--harmful", metavar="SPEC", nargs="+",
        help="harmful prompts, one source per spec, each reported on its own: ASR with its interval and n, and the "
        f"share of empty answers (default: {' '.join(DEFAULT_TEST_HARMFUL)})",
    )  # fmt: skip
    p.add_argument("--ood", metavar="SPEC", help="one more harmful source, appended to --harmful's (or to the default "
                   "ones); kept for older command lines, the same as naming it last in --harmful")  # fmt: skip
    p.add_argument("--benign", metavar="SPEC", default=DEFAULT_TEST_BENIGN,
                   help="benign prompts (over-refusal, short answers; default %(default)s)")
    p.add_argument("--task", metavar="SPEC", help="task items (utility), e.g. date:test")
    add_framing_flag(p, "every prompt (a harmful SPEC@FRAMING keeps its own)")
    add_output_flag(p, "folder for results.json, generations.jsonl and summary.md")
    p.add_argument("--name", help="row name in results.json (default: adapter or model folder name)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="prompts per batch (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="greedy tokens per answer (default %(default)s)")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUTDIR")
    add_device_flags(p)
    p.set_defaults(handler=_run_eval)


def _run_eval(args) -> int:
    from csulora.eval.harness import GenerationSettings, run_eval, summary_markdown

    out = run_eval(
        args.model, args.output, harmful=_harmful_specs(args), benign=args.benign, task=args.task,
        adapter=args.adapter, name=args.name, force=args.force, framing=args.framing,
        generation=GenerationSettings(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens),
        **device_options(args),
    )
    rows = json.loads((Path(out) / "results.json").read_text())["rows"]
    print(summary_markdown(rows).rstrip())
    print(f"wrote {out}/results.json, generations.jsonl, summary.md")
    return 0


def _harmful_specs(args) -> list[str]:
    """--harmful's sources (or the default test sources), then --ood's, appended as one more."""
    from csulora.eval.specs import DEFAULT_TEST_HARMFUL

    return [*(args.harmful or DEFAULT_TEST_HARMFUL), *([args.ood] if args.ood else [])]


# --------------------------------------------------------------------------- train


def _register_train(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="fine-tune a model: full (alignment), lora (adapter) or salora (safety-preserving adapter)",
        description=(
            "Fine-tune on JSONL {prompt, response} with the chat template, loss on response tokens. "
            "full: writes a safetensors checkpoint + tokenizer; lora/salora: a PEFT adapter folder."
        ),
    )
    p.add_argument("model", metavar="MODEL", help="checkpoint folder (safetensors) or hub id (fetched first)")
    p.add_argument("--data", metavar="FILE.jsonl", required=True, help="training pairs {prompt, response}")
    p.add_argument("--method", choices=TRAIN_METHODS, required=True)
    add_output_flag(p, "folder for the checkpoint (full) or the PEFT adapter (lora, salora)")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUTDIR")
    add_device_flags(p)
    g = p.add_argument_group("optimisation (defaults: full/lora from TrainConfig, salora from SaLoRAConfig)")
    g.add_argument("--steps", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--max-length", type=int)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--warmup", type=int, help="warm-up steps (full/lora)")
    g.add_argument("--grad-clip", type=float, help="max gradient norm, 0 = off (full/lora)")
    g.add_argument("--scheduler", help="linear | cosine | constant | constant_with_warmup (full/lora)")
    g.add_argument("--freeze-embeddings", action="store_true", help="full: keep the (tied) embeddings fixed")
    lo = p.add_argument_group("lora / salora")
    lo.add_argument("--rank", type=int, help="LoRA rank (lora default 8, salora default 16)")
    lo.add_argument("--alpha", type=float, help="lora_alpha (lora default 16)")
    lo.add_argument("--targets", help="comma-separated module names (lora: all 7 projections; salora: q_proj,v_proj)")
    lo.add_argument("--dropout", type=float, help="LoRA dropout (lora)")
    lo.add_argument("--rslora", action="store_true", help="rank-stabilised scaling alpha/sqrt(r) (lora)")
    sa = p.add_argument_group("salora")
    sa.add_argument("--safety-data", metavar="FILE.jsonl", help="harmful prompts; refusals are the model's own answers")
    sa.add_argument("--safety-rank", type=int, help="r_s (default 32)")
    sa.add_argument("--task-rank", type=int, help="r_t (default 32)")
    sa.add_argument("--num-samples", type=int, help="samples of safety and of task data per feature pass (default 128)")
    sa.add_argument("--max-new-tokens", type=int, help="length of the aligned model's greedy refusals (default 64)")
    sa.add_argument("--cache-dir", metavar="DIR", help="where feature passes are cached (default: the user cache)")
    p.set_defaults(handler=_run_train)


def _given(args, names: tuple[str, ...]) -> dict:
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def _targets(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    targets = tuple(t.strip() for t in text.split(",") if t.strip())
    if not targets:
        raise OptionError("--targets is empty")
    return targets


def _run_train(args) -> int:
    from csulora.training.trainer import LoraSettings, TrainConfig, train_full, train_lora

    lora_only = {"--rank": args.rank, "--alpha": args.alpha, "--targets": args.targets, "--dropout": args.dropout}
    salora_only = {
        "--safety-data": args.safety_data, "--safety-rank": args.safety_rank, "--task-rank": args.task_rank,
        "--num-samples": args.num_samples, "--max-new-tokens": args.max_new_tokens, "--cache-dir": args.cache_dir,
    }
    if args.method != "salora":
        stray = [k for k, v in salora_only.items() if v is not None]
        if stray:
            raise OptionError(f"{', '.join(stray)} only apply to --method salora")
    if args.method == "full":
        stray = [k for k, v in lora_only.items() if v is not None] + (["--rslora"] if args.rslora else [])
        if stray:
            raise OptionError(f"{', '.join(stray)} do not apply to --method full")
    from csulora.io.hub import resolve_model_dir

    args.model = resolve_model_dir(args.model, "MODEL")  # a hub id: fetched once, here
    if args.method == "salora":
        return _run_train_salora(args)
    common = ("steps", "batch_size", "lr", "seed", "max_length", "weight_decay", "warmup", "grad_clip", "scheduler")
    config = TrainConfig(**_given(args, common), freeze_embeddings=args.freeze_embeddings)
    if args.method == "full":
        out = train_full(args.model, args.data, args.output, config, force=args.force, **device_options(args))
    else:
        if args.freeze_embeddings:
            raise OptionError("--freeze-embeddings applies to --method full only")
        lora_kwargs = {"r": args.rank, "alpha": args.alpha, "targets": _targets(args.targets), "dropout": args.dropout}
        lora = LoraSettings(**{k: v for k, v in lora_kwargs.items() if v is not None}, use_rslora=args.rslora)
        out = train_lora(args.model, args.data, args.output, config, lora, force=args.force, **device_options(args))
    print(f"wrote {out}")
    return 0


def _run_train_salora(args) -> int:
    if args.safety_data is None:
        raise OptionError("--method salora needs --safety-data FILE.jsonl (harmful prompts)")
    stray = [f for f, v in (("--alpha", args.alpha), ("--dropout", args.dropout), ("--warmup", args.warmup),
                            ("--grad-clip", args.grad_clip), ("--scheduler", args.scheduler)) if v is not None]
    if args.rslora or args.freeze_embeddings:
        stray.append("--rslora" if args.rslora else "--freeze-embeddings")
    if args.dtype not in (None, "float32"):
        stray.append("--dtype")  # its feature passes are computed and cached in float32
    if stray:
        raise OptionError(f"{', '.join(stray)} do not apply to --method salora")
    from csulora.salora import SaLoRAConfig, train_salora  # the SaLoRA package is loaded only when used

    options = _given(args, ("steps", "batch_size", "lr", "seed", "max_length", "weight_decay"))
    options.update(_given(args, ("rank", "safety_rank", "task_rank", "num_samples", "max_new_tokens")))
    if args.targets is not None:
        options["targets"] = _targets(args.targets)
    # progress=True: the bars (tqdm disable=None) still switch off by themselves off a TTY.
    out = train_salora(
        args.model, args.data, args.safety_data, args.output, config=SaLoRAConfig(**options), force=args.force,
        cache_dir=args.cache_dir, progress=True, device=args.device,
    )
    print(f"wrote {out}")
    return 0


# --------------------------------------------------------------------------- demo


def _register_demo(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="the demo world end to end: align, attack, calibrate, correct with tune's default method and the "
        "baselines, tune's pick, evaluate",
        description="Builds (or reuses, from $CSULORA_CACHE) the demo world (docs/design.md §8) and writes "
        "OUTDIR/results.json, the ASR-utility plot, report.md (with the separability of its task from harm and the "
        "command lines that rerun each step), generations and the calibration statistics.",
    )
    add_output_flag(p, "folder for results.json, report.md, the plot and the generations")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUTDIR")
    p.set_defaults(handler=_run_demo)


def _run_demo(args) -> int:
    from csulora.demo import run_demo

    out = run_demo(args.output, force=args.force)
    print((Path(out) / "report.md").read_text().rstrip())
    print(f"wrote {out}")
    return 0
