"""Run one benchmark case in its own interpreter while sampling its private memory.

The child is ``python -m benchmarks.correction.cases '<json spec>'``; it prints one
``RESULT_MARKER`` line with its JSON result, and everything else it prints is passed
through so progress stays visible. The parent samples the child's ``RssAnon`` from
outside (:mod:`benchmarks.correction.memory`).
"""

from __future__ import annotations

import json
import os
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

    def to_dict(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "peak_rss_anon_bytes": self.peak_rss_anon_bytes,
            "peak_rss_file_bytes": self.peak_rss_file_bytes,
            "process_wall_s": round(self.process_wall_s, 3),
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


def run_case_subprocess(
    spec: dict[str, Any], *, cwd: Path, interval_s: float = 0.01, timeout_s: float | None = None
) -> CaseRun:
    """Run ``benchmarks.correction.cases`` on ``spec`` in a fresh interpreter."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(cwd), str(cwd / "src"), env.get("PYTHONPATH", "")) if p)
    start = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.correction.cases", json.dumps(spec)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    sampler = MemorySampler(child.pid, interval_s).start()
    result: dict[str, Any] | None = None
    try:
        assert child.stdout is not None
        for line in child.stdout:
            if line.startswith(RESULT_MARKER):
                result = json.loads(line[len(RESULT_MARKER) :])
            else:
                print(line, end="", flush=True)
        code = child.wait(timeout=timeout_s)
    finally:
        sampler.stop()
        if child.poll() is None:
            child.kill()
            child.wait()
    wall = time.perf_counter() - start
    if code != 0 or result is None:
        raise RuntimeError(f"benchmark case {spec.get('case')!r} failed with exit code {code}")
    return CaseRun(
        case=str(spec["case"]),
        result=result,
        peak_rss_anon_bytes=sampler.peaks_kib.get("RssAnon", 0) * 1024,
        peak_rss_file_bytes=sampler.peaks_kib.get("RssFile", 0) * 1024,
        process_wall_s=wall,
        samples=sampler.samples,
    )
