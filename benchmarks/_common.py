"""Shared helpers of the benchmark scripts: interleaved timing, machine description, CSV rows."""

from __future__ import annotations

import csv
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), {gpu}"


def interleaved(fns: dict[str, Callable[[], object]], rounds: int = 30, inner: int = 5,
                warmup: int = 3) -> dict[str, list[float]]:
    """Time each function ``rounds`` times, A B C A B C ..., each sample the mean of ``inner`` calls (s)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[k].append((time.perf_counter() - t0) / inner)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> tuple[float, float]:
    """Quartiles (25th, 75th percentile)."""
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


def copy_bandwidth(nbytes: int = 64 * 2**20, rounds: int = 20) -> float:
    """Measured bytes/s of a plain tensor copy (read + write counted) on this CPU."""
    src = torch.randn(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        dst.copy_(src)
        ts.append(time.perf_counter() - t0)
    return 2 * nbytes / median(ts)


def write_csv(path: str, rows: list[dict]) -> None:
    """Append rows (with machine, versions and date) to a CSV, writing a header for a new file."""
    if not rows:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    stamp = {"machine": machine(), "date": datetime.datetime.now().isoformat(timespec="seconds")}
    rows = [{**r, **stamp} for r in rows]
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        if new:
            w.writeheader()
        w.writerows(rows)
