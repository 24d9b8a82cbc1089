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

from benchmarks.smol.worlds import DATE, WORLDS, World


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

# The date world's updates and rows (the first world's names, kept for their readers); every
# world's own are on its World (benchmarks/smol/worlds.py).
UPDATES = DATE.update_names


def correction_rows(update: str) -> tuple[str, ...]:
    return DATE.correction_rows(update)


ROW_ORDER = DATE.row_order
ROW_SETS = DATE.row_sets


@dataclass
class Context:
    cache: Path
    out: Path
    docs: Path
    recipe: SmolRecipe = field(default_factory=recipe_from_env)
    log: Callable[[str], None] = print
    workers: int = 1  # evaluation worker processes (1 thread each when > 1)
    rows: tuple[str, ...] | None = None  # the rows this run computes and reports (None: all of the world's)
    world: World = DATE

    def __post_init__(self) -> None:
        if self.rows is None:
            self.rows = self.world.row_order

    def path(self, *parts: str) -> Path:
        """A path of the shared stages' outputs (base, splits, aligned, ...)."""
        return self.cache.joinpath(*parts)

    def world_path(self, *parts: str) -> Path:
        """A path of this world's own outputs (its folder inside the cache; the date world's is the cache)."""
        return self.cache.joinpath(self.world.rel(*parts))

    def wants(self, *rows: str) -> bool:
        """Whether any of ``rows`` is computed in this run."""
        return any(row in self.rows for row in rows)

    def marker(self, stage: str) -> Path:
        """A stage's marker, beside its outputs: a world's own stages keep theirs in its folder."""
        owner = next((s.world for s in STAGES if s.name == stage), None)
        folder = WORLDS[owner].folder if owner else ""
        return self.cache.joinpath(folder, "stages", f"{stage}.json")


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Context], dict | None]
    help: str
    needs: tuple[str, ...] = ()  # stages whose outputs this one reads
    for_rows: tuple[str, ...] | None = None  # only these rows need it (None: every run does)
    world: str | None = None  # the world it belongs to (None: shared by every world)

    def wanted(self, ctx: Context) -> bool:
        return self.for_rows is None or ctx.wants(*self.for_rows)

    def in_world(self, world: World) -> bool:
        return self.world is None or self.world == world.name


STAGES: list[Stage] = []


def stage(name: str, help: str, needs: tuple[str, ...] = (), for_rows: tuple[str, ...] | None = None,
          world: str | None = None):  # fmt: skip
    def register(func: Callable[[Context], dict | None]):
        STAGES.append(Stage(name, func, help, needs, for_rows, world))
        return func

    return register


def world_stage(base: str, help: str, needs: Callable[[World], tuple[str, ...]],
                for_rows: Callable[[World], tuple[str, ...] | None] = lambda w: None):  # fmt: skip
    """One stage per world running the same function (it reads ``ctx.world``), named
    ``world.stage_name(base)``; ``needs`` and ``for_rows`` are given per world."""

    def register(func: Callable[[Context], dict | None]):
        for w in WORLDS.values():
            STAGES.append(Stage(w.stage_name(base), func, help, needs(w), for_rows(w), w.name))
        return func

    return register


def world_stages(world: World) -> list[Stage]:
    """The stages a run of ``world`` runs, in pipeline order: the shared ones and its own."""
    return [s for s in STAGES if s.in_world(world)]


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
    stages = world_stages(ctx.world)
    by_name = {s.name: s for s in stages}
    for name in (only, until):
        if name is not None and name not in by_name:
            raise SystemExit(f"unknown stage {name!r}; stages: {', '.join(by_name)}")
    if only is not None:
        for need in _needed(by_name, only):
            if not stage_done(ctx, need) and by_name[need].wanted(ctx):
                run_stage(ctx, by_name[need])
        run_stage(ctx, by_name[only])
        return
    for st in stages:
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


def worker_ctx(cache: str, out: str, docs: str, world: str = DATE.name) -> Context:
    return Context(cache=Path(cache), out=Path(out), docs=Path(docs), log=lambda m: print(m, flush=True),
                   world=WORLDS[world])  # fmt: skip


def run_jobs(ctx: Context, jobs: list[tuple[Callable, tuple]]) -> None:
    """Run evaluation jobs, in ``ctx.workers`` processes when more than one.

    On a CPU shared with other work, several one-thread processes keep the cores busier than
    one multi-threaded process (whose threads wait on each other when one is descheduled).
    Every job writes its own cache files, so jobs never collide."""
    paths = (str(ctx.cache), str(ctx.out), str(ctx.docs), ctx.world.name)
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
