"""``python -m benchmarks.smol``: run, resume or rerun the pipeline's stages."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from benchmarks.smol.pipeline import ROW_SETS, STAGES, Context, run_pipeline, set_threads, stage_done
from benchmarks.smol.evaluation import TEST_SETS, VAL_SETS, generations, reference_variants


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
                        help="all: every row of the table; adapters: every row but the full fine-tune's (its tune "
                        "run is the longest stage)")
    parser.add_argument("--list", action="store_true", help="list the stages and whether each is cached")
    parser.add_argument("--eval", metavar="VARIANT", help="only generate (and cache) one reference model's answers: "
                        "base, aligned, attacked, benign, full-attacked or salora; with --sets val or test")
    parser.add_argument("--sets", choices=("val", "test"), default="val")
    args = parser.parse_args(argv)
    set_threads()
    ctx = Context(cache=Path(args.cache), out=Path(args.out), docs=Path(args.docs), workers=max(1, args.workers),
                  rows=ROW_SETS[args.rows])
    if args.list:
        for st in STAGES:
            mark = "cached" if stage_done(ctx, st.name) else "-" if st.wanted(ctx) else "skipped"
            print(f"{st.name:16s} {mark:7s} {st.help}")
        return 0
    if args.eval:
        refs = reference_variants(ctx)
        if args.eval not in refs:
            raise SystemExit(f"--eval: one of {', '.join(refs)}")
        for name, records in generations(ctx, refs[args.eval], VAL_SETS if args.sets == "val" else TEST_SETS).items():
            print(f"{name}: {len(records)} answers")
        return 0
    run_pipeline(ctx, only=args.stage, until=args.until)
    return 0


if __name__ == "__main__":
    sys.exit(main())
