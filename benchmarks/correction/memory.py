"""Peak private memory of a process, sampled from ``/proc/<pid>/status``.

Each benchmark case runs in its own Python process (:mod:`benchmarks.correction.process`)
so one case's allocator state cannot leak into the next, and the parent samples the
child's ``RssAnon`` (anonymous, i.e.
private, resident memory: tensors, Python objects) on a thread. File-backed pages of
mmap'ed safetensors shards show up in ``RssFile`` instead; they are page cache the
kernel can drop at will, so they are recorded but not counted as the case's memory.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

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
