"""The DDPM CIFAR-10 U-Net: fastddpm.UNet against diffusers' UNet2DModel with the same weights, CPU.

Providers (fastddpm.bench.workloads.unet_forward_providers; fp32, the same random weights, eval mode for
forwards, train mode with dropout 0 for forward+backward): ``fastddpm`` (NCHW), ``fastddpm-cl``
(channels_last end to end), ``diffusers`` (UNet2DModel), ``diffusers+patch`` (under fastddpm.patch), and
denoising-diffusion-pytorch's own U-Net of the same widths (other FLOPs, never the best peer).

* ``pytest benchmarks/bench_unet.py`` (pytest-benchmark);
* ``python benchmarks/bench_unet.py [--reps N] [--modes fwd:1,fwd+bwd:16] [--providers fastddpm-cl] [--csv FILE]``:
  interleaved medians, ratios and the peak resident memory one call adds, then the MiB a training forward
  saves for the backward (deterministic); ``--reps 0``: one round, for the memory figures;
* ``python benchmarks/bench_unet.py --profile [--backward]``: torch.profiler tables (ops by self CPU time)
  of a forward at batch 16 for fastddpm and diffusers.
"""

import functools
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastddpm.bench import suite as S  # noqa: E402
from fastddpm.bench.models import network  # noqa: E402
from fastddpm.bench.workloads import unet_forward_providers  # noqa: E402

MODES = [("fwd", 1), ("fwd", 16), ("fwd+bwd", 16)]


@functools.lru_cache(maxsize=1)
def _net():
    return network("cifar10")


@pytest.mark.parametrize("mode,B", MODES, ids=lambda v: str(v))
@pytest.mark.parametrize("provider", ["fastddpm", "fastddpm-cl", "diffusers", "diffusers+patch"])
def test_unet_cpu(benchmark, provider, mode, B):
    benchmark.group = f"unet cifar10 {mode} B={B}"
    benchmark.pedantic(unet_forward_providers(_net(), B, mode != "fwd")[provider], rounds=3, warmup_rounds=1)


def saved_for_backward_mib(fn) -> float:
    """MiB of tensors a training call keeps for the backward (each storage once, parameters and their views
    excluded): the deterministic part of training memory, which the peak resident figure measures noisily."""
    stor, params = {}, set()

    def pack(t):
        ptr, base = t.untyped_storage().data_ptr(), t if t._base is None else t._base
        stor[ptr] = t.untyped_storage().nbytes()
        if base.is_leaf and base.requires_grad:
            params.add(ptr)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(n for ptr, n in stor.items() if ptr not in params) / 2**20


def _plan(a):
    if a.profile:
        for p, fn in unet_forward_providers(_net(), 16, a.backward).items():
            if p in ("fastddpm", "diffusers"):
                fn()
                with torch.profiler.profile() as prof:
                    fn()
                print(f"\n# {p}: {'forward+backward' if a.backward else 'forward'} at batch 16")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))
        return []
    modes = []
    for x in a.modes.split(","):
        m, _, b = x.partition(":")
        if m not in ("fwd", "fwd+bwd") or not b.isdigit() or int(b) < 1:
            raise S.OptionError(f"--modes: expected MODE:BATCH items with MODE fwd or fwd+bwd (e.g. fwd:1,fwd+bwd:16), "
                             f"got {x!r}")
        modes.append((m, int(b)))
    return [S.Case("unet", f"U-Net {m}, cifar10", f"batch {b}", build=lambda m=m, b=b:
                   unet_forward_providers(_net(), b, m != "fwd"), warmup=1, memory=True) for m, b in modes]


def _extend(ap):
    ap.add_argument("--modes", default="fwd:1,fwd:16,fwd+bwd:16", help="e.g. fwd:1,fwd+bwd:16")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--backward", action="store_true", help="profile forward+backward")


if __name__ == "__main__":
    rows, args = S.script_main(__doc__, _plan, rounds=7, extend=_extend)
    for b in sorted({int(r["shape"].split()[-1]) for r in rows if "fwd+bwd" in r["workload"]}):
        fns = unet_forward_providers(_net(), b, True)
        print(f"saved for backward at B={b} (MiB, parameters excluded): "
              + ", ".join(f"{p} {saved_for_backward_mib(fn):.1f}" for p, fn in fns.items() if callable(fn)))
