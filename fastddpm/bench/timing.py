"""Timing, machine description and CSV rows: the helpers every benchmark in the project shares.

Timings on shared machines drift by 30% between runs, so providers are always timed interleaved in one
process (A B C A B C ...) and compared through medians and per-round ratios, never one absolute time.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from .._io import atomic_path, lock_folder


def cpu_name() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    return name


def load_average() -> str:
    """The 1, 5 and 15 minute load averages ("-" where the OS does not say)."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "-"


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"{gpu}")


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001  (not installed)
        return "-"


def versions() -> dict[str, str]:
    """Versions of the package and of the peers it is compared with ("-" where absent)."""
    from .. import __version__

    return {"fastddpm": __version__, "torch": torch.__version__, "diffusers": _version("diffusers"),
            "denoising_diffusion_pytorch": _version("denoising-diffusion-pytorch")}


def sync(device: torch.device | str | None = None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], object], inner: int = 1, device: torch.device | str | None = None) -> float:
    """Seconds per call of ``fn``, the mean of ``inner`` calls (the device synchronised before and after)."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / inner


def cuda_ms(fn: Callable[[], object]) -> float:
    """The CUDA mode: triton.testing.do_bench's median time of ``fn`` in ms (its default return_mode is the
    mean, which one preempted repetition can move)."""
    import triton.testing

    return triton.testing.do_bench(fn, return_mode="median")


def spread(xs: list[float]) -> tuple[float, float]:
    """Quartiles (25th, 75th percentile); the one value twice for a single sample."""
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def copy_bandwidth(nbytes: int = 64 * 2**20, rounds: int = 20) -> float:
    """Measured bytes/s of a plain tensor copy (read + write counted) on this CPU."""
    src = torch.randn(nbytes // 4)
    dst = torch.empty_like(src).copy_(src)
    return 2 * nbytes / statistics.median([time_calls(lambda: dst.copy_(src)) for _ in range(rounds)])


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the C++ side's stderr (the profiler logs its start and stop) for the block."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_tensor_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of tensor memory that one call of ``fn`` adds above what was live when it started.

    Counted from the allocator's own allocation and free events (torch.profiler with profile_memory), so
    it is deterministic and independent of the machine's load, unlike resident-set sizes: every tensor
    the call allocates (activations, saved tensors, gradients, temporaries, optimizer state created on a
    first step) counts while it lives.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with _quiet_stderr(), profile(activities=activities, profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def _malloc_trim() -> None:
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)  # glibc
    except (OSError, AttributeError):
        pass


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith(field + ":"))


def peak_rss_mib(fn: Callable[[], object]) -> float:
    """Resident memory (MiB) one call of ``fn`` adds at its peak: VmHWM after a reset, minus VmRSS before
    (Linux; NaN elsewhere).

    glibc keeps freed blocks resident: without handing them back first (malloc_trim), a call that reuses
    what an earlier call freed adds next to nothing (a warm U-Net training step measured 0-230 MiB instead
    of 700-1050).
    """
    import gc

    gc.collect()
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        before = _status_kib("VmRSS")
    except (OSError, StopIteration):
        return float("nan")
    fn()
    return (_status_kib("VmHWM") - before) / 1024


# ----------------------------------------------------------------------------- CSV
@contextlib.contextmanager
def _locked_folder(folder: str):
    """Hold an exclusive lock on ``folder`` (_io.lock_folder; where none can be taken, the atomic replace
    still keeps the file whole)."""
    fd = lock_folder(folder, wait=True)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _read_csv(path: str, flag: str = "") -> tuple[list[str], list[dict]]:
    """The header and rows of the CSV at ``path`` (none where it is missing or empty); a file that is not a CSV
    of text is a ValueError naming it (and ``flag``, the option that gave its folder)."""
    if not (os.path.exists(path) and os.path.getsize(path) > 0):
        return [], []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            return list(reader.fieldnames or []), list(reader)
    except (UnicodeDecodeError, csv.Error, OSError) as exc:  # (OSError: a folder of that name, unreadable)
        where = f"{flag}: " if flag else ""
        raise ValueError(f"{where}{path} is not a readable CSV file of benchmark rows ({exc})") from exc


def check_appendable(path: str, flag: str) -> None:
    """Before the work: append_csv can read the CSV at ``path`` (ValueError naming ``flag`` if not)."""
    _read_csv(path, flag)


def append_csv(path: str, rows: list[dict]) -> int:
    """Append ``rows`` to the CSV at ``path``, atomically; returns the number of rows written.

    The header is written once. The file is rewritten whole to a temporary file in the same folder and
    moved into place (os.replace), so a reader or a crash never sees half a row; a column that the file
    does not have yet is added to the header (older rows leave it empty). Concurrent appends from
    several processes are serialised by a lock on the folder.
    """
    if not rows:
        return 0
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with _locked_folder(folder):
        old_fields, old_rows = _read_csv(path)
        fields = list(old_fields)
        for r in rows:
            fields += [k for k in r if k not in fields]
        with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=fields, restval="")
            w.writeheader()
            w.writerows(old_rows)
            w.writerows(rows)
    return len(rows)


def stamp() -> dict[str, str]:
    """What every CSV row carries: the machine, the versions, the load and the date."""
    return {"machine": machine(), "threads": str(torch.get_num_threads()), "load_avg": load_average(),
            **versions(), "date": datetime.datetime.now().isoformat(timespec="seconds")}


def write_csv(path: str, rows: list[dict]) -> None:
    """Append rows (with machine, versions and date) to a CSV, atomically, the header written once."""
    s = stamp()
    append_csv(path, [{**r, **s} for r in rows])
