"""GroupNorm+SiLU benchmarks: the fused op against eager torch at the DDPM U-Net's shapes.

Two ways to run it:

* ``pytest benchmarks/bench_group_norm_silu.py`` (pytest-benchmark): forward and forward+backward
  per provider and shape.
* ``python benchmarks/bench_group_norm_silu.py [--csv out.csv]``: what benchmarks/README.md quotes:
  providers interleaved in one process (DESIGN.md: timings drift 30% between runs), medians over
  rounds, ratios against the better eager variant, the bandwidth fraction against a plain copy of a
  tensor of the same size, and the peak resident memory of forward+backward through a stack of
  conv -> GroupNorm+SiLU blocks.

Providers: ``fused`` (fastddpm.ops.group_norm_silu, auto backend: the C++ kernel on the CPU),
``eager`` (F.silu(F.group_norm(x))) and ``eager_inplace`` (F.silu(F.group_norm(x), inplace=True)).
Bandwidth fraction: the fused forward reads x twice and writes y once (3 tensor-sizes of traffic); a
copy reads once and writes once (2), so fraction = (3 / t_fused) / (2 / t_copy).
"""

from __future__ import annotations

import argparse
import csv
import gc
import os
import platform
import statistics
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from fastddpm.bench.ops import GN_GROUPS as G
from fastddpm.bench.ops import group_norm_silu_inputs
from fastddpm.ops import group_norm_silu

# The U-Net's GroupNorm inputs (C, H, W), at batch 1 and 16.
SHAPES = [(b, c, h, h) for b in (1, 16) for (c, h) in ((128, 32), (256, 16), (256, 8), (256, 4))]


def _providers() -> dict:
    return {
        "fused": lambda x, w, b: group_norm_silu(x, G, w, b),
        "eager": lambda x, w, b: F.silu(F.group_norm(x, G, w, b)),
        "eager_inplace": lambda x, w, b: F.silu(F.group_norm(x, G, w, b), inplace=True),
    }


def _inputs(shape, grad=False):
    return group_norm_silu_inputs(shape, grad=grad)  # the same inputs as `fastddpm bench`


def _fwd_bwd(fn, x, w, b, dy):
    y = fn(x, w, b)
    y.backward(dy)
    x.grad = w.grad = b.grad = None


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("provider", list(_providers()))
def test_forward(benchmark, provider, shape):
    x, w, b = _inputs(shape)
    fn = _providers()[provider]
    benchmark.group = f"fwd {shape}"
    with torch.no_grad():
        benchmark(fn, x, w, b)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("provider", list(_providers()))
def test_forward_backward(benchmark, provider, shape):
    if provider == "eager_inplace":
        pytest.skip("in-place silu on group_norm's output cannot be differentiated with a saved output")
    x, w, b = _inputs(shape, grad=True)
    dy = torch.randn(shape)
    benchmark.group = f"fwd+bwd {shape}"
    benchmark(_fwd_bwd, _providers()[provider], x, w, b, dy)


# ---------------------------------------------------------------------------
# The README's interleaved comparison.
# ---------------------------------------------------------------------------
def _time(fn, reps: int) -> float:
    # One untimed call first: the allocator then holds this provider's own buffers, so the timed calls
    # do not pay page faults for memory the previous provider freed (a cost of the order it ran in).
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def _reps(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return max(10, min(200, int(4e7 / max(n, 1) / 10)))


def _bench_shape(shape, rounds: int) -> dict:
    x, w, b = _inputs(shape)
    xg, wg, bg = _inputs(shape, grad=True)
    dy = torch.randn(shape)
    prov = _providers()
    fns = {f"fwd_{k}": (lambda f=f: f(x, w, b)) for k, f in prov.items()}
    fns["fwd_copy"] = lambda: x.clone()
    for k in ("fused", "eager"):
        fns[f"fwdbwd_{k}"] = lambda f=prov[k]: _fwd_bwd(f, xg, wg, bg, dy)
    reps = _reps(shape)
    times = {k: [] for k in fns}
    for rnd in range(rounds + 1):  # round 0 warms up and is dropped
        for k, f in fns.items():  # interleaved: every provider once per round
            if k.startswith("fwdbwd"):
                t = _time(f, max(3, reps // 3))
            else:
                with torch.no_grad():
                    t = _time(f, reps)
            if rnd:
                times[k].append(t)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    best_eager = min(med["fwd_eager"], med["fwd_eager_inplace"])
    return {
        "shape": "x".join(map(str, shape)),
        **{f"{k}_ms": round(v, 4) for k, v in med.items()},
        "fwd_speedup_vs_best_eager": round(best_eager / med["fwd_fused"], 2),
        "fwdbwd_speedup_vs_eager": round(med["fwdbwd_eager"] / med["fwdbwd_fused"], 2),
        "bw_fraction_of_copy": round((3 / med["fwd_fused"]) / (2 / med["fwd_copy"]), 2),
    }


def interleaved(rounds: int = 15) -> list[dict]:
    return [_bench_shape(shape, rounds) for shape in SHAPES]


_PEAK_SCRIPT = r"""
import sys, torch
from torch import nn
from fastddpm.nn import GroupNormSiLU
kind = sys.argv[1]
torch.manual_seed(0)
layers = []
for _ in range(6):
    layers.append(nn.Conv2d(128, 128, 3, padding=1))
    fused = GroupNormSiLU(32, 128)
    layers.append(fused if kind == "fused" else nn.Sequential(nn.GroupNorm(32, 128), nn.SiLU()))
net = nn.Sequential(*layers)
x = torch.randn(16, 128, 32, 32)
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
saved = []
def pack(t):
    saved.append(t)
    return t
base = rss()
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    loss = net(x).sum()
# Bytes kept for the backward, each storage counted once (x of a block may be shared).
stor = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
loss.backward()
print(hwm() - base, sum(stor.values()) / 2**20)
"""


def peak_memory_mib(kind: str) -> tuple[float, float]:
    """(peak resident MiB that a first forward+backward through 6 conv -> GroupNorm+SiLU blocks at
    16x128x32x32 adds, MiB of tensors saved for the backward), in a fresh process."""
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, kind], capture_output=True, text=True,
                         check=True)
    peak, saved = out.stdout.strip().splitlines()[-1].split()
    return float(peak), float(saved)


def test_peak_memory_stack():
    fused, eager = peak_memory_mib("fused"), peak_memory_mib("eager")
    print(f"peak / saved MiB: fused {fused} eager {eager}")


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--csv")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    print(_machine())
    rows = interleaved(args.rounds)
    for r in rows:
        print(r)
    mem = {k: peak_memory_mib(k) for k in ("fused", "eager")}
    print("fwd+bwd through 6 x (conv -> GroupNorm+SiLU), 16x128x32x32 fp32: (peak RSS MiB, saved MiB):", mem)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(rows[0]))
            wr.writeheader()
            wr.writerows(rows)


if __name__ == "__main__":
    gc.collect()
    main()
