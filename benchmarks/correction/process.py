"""Run one benchmark case in its own process while sampling its private memory.

A case's child is either ``python -m benchmarks.correction.cases '<json spec>'`` (it
prints one ``RESULT_MARKER`` line with its JSON result) or a plain command such as
``python -m csulora correct ...`` (the CLI exactly as a user runs it). Everything else a
child prints is passed through so progress stays visible. The parent samples the child's
``RssAnon`` from outside (:mod:`benchmarks.correction.memory`) and takes the whole
process's CPU time (user + system, all threads, interpreter start and imports included)
from ``getrusage(RUSAGE_CHILDREN)`` around the wait: cases run one at a time, so the
difference is that child's.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.correction.cases import RESULT_MARKER, run
from benchmarks.correction.memory import MemorySampler


@dataclass
class CaseRun:
    """What one case reported plus what the parent observed from outside."""

    case: str
    result: dict[str, Any]
    peak_rss_anon_bytes: int
    peak_rss_file_bytes: int
    process_wall_s: float  # interpreter start, imports and work
    samples: int
    process_cpu_s: float | None = None  # the same span in CPU seconds (None in process)

    def to_dict(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "peak_rss_anon_bytes": self.peak_rss_anon_bytes,
            "peak_rss_file_bytes": self.peak_rss_file_bytes,
            "process_wall_s": round(self.process_wall_s, 3),
            "process_cpu_s": None if self.process_cpu_s is None else round(self.process_cpu_s, 3),
            "memory_samples": self.samples,
            **self.result,
        }


def run_case_in_process(spec: dict[str, Any], *, interval_s: float = 0.01) -> CaseRun:
    """Run a case in this interpreter (tests only: the memory then includes the caller's)."""
    import torch

    threads = torch.get_num_threads()  # the case sets its own; give the caller its back
    start = time.perf_counter()
    sampler = MemorySampler(os.getpid(), interval_s).start()
    try:
        result = run(spec)
    finally:
        sampler.stop()
        torch.set_num_threads(threads)
    return CaseRun(
        case=str(spec["case"]),
        result=result,
        peak_rss_anon_bytes=sampler.peaks_kib.get("RssAnon", 0) * 1024,
        peak_rss_file_bytes=sampler.peaks_kib.get("RssFile", 0) * 1024,
        process_wall_s=time.perf_counter() - start,
        samples=sampler.samples,
    )


def child_env(cwd: Path, threads: int | None = None) -> dict[str, str]:
    """The environment of every child: offline, the checkout importable, the thread count set."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(cwd), str(cwd / "src"), env.get("PYTHONPATH", "")) if p)
    if threads is not None:  # torch reads it at start-up: the CLI has no thread flag
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_child(
    case: str, argv: list[str], *, cwd: Path, env: dict[str, str], interval_s: float = 0.01,
    timeout_s: float | None = None, echo: bool = True,
) -> CaseRun:
    """Run ``argv`` as one child process, sampled from outside; its result line is parsed if any.

    ``echo=False`` keeps the child's output (a CLI's report table) to itself unless it fails.
    """
    cpu_before = _children_cpu_s()
    start = time.perf_counter()
    child = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = MemorySampler(child.pid, interval_s).start()
    result: dict[str, Any] | None = None
    kept: list[str] = []
    try:
        assert child.stdout is not None
        for line in child.stdout:
            if line.startswith(RESULT_MARKER):
                result = json.loads(line[len(RESULT_MARKER) :])
            elif echo:
                print(line, end="", flush=True)
            else:
                kept = [*kept[-40:], line]
        code = child.wait(timeout=timeout_s)
    finally:
        sampler.stop()
        if child.poll() is None:
            child.kill()
            child.wait()
    wall = time.perf_counter() - start
    if code != 0:
        print("".join(kept), end="", flush=True)
        raise RuntimeError(f"benchmark case {case!r} failed with exit code {code}: {' '.join(argv)}")
    return CaseRun(
        case=case,
        result=result or {},
        peak_rss_anon_bytes=sampler.peaks_kib.get("RssAnon", 0) * 1024,
        peak_rss_file_bytes=sampler.peaks_kib.get("RssFile", 0) * 1024,
        process_wall_s=wall,
        samples=sampler.samples,
        process_cpu_s=_children_cpu_s() - cpu_before,
    )


def run_case_subprocess(
    spec: dict[str, Any], *, cwd: Path, interval_s: float = 0.01, timeout_s: float | None = None
) -> CaseRun:
    """Run ``benchmarks.correction.cases`` on ``spec`` in a fresh interpreter."""
    argv = [sys.executable, "-m", "benchmarks.correction.cases", json.dumps(spec)]
    run = run_child(str(spec["case"]), argv, cwd=cwd, env=child_env(cwd), interval_s=interval_s, timeout_s=timeout_s)
    if not run.result:
        raise RuntimeError(f"benchmark case {spec.get('case')!r} printed no result")
    return run
