"""The DDPM CIFAR-10 U-Net: fastddpm.UNet against diffusers' UNet2DModel with the same weights.

Providers (all fp32, the same random weights, eval mode for forwards, train mode for forward+backward):

* ``fastddpm``: :class:`fastddpm.UNet` converted from the diffusers model (NCHW);
* ``fastddpm-cl``: the same, channels_last end to end;
* ``diffusers``: ``UNet2DModel`` as is;
* ``diffusers+patch``: a second ``UNet2DModel`` with the same weights under :func:`fastddpm.patch`.

Three ways to run it:

* ``pytest benchmarks/bench_unet.py`` (pytest-benchmark);
* ``python benchmarks/bench_unet.py [--reps N] [--csv out.csv]``: the comparison benchmarks/README.md
  quotes: providers interleaved in one process (timings drift 30% between runs on these machines),
  medians, ratios to diffusers, and the peak resident memory one call adds; ``--reps 0`` measures
  memory only (one warm-up and one measured call per provider), which a loaded machine does not skew;
* ``python benchmarks/bench_unet.py --profile``: torch.profiler tables (ops by self CPU time) of a
  forward at batch 16 for fastddpm and diffusers.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import ctypes.util
import functools
import gc
import platform
import statistics
import time

import pytest
import torch

from fastddpm import UNet
from fastddpm.bench.models import unet_variants
from fastddpm.compat.diffusers import config_to_diffusers

MODES = [("fwd", 1), ("fwd", 16), ("fwd+bwd", 16)]


def build_models(seed: int = 0) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    ours = UNet.ddpm_cifar10(dropout=0.0)  # dropout 0 on both sides: the same computation
    assert config_to_diffusers(ours.config)["block_out_channels"] == (128, 256, 256, 256)
    return unet_variants(ours)


def _call(model, x, t):
    out = model(x, t)
    return out.sample if hasattr(out, "sample") else out


def _step(model, x, t, backward: bool):
    if not backward:
        with torch.no_grad():
            return _call(model, x, t)
    out = _call(model, x, t)
    out.pow(2).mean().backward()
    for p in model.parameters():
        p.grad = None
    return out


def _inputs(B: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, 32, 32, generator=g), torch.randint(0, 1000, (B,), generator=g)


# ----------------------------------------------------------------------------- pytest-benchmark
@pytest.fixture(scope="module")
def models():
    return build_models()


@pytest.mark.parametrize("mode,B", MODES, ids=lambda v: str(v))
@pytest.mark.parametrize("provider", ["fastddpm", "fastddpm-cl", "diffusers", "diffusers+patch"])
def test_unet_cpu(benchmark, models, provider, mode, B):
    model = models[provider].train(mode != "fwd")
    x, t = _inputs(B)
    benchmark.group = f"unet cifar10 {mode} B={B}"
    benchmark.extra_info.update(op="unet", provider=provider, B=B, mode=mode)
    benchmark.pedantic(_step, args=(model, x, t, mode != "fwd"), rounds=3, warmup_rounds=1)


# ----------------------------------------------------------------------------- interleaved script
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim  # glibc
    except (OSError, AttributeError):
        return None


def _peak_extra_mib(fn) -> float:
    """Resident memory (MiB) one call adds at its peak: VmHWM after a reset, minus VmRSS before.

    glibc keeps freed blocks resident: without handing them back first, a call that reuses what an
    earlier call freed adds next to nothing (a warm training step measured 0-230 MiB instead of 700-1050).
    """
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return float("nan")
    before = _rss_kib("VmRSS")
    fn()
    return (_rss_kib("VmHWM") - before) / 1024


def saved_for_backward_mib(model, B: int) -> float:
    """MiB of tensors a training forward keeps for the backward (each storage once): the
    deterministic part of training memory, which the peak resident figure measures noisily."""
    x, t = _inputs(B)
    model.train()
    stor = {}

    def pack(tensor):
        s = tensor.untyped_storage()
        stor[s.data_ptr()] = s.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = _call(model, x, t)
    del out
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in stor.items() if ptr not in params) / 2**20


def run_cpu(reps: int = 7, csv_path: str | None = None, modes=MODES, providers=None) -> list[dict]:
    if reps < 0:
        raise ValueError(f"reps: expected 0 (memory only) or more timed calls, got {reps}")
    models = build_models()
    if providers:
        models = {p: m for p, m in models.items() if p in providers or p == "diffusers"}
    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
               f"torch {torch.__version__}")
    timed = reps > 0  # reps 0: memory only (peak and saved for backward do not depend on the load)
    print(f"# DDPM CIFAR-10 U-Net (35.7M params, fp32, 32x32) on the CPU ({machine}); "
          + (f"medians of {reps} interleaved calls; " if timed else "memory only; ")
          + "peak = resident MiB one call adds")
    names = list(models)
    if timed:
        print(f"{'mode':8} {'B':>3} | " + " | ".join(f"{p:>15} ms  peak" for p in names)
              + " | " + "  ".join(f"diffusers/{p}" for p in names if p != "diffusers"))
    else:
        print(f"{'mode':8} {'B':>3} | " + " | ".join(f"{p:>15} peak" for p in names))
    rows = []
    for mode, B in modes:
        bwd = mode != "fwd"
        x, t = _inputs(B)
        for m in models.values():
            m.train(bwd)
            _step(m, x, t, bwd)  # warm-up (oneDNN primitive caches, first-touch of buffers)
        times = {p: [] for p in names}
        for _ in range(reps):
            for p in names:
                t0 = time.perf_counter()
                _step(models[p], x, t, bwd)
                times[p].append(time.perf_counter() - t0)
        peak = {p: _peak_extra_mib(functools.partial(_step, models[p], x, t, bwd)) for p in names}
        med = {p: statistics.median(v) * 1e3 if v else float("nan") for p, v in times.items()}
        if timed:
            cells = " | ".join(f"{med[p]:15.1f}    {peak[p]:6.0f}" for p in names)
            d = med["diffusers"]
            ratios = "  ".join(f"{d / med[p]:{len(p) + 10}.2f}" for p in names if p != "diffusers")
            print(f"{mode:8} {B:3d} | {cells} | {ratios}", flush=True)
        else:
            print(f"{mode:8} {B:3d} | " + " | ".join(f"{peak[p]:20.0f}" for p in names), flush=True)
        rows.extend(dict(op="unet_cifar10", provider=p, mode=mode, B=B, dtype="float32", ms=med[p],
                         peak_mib=peak[p], machine=machine) for p in names)
    if any(m != "fwd" for m, _ in modes):
        B = max(b for m, b in modes if m != "fwd")
        saved = {p: saved_for_backward_mib(models[p], B) for p in names}
        print(f"saved for backward at B={B} (MiB, parameters excluded): "
              + ", ".join(f"{p} {v:.1f}" for p, v in saved.items()), flush=True)
    if csv_path:
        with open(csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return rows


def profile(B: int = 16, providers=("fastddpm", "diffusers"), row_limit: int = 14, backward: bool = False):
    models = build_models()
    x, t = _inputs(B)
    for p in providers:
        m = models[p].train(backward)
        _step(m, x, t, backward)
        with torch.profiler.profile() as prof:
            _step(m, x, t, backward)
        print(f"\n# {p}: {'forward+backward' if backward else 'forward'} at batch {B}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=7, help="timed calls per provider; 0: memory only")
    ap.add_argument("--csv", default=None)
    ap.add_argument("--modes", default="fwd:1,fwd:16,fwd+bwd:16", help="e.g. fwd:1,fwd+bwd:16")
    ap.add_argument("--providers", default="", help="comma-separated subset (diffusers always runs)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--backward", action="store_true", help="profile forward+backward")
    args = ap.parse_args()
    if args.profile:
        profile(backward=args.backward)
    else:
        modes = [(m, int(b)) for m, b in (x.split(":") for x in args.modes.split(","))]
        run_cpu(args.reps, args.csv, modes, [p for p in args.providers.split(",") if p])
