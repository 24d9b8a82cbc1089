"""``python -m benchmarks.smol``: run, resume or rerun the pipeline's stages."""

from __future__ import annotations

import argparse
import sys
import json
import os
from pathlib import Path

from benchmarks.smol.pipeline import ROW_SETS, STAGES, Context, run_pipeline, set_threads, stage_done
from benchmarks.smol.evaluation import TEST_SETS, VAL_SETS, setting_scores, variant_from_key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.smol", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", help="rerun this one stage (earlier missing stages are computed first)")
    parser.add_argument("--until", help="run the missing stages up to and including this one, then stop")
    parser.add_argument("--cache", default=".cache/smol", help="stage cache folder (not in git)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for smol.json and the generations")
    parser.add_argument("--docs", default="docs", help="folder for results.md and smol_pareto.png")
    parser.add_argument("--workers", type=int, default=int(os.environ.get("CSULORA_SMOL_WORKERS", "4")),
                        help="evaluation processes (one thread each when > 1)")
    parser.add_argument("--rows", choices=list(ROW_SETS), default="all",
                        help="all: every row of the table; issue5: base, aligned, attacked, Safe LoRA and CSULoRA only "
                        "(skips the benign adapter, SaLoRA and the other baselines); full: aligned and the full fine-tune's "
                        "rows; lora: every row but the full fine-tune's; product: base, aligned, the two adapters and tune's "
                        "default pick on each; product+full: both; one cache per row set (lora and full share one)")
    parser.add_argument("--list", action="store_true", help="list the stages and whether each is cached")
    parser.add_argument("--eval", metavar="VARIANT", help="only generate (and cache) one variant's answers, e.g. "
                        "aligned, attacked, benign, base; with --sets val or test (for running beside training)")
    parser.add_argument("--sets", choices=("val", "test"), default="val")
    parser.add_argument("--calibrated-layers", action="store_true",
                        help="print, per layer, what the calibrated correction at tune's pick removed (from its report)")
    args = parser.parse_args(argv)
    set_threads()
    ctx = Context(cache=Path(args.cache), out=Path(args.out), docs=Path(args.docs), workers=max(1, args.workers),
                  rows=ROW_SETS[args.rows])
    if args.list:
        for st in STAGES:
            mark = "cached" if stage_done(ctx, st.name) else "-" if st.wanted(ctx) else "skipped"
            print(f"{st.name:16s} {mark:7s} {st.help}")
        return 0
    if args.calibrated_layers:
        from benchmarks.smol.outputs import calibrated_layers, calibrated_layers_markdown

        print(calibrated_layers_markdown(calibrated_layers(ctx)))
        return 0
    if args.eval:
        scores = setting_scores(ctx, variant_from_key(ctx, args.eval), VAL_SETS if args.sets == "val" else TEST_SETS)
        print(json.dumps(scores.to_dict(), indent=1))
        return 0
    run_pipeline(ctx, only=args.stage, until=args.until)
    return 0


if __name__ == "__main__":
    sys.exit(main())
