"""``python -m benchmarks.smol``: run, resume or rerun the pipeline's stages."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from benchmarks.smol.pipeline import Context, run_pipeline, set_threads, stage_done, world_stages
from benchmarks.smol.evaluation import generations, reference_variants, test_sets, val_sets
from benchmarks.smol.worlds import DATE, WORLDS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.smol", description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", choices=list(WORLDS), default=DATE.name,
                        help="which world's table: date (the original) or triage (issue 24); both share the base, "
                        "splits, aligned model and realign answers, cached once")
    parser.add_argument("--stage", help="rerun this one stage (earlier missing stages are computed first)")
    parser.add_argument("--until", help="run the missing stages up to and including this one, then stop")
    parser.add_argument("--cache", default=".cache/smol", help="stage cache folder (not in git)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the results JSON (smol.json, "
                        "smol_triage.json) and the generations")
    parser.add_argument("--docs", default="docs", help="folder for results.md and smol_pareto.png")
    parser.add_argument("--workers", type=int, default=int(os.environ.get("CSULORA_SMOL_WORKERS", "4")),
                        help="evaluation processes (one thread each when > 1)")
    parser.add_argument("--rows", choices=list(DATE.row_sets), default="all",
                        help="all: every row of the table; adapters: every row but the full fine-tune's (its tune "
                        "run is the longest stage)")
    parser.add_argument("--list", action="store_true", help="list the stages and whether each is cached")
    parser.add_argument("--eval", metavar="VARIANT", help="only generate (and cache) one reference model's answers: "
                        "base, aligned, or one of the world's updates (the date world's: attacked, benign, "
                        "full-attacked, salora); with --sets val or test")
    parser.add_argument("--sets", choices=("val", "test"), default="val")
    args = parser.parse_args(argv)
    set_threads()
    world = WORLDS[args.world]
    ctx = Context(cache=Path(args.cache), out=Path(args.out), docs=Path(args.docs), workers=max(1, args.workers),
                  rows=world.row_sets[args.rows], world=world)  # fmt: skip
    if args.list:
        stages = world_stages(world)
        width = max(len(st.name) for st in stages)
        for st in stages:
            mark = "cached" if stage_done(ctx, st.name) else "-" if st.wanted(ctx) else "skipped"
            print(f"{st.name:{width}s} {mark:7s} {st.help}")
        return 0
    if args.eval:
        refs = reference_variants(ctx)
        if args.eval not in refs:
            raise SystemExit(f"--eval: one of {', '.join(refs)}")
        sets = val_sets(world) if args.sets == "val" else test_sets(world)
        for name, records in generations(ctx, refs[args.eval], sets).items():
            print(f"{name}: {len(records)} answers")
        return 0
    run_pipeline(ctx, only=args.stage, until=args.until)
    return 0


if __name__ == "__main__":
    sys.exit(main())
