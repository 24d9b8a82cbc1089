"""Peak private memory of a child process, sampled from ``/proc/<pid>/status``.

Each benchmark case runs in its own Python process so one case's allocator state cannot
leak into the next, and the parent samples the child's ``RssAnon`` (anonymous, i.e.
private, resident memory: tensors, Python objects) on a thread. File-backed pages of
mmap'ed safetensors shards show up in ``RssFile`` instead; they are page cache the
kernel can drop at will, so they are recorded but not counted as the case's memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULT_MARKER = "BENCH_CORRECTION_RESULT "
STATUS_FIELDS = ("RssAnon", "RssFile", "VmRSS", "VmHWM")


def read_status_kib(pid: int | str = "self") -> dict[str, int]:
    """The memory lines of ``/proc/<pid>/status`` in KiB (empty once the process is gone)."""
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key, _, rest = line.partition(":")
                if key in STATUS_FIELDS:
                    values[key] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return values


def rss_anon_bytes(pid: int | str = "self") -> int:
    return read_status_kib(pid).get("RssAnon", 0) * 1024


@dataclass
class MemorySampler:
    """Track the maximum of each status field of ``pid`` on a background thread."""

    pid: int
    interval_s: float = 0.01
    peaks_kib: dict[str, int] = field(default_factory=dict)
    samples: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> MemorySampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample_once()
            self._stop.wait(self.interval_s)

    def sample_once(self) -> None:
        values = read_status_kib(self.pid)
        if not values:
            return
        self.samples += 1
        for key, value in values.items():
            self.peaks_kib[key] = max(self.peaks_kib.get(key, 0), value)


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

    from benchmarks.bench_correction_cases import run

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
    """Run ``benchmarks.bench_correction_cases`` on ``spec`` in a fresh interpreter.

    The child prints one ``RESULT_MARKER`` line with its JSON result; everything else it
    prints is passed through so progress stays visible.
    """
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(cwd), str(cwd / "src"), env.get("PYTHONPATH", "")) if p)
    start = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.bench_correction_cases", json.dumps(spec)],
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
