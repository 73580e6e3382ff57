"""Attention benchmarks: fastddpm.ops.attention against SDPA and the materialised formula.

* ``pytest benchmarks/bench_attention.py`` (pytest-benchmark): a short default set of U-Net shapes;
  ``FASTDDPM_BENCH_FULL=1`` runs the whole grid (N = 64, 256, 1024; d = 128, 256, 512; batch 1, 16).
* ``python benchmarks/bench_attention.py [--full] [--threads N] [--csv FILE]``: the CPU comparison the README
  quotes: providers interleaved in one process, medians, ratios, and the peak resident memory one call adds.
* The Triton kernels' registers, spills and shared memory for a GPU, without one:
  ``python scripts/compile_triton.py --only attn`` (each launch compiled as Triton's JIT specialises it).
* ``--gpu`` (gpu_bench_attention()): on a CUDA machine, the CUDA mode of fastddpm.bench.timing
  (triton.testing.do_bench medians) over the Triton kernel, each of SDPA's CUDA backends and the
  materialised formula, in fp16/bf16/fp32, reporting ms and TFLOP/s.

Shapes are (B, heads=1, N, d): the DDPM U-Net attends over the H*W positions of a feature map with one
head as wide as the channel count.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastddpm.bench import suite as S  # noqa: E402
from fastddpm.bench.ops import attention_flops, attention_inputs, attention_providers, tensor_call  # noqa: E402
from fastddpm.ops import attention, reference  # noqa: E402

SHORT = [(1, 256, 256), (16, 256, 256), (1, 1024, 128)]
FULL = [(b, n, d) for b in (1, 16) for n in (64, 256, 1024) for d in (128, 256, 512)]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["fastddpm", "sdpa", "materialised"])
@pytest.mark.parametrize("shape", FULL if os.environ.get("FASTDDPM_BENCH_FULL") else SHORT,
                         ids=lambda s: "B{}-N{}-d{}".format(*s))
def test_attention_cpu(benchmark, shape, provider, mode):
    B, N, d = shape
    benchmark.group = f"attention {mode} B={B} N={N} d={d}"
    benchmark.extra_info.update(op="attention", provider=provider, B=B, N=N, d=d, mode=mode)
    benchmark(attention_providers(B, N, d, backward=mode != "fwd")[provider])


def gpu_bench_attention(shapes=None, dtypes=(torch.float16, torch.bfloat16, torch.float32),
                        modes=("fwd", "fwd+bwd")) -> list[dict]:
    """Time the CUDA providers in fastddpm.bench.timing's CUDA mode; rows with ms and TFLOP/s (or the error).
    The row for each shape names the fastest provider: the evidence for what ``auto`` should pick."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fastddpm.bench.timing import cuda_ms

    if not torch.cuda.is_available():
        raise RuntimeError("gpu_bench_attention needs a CUDA device")
    dev = torch.device("cuda")

    def sdpa_with(backend):
        def fn(q, k, v):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)
        return fn

    providers = {
        "triton": lambda q, k, v: attention(q, k, v, backend="triton"),
        "cuda(sdpa fused)": lambda q, k, v: attention(q, k, v, backend="cuda"),
        **{f"sdpa-{n}": sdpa_with(b) for n, b in (("flash", SDPBackend.FLASH_ATTENTION),
                                                   ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                                                   ("cudnn", SDPBackend.CUDNN_ATTENTION))},
        "materialised": reference.attention,
    }
    rows = []
    for dtype in dtypes:
        for mode in modes:
            bwd = mode != "fwd"
            for B, N, d in shapes or FULL:
                q, k, v = attention_inputs(B, N, d, dtype=dtype, device=dev, grad=bwd)
                do = torch.ones_like(q) if bwd else None
                best = None
                for p, fn in providers.items():
                    row = dict(op="attention", provider=p, mode=mode, B=B, N=N, d=d, dtype=str(dtype),
                               device=torch.cuda.get_device_name(dev))
                    try:
                        call = tensor_call(fn, (q, k, v), do)
                        ms = cuda_ms(call)
                        torch.cuda.reset_peak_memory_stats()
                        call()
                        torch.cuda.synchronize()
                        row.update(ms=ms, tflops=attention_flops(B, N, d, bwd) / ms * 1e-9,
                                   peak_mib=torch.cuda.max_memory_allocated() / 2**20)
                        if p != "materialised" and (best is None or ms < best[1]):
                            best = (p, ms)
                    except Exception as exc:  # a backend that cannot serve the shape (flash at d > 256)
                        row.update(ms=float("nan"), tflops=float("nan"), error=f"{type(exc).__name__}: {exc}"[:120])
                    rows.append(row)
                    print(row, flush=True)
                print(f"# fastest for {dtype} {mode} B={B} N={N} d={d}: {best}", flush=True)
    return rows


def _extend(ap):
    ap.add_argument("--full", action="store_true", help="the whole shape grid (default: a short set)")
    ap.add_argument("--gpu", action="store_true",
                    help="run gpu_bench_attention instead, on a CUDA device (the short shapes, or --full's; "
                         "--csv takes its rows; --rounds, --providers and --compile do not apply)")


def _plan(a):
    if a.gpu:
        if not torch.cuda.is_available():
            raise S.OptionError("--gpu: no CUDA device is visible (torch.cuda.is_available() is False); run it on a "
                             "machine with an NVIDIA GPU")
        rows = gpu_bench_attention(shapes=FULL if a.full else SHORT)
        if a.csv:
            from fastddpm.bench.timing import write_csv

            write_csv(a.csv, rows)
        return []
    return [S.op_case(f"attention {mode}", (B, 1, N, d), a.compile, memory=True)
            for mode in ("fwd", "fwd+bwd") for B, N, d in (FULL if a.full else SHORT)]


if __name__ == "__main__":
    S.script_main(__doc__, _plan, rounds=15, extend=_extend)
