"""The stage runner: a cached, resumable sequence of named stages, and the evaluation worker pool.

Each stage writes its outputs under the cache folder and then a marker
``stages/NAME.json`` with its wall time; a stage with a marker is reused, so a killed run
resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from csulora.worlds.smol import RECIPE, SmolRecipe


def recipe_from_env() -> SmolRecipe:
    """RECIPE, with overrides from $CSULORA_SMOL_RECIPE (JSON) for dry runs on a tiny world.

    Read from the environment so that evaluation worker processes see the same recipe."""
    overrides = json.loads(os.environ.get("CSULORA_SMOL_RECIPE", "{}") or "{}")
    for name, value in overrides.items():
        if isinstance(value, list):
            overrides[name] = tuple(value)
    return dataclasses.replace(RECIPE, **overrides)


# Where and in what precision every model of the world is trained and run: pinned, so the
# numbers do not depend on whether the machine has a GPU (csulora's own default is CUDA when
# present). float32 on CPU is also what the committed evidence was computed with.
RUNS_ON = {"device": "cpu", "dtype": "float32"}

# The updates the table corrects (issue 22 §4): the LoRA attack, the LoRA on the task alone, and
# the attack as a full fine-tune; and the methods `csulora tune --method all` sweeps on each.
UPDATES = ("attacked", "benign", "full-attacked")
TABLE_METHODS = ("calibrated", "safelora", "csulora", "scale", "resta", "safedelta", "antidote")


def correction_rows(update: str) -> tuple[str, ...]:
    return tuple(f"{update}+{method}" for method in TABLE_METHODS)


# Every row of the results table, in table order: the references, each update followed by its
# corrections, and SaLoRA (a training-time defence on the attack's data, not a correction).
ROW_ORDER = ("base", "aligned", *(row for u in UPDATES for row in (u, *correction_rows(u))), "salora")
# --rows: the whole table, or without the full fine-tune (its tune run is the longest stage)
ROW_SETS = {
    "all": ROW_ORDER,
    "adapters": tuple(row for row in ROW_ORDER if not row.startswith("full-attacked")),
}


@dataclass
class Context:
    cache: Path
    out: Path
    docs: Path
    recipe: SmolRecipe = field(default_factory=recipe_from_env)
    log: Callable[[str], None] = print
    workers: int = 1  # evaluation worker processes (1 thread each when > 1)
    rows: tuple[str, ...] = ROW_ORDER  # the rows this run computes and reports

    def path(self, *parts: str) -> Path:
        return self.cache.joinpath(*parts)

    def wants(self, *rows: str) -> bool:
        """Whether any of ``rows`` is computed in this run."""
        return any(row in self.rows for row in rows)

    def marker(self, stage: str) -> Path:
        return self.path("stages", f"{stage}.json")


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Context], dict | None]
    help: str
    needs: tuple[str, ...] = ()  # stages whose outputs this one reads
    for_rows: tuple[str, ...] | None = None  # only these rows need it (None: every run does)

    def wanted(self, ctx: Context) -> bool:
        return self.for_rows is None or ctx.wants(*self.for_rows)


STAGES: list[Stage] = []


def stage(name: str, help: str, needs: tuple[str, ...] = (), for_rows: tuple[str, ...] | None = None):
    def register(func: Callable[[Context], dict | None]):
        STAGES.append(Stage(name, func, help, needs, for_rows))
        return func

    return register


def stage_done(ctx: Context, name: str) -> bool:
    return ctx.marker(name).exists()


def read_marker(ctx: Context, name: str) -> dict:
    return json.loads(ctx.marker(name).read_text())


def run_stage(ctx: Context, st: Stage) -> None:
    ctx.log(f"[smol] stage {st.name}: {st.help}")
    start = time.perf_counter()
    info = st.run(ctx) or {}
    seconds = time.perf_counter() - start
    record = {"stage": st.name, "seconds": round(seconds, 1), "finished": _now(), **info}
    if stage_done(ctx, st.name):  # a rerun (--stage): keep the first run's time, the cold-run record
        earlier = read_marker(ctx, st.name)
        record["first_seconds"] = earlier.get("first_seconds", earlier["seconds"])
        record["reruns"] = earlier.get("reruns", 0) + 1
    ctx.marker(st.name).parent.mkdir(parents=True, exist_ok=True)
    write_json(ctx.marker(st.name), record)
    ctx.log(f"[smol] stage {st.name} done in {seconds:.0f} s")


def run_pipeline(ctx: Context, only: str | None = None, until: str | None = None) -> None:
    """Run every missing stage in order; ``only``: rerun that stage (after its missing needs);
    ``until``: stop after that stage. Independent stages (e.g. two adapters trained from the
    same aligned model) can run in separate processes with ``only``."""
    by_name = {s.name: s for s in STAGES}
    for name in (only, until):
        if name is not None and name not in by_name:
            raise SystemExit(f"unknown stage {name!r}; stages: {', '.join(by_name)}")
    if only is not None:
        for need in _needed(by_name, only):
            if not stage_done(ctx, need) and by_name[need].wanted(ctx):
                run_stage(ctx, by_name[need])
        run_stage(ctx, by_name[only])
        return
    for st in STAGES:
        if not stage_done(ctx, st.name) and st.wanted(ctx):
            run_stage(ctx, st)
        if until is not None and st.name == until:
            return


def _needed(by_name: dict[str, Stage], name: str) -> list[str]:
    """The stages ``name`` depends on, transitively, in pipeline order."""
    seen: set[str] = set()
    stack = list(by_name[name].needs)
    while stack:
        need = stack.pop()
        if need not in seen:
            seen.add(need)
            stack.extend(by_name[need].needs)
    return [s for s in by_name if s in seen]


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, data: Any) -> None:
    from csulora.io.atomic import atomic_output_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj)}")


def sha256_texts(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\n")
    return digest.hexdigest()


def set_threads() -> None:
    torch.set_num_threads(max(1, min(int(os.environ.get("CSULORA_THREADS", "2")), os.cpu_count() or 1)))
    torch.manual_seed(RECIPE.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def worker_init(threads: int) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(RECIPE.seed)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def worker_ctx(cache: str, out: str, docs: str) -> Context:
    return Context(cache=Path(cache), out=Path(out), docs=Path(docs), log=lambda m: print(m, flush=True))


def run_jobs(ctx: Context, jobs: list[tuple[Callable, tuple]]) -> None:
    """Run evaluation jobs, in ``ctx.workers`` processes when more than one.

    On a CPU shared with other work, several one-thread processes keep the cores busier than
    one multi-threaded process (whose threads wait on each other when one is descheduled).
    Every job writes its own cache files, so jobs never collide."""
    paths = (str(ctx.cache), str(ctx.out), str(ctx.docs))
    if ctx.workers <= 1 or len(jobs) <= 1:
        for func, args in jobs:
            func(paths, *args)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=ctx.workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=worker_init, initargs=(1,)) as pool:
        futures = [pool.submit(func, paths, *args) for func, args in jobs]
        for fut in as_completed(futures):
            ctx.log(f"[smol]   job done: {fut.result()}")
