"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any


def interleaved(fns: list[Callable[[], Any]], calls: list[int], rounds: int = 3) -> list[tuple[float, float, Any]]:
    """``(min, median, last result)`` of each function's wall time in seconds, run side by side.

    Each round calls ``fns[j]`` ``calls[j]`` times, one function after the other, so that a
    shared machine's changing load falls on all of them alike; the minimum is the figure
    least disturbed by other processes.
    """
    times: list[list[float]] = [[] for _ in fns]
    results: list[Any] = [None] * len(fns)
    for _ in range(rounds):
        for j, fn in enumerate(fns):
            for _ in range(calls[j]):
                start = time.perf_counter()
                results[j] = fn()
                times[j].append(time.perf_counter() - start)
    return [(min(t), statistics.median(t), r) for t, r in zip(times, results, strict=True)]


def peak_rss_mib() -> float:
    """Peak resident set size of this process's memory map so far (VmHWM), in MiB.

    Unlike ``getrusage().ru_maxrss``, VmHWM starts afresh at ``exec``, so a child process
    started from a large parent does not inherit the parent's size.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


#: Python source of :func:`peak_rss_mib` for code run in a child interpreter.
PEAK_RSS_SOURCE = (
    "def peak_rss_mib():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmHWM:'):\n"
    "            return int(line.split()[1]) / 1024\n"
)


def run_isolated(code: str) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter that prints one JSON line; return it parsed.

    Peak RSS is only meaningful in a process of its own.
    """
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> str:
    import os

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
