"""Attention benchmarks: fastddpm.ops.attention against SDPA and the materialised formula.

Three ways to run it:

* ``pytest benchmarks/bench_attention.py`` (pytest-benchmark): a short default set of U-Net shapes;
  ``FASTDDPM_BENCH_FULL=1`` runs the whole grid (N = 64, 256, 1024; d = 128, 256, 512; batch 1, 16).
* ``python benchmarks/bench_attention.py [--full] [--csv out.csv]``: the CPU comparison the README
  quotes: providers interleaved in one process (DESIGN.md: timings drift 30% between runs), medians,
  ratios, and the peak resident memory one call adds (VmHWM after resetting it via /proc/self/clear_refs).
* ``python benchmarks/bench_attention.py --compile-report``: the Triton kernels compiled for sm_90 without
  a GPU, with ptxas' register and spill counts (how the tile sizes were chosen here).
* ``gpu_bench_attention()``: on a CUDA machine, triton.testing.do_bench over the Triton kernel, each of
  SDPA's CUDA backends and the materialised formula, in fp16/bf16/fp32, reporting ms and TFLOP/s.

Shapes are (B, heads=1, N, d): the DDPM U-Net attends over the H*W positions of a feature map with one
head as wide as the channel count.
"""

from __future__ import annotations

import argparse
import csv
import functools
import gc
import os
import platform
import statistics
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from fastddpm.bench.ops import attention_inputs, attention_providers_fns, attention_step
from fastddpm.ops import attention, reference

SHORT = [(1, 256, 256), (16, 256, 256), (1, 1024, 128)]
FULL = [(b, n, d) for b in (1, 16) for n in (64, 256, 1024) for d in (128, 256, 512)]


def _shapes():
    return FULL if os.environ.get("FASTDDPM_BENCH_FULL") else SHORT


_providers = attention_providers_fns  # fastddpm (auto backend), sdpa, materialised
_inputs = attention_inputs
_step = attention_step


# ----------------------------------------------------------------------------- pytest-benchmark
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", list(_providers()))
@pytest.mark.parametrize("shape", _shapes(), ids=lambda s: "B{}-N{}-d{}".format(*s))
def test_attention_cpu(benchmark, shape, provider, mode):
    B, N, d = shape
    q, k, v = _inputs(B, N, d, grad=mode != "fwd")
    fn = _providers()[provider]
    benchmark.group = f"attention {mode} B={B} N={N} d={d}"
    benchmark.extra_info.update(op="attention", provider=provider, B=B, N=N, d=d, mode=mode)
    benchmark(_step, fn, q, k, v, mode != "fwd")


# ----------------------------------------------------------------------------- interleaved script
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _peak_extra_mib(fn) -> float:
    """Resident memory (MiB) one call adds at its peak: VmHWM after a reset, minus VmRSS before."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return float("nan")
    before = _rss_kib("VmRSS")
    fn()
    return (_rss_kib("VmHWM") - before) / 1024


def run_cpu(shapes, reps: int = 15, csv_path: str | None = None) -> list[dict]:
    torch.manual_seed(0)
    rows = []
    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
               f"torch {torch.__version__}")
    print(f"# attention on the CPU ({machine}); medians of {reps} interleaved calls; heads = 1, fp32")
    print(f"{'mode':8} {'B':>3} {'N':>5} {'d':>4} | " + " | ".join(
        f"{p:>12} ms  peak MiB" for p in _providers()) + " | sdpa/fastddpm  materialised/fastddpm")
    for mode in ("fwd", "fwd+bwd"):
        bwd = mode != "fwd"
        for B, N, d in shapes:
            q, k, v = _inputs(B, N, d, grad=bwd)
            provs = _providers()
            for fn in provs.values():  # warm-up
                _step(fn, q, k, v, bwd)
            times = {p: [] for p in provs}
            for _ in range(reps):
                for p, fn in provs.items():
                    t0 = time.perf_counter()
                    _step(fn, q, k, v, bwd)
                    times[p].append(time.perf_counter() - t0)
            peak = {p: _peak_extra_mib(functools.partial(_step, fn, q, k, v, bwd)) for p, fn in provs.items()}
            med = {p: statistics.median(t) * 1e3 for p, t in times.items()}
            cells = " | ".join(f"{med[p]:12.3f}     {peak[p]:8.1f}" for p in provs)
            print(f"{mode:8} {B:3d} {N:5d} {d:4d} | {cells} | {med['sdpa'] / med['fastddpm']:13.2f}"
                  f"  {med['materialised'] / med['fastddpm']:20.2f}", flush=True)
            for p in provs:
                rows.append(dict(op="attention", provider=p, mode=mode, B=B, N=N, d=d, dtype="float32",
                                 ms=med[p], peak_mib=peak[p], machine=machine))
    if csv_path:
        with open(csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return rows


# ----------------------------------------------------------------------------- GPU
def gpu_bench_attention(shapes=None, dtypes=(torch.float16, torch.bfloat16, torch.float32),
                        modes=("fwd", "fwd+bwd")) -> list[dict]:
    """Time the CUDA providers with triton.testing.do_bench; rows with ms and TFLOP/s (or the error).

    FLOPs: forward 4 B H N M d (two matmuls), backward 2.5x that (five matmuls, FlashAttention-2's count).
    The row for each shape names the fastest provider: the evidence for what ``auto`` should pick.
    """
    import triton.testing
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not torch.cuda.is_available():
        raise RuntimeError("gpu_bench_attention needs a CUDA device")
    shapes = shapes or FULL
    dev = torch.device("cuda")

    def sdpa_with(backend):
        def fn(q, k, v):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)
        return fn

    providers = {
        "triton": lambda q, k, v: attention(q, k, v, backend="triton"),
        "cuda(sdpa fused)": lambda q, k, v: attention(q, k, v, backend="cuda"),
        "sdpa-flash": sdpa_with(SDPBackend.FLASH_ATTENTION),
        "sdpa-efficient": sdpa_with(SDPBackend.EFFICIENT_ATTENTION),
        "sdpa-cudnn": sdpa_with(SDPBackend.CUDNN_ATTENTION),
        "materialised": lambda q, k, v: reference.attention(q, k, v),
    }
    rows = []
    name = torch.cuda.get_device_name(dev)
    for dtype in dtypes:
        for mode in modes:
            bwd = mode != "fwd"
            for B, N, d in shapes:
                q, k, v = _inputs(B, N, d, dtype=dtype, device=dev, grad=bwd)
                flops = 4 * B * N * N * d * (3.5 if bwd else 1.0)
                best = None
                for p, fn in providers.items():
                    row = dict(op="attention", provider=p, mode=mode, B=B, N=N, d=d, dtype=str(dtype),
                               device=name)
                    try:
                        ms = triton.testing.do_bench(functools.partial(_step, fn, q, k, v, bwd), return_mode="median")
                        torch.cuda.reset_peak_memory_stats()
                        _step(fn, q, k, v, bwd)
                        torch.cuda.synchronize()
                        row.update(ms=ms, tflops=flops / ms * 1e-9,
                                   peak_mib=torch.cuda.max_memory_allocated() / 2**20)
                        if p != "materialised" and (best is None or ms < best[1]):
                            best = (p, ms)
                    except Exception as exc:  # a backend that cannot serve the shape (flash at d > 256)
                        why = f"{type(exc).__name__}: {exc}"[:120]
                        row.update(ms=float("nan"), tflops=float("nan"), error=why)
                    rows.append(row)
                    print(row, flush=True)
                print(f"# fastest for {dtype} {mode} B={B} N={N} d={d}: {best}", flush=True)
    return rows


def compile_report(arch: int = 90, head_dims=(16, 64, 128, 256, 512)) -> list[dict]:
    """Compile the Triton kernels for sm_<arch> without a GPU and report registers, spills, shared memory.

    Uses triton.compile on a GPUTarget plus the ptxas that ships with Triton (``ptxas -v``); this is how
    the tile configurations in triton_kernels/attention.py were checked on a GPU-less machine.
    """
    import re
    import subprocess
    import tempfile

    import triton
    from fastddpm.triton_kernels import attention as ka
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    target = GPUTarget("cuda", arch, 32)
    kernels = {"fwd": (ka._attn_fwd_kernel, 4, 1, 0), "dkdv": (ka._attn_bwd_dkdv_kernel, 4, 2, 2),
               "dq": (ka._attn_bwd_dq_kernel, 4, 2, 1)}  # (kernel, input ptrs, fp32 ptrs, output ptrs)
    rows = []
    for dtype, tname in ((torch.float16, "fp16"), (torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        for d in head_dims:
            for kind, (kern, n_in, n_f32, n_out) in kernels.items():
                bm, bn, warps, stages = ka._config(kind, d, dtype)
                consts = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": ka._block_d(d), **ka._dot_args(dtype)}
                consts["UPCAST"] = False
                ptrs = [f"*{tname}"] * n_in + ["*fp32"] * n_f32 + [f"*{tname}"] * n_out
                if kind == "fwd":
                    ptrs = [f"*{tname}"] * 4 + ["*fp32"]
                sig = {}
                for i, name in enumerate(kern.arg_names):
                    if name in consts:
                        sig[name] = "constexpr"
                    elif i < len(ptrs):
                        sig[name] = ptrs[i]
                    else:
                        sig[name] = "fp32" if name in ("qk_scale", "scale") else "i32"
                ck = triton.compile(ASTSource(fn=kern, signature=sig, constexprs=consts), target=target,
                                    options={"num_warps": warps, "num_stages": stages})
                with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
                    f.write(ck.asm["ptx"])
                out = subprocess.run([ptxas, f"-arch=sm_{arch}a", "-v", f.name, "-o", os.devnull],
                                     capture_output=True, text=True).stderr
                os.unlink(f.name)
                regs = re.search(r"Used (\d+) registers", out)
                spill = re.search(r"(\d+) bytes spill stores", out)
                row = dict(kernel=kind, dtype=tname, d=d, block_m=bm, block_n=bn, warps=warps,
                           regs=int(regs.group(1)) if regs else None,
                           spill_bytes=int(spill.group(1)) if spill else None, shared=ck.metadata.shared)
                rows.append(row)
                print(row, flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="the whole shape grid (default: a short set)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--csv", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--gpu", action="store_true", help="run gpu_bench_attention instead")
    ap.add_argument("--compile-report", action="store_true",
                    help="compile the Triton kernels for sm_90 offline; print registers and spills")
    args = ap.parse_args(argv)
    if args.compile_report:
        compile_report()
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.gpu and argv is None and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        # glibc raises its mmap threshold after the first large free, so freed buffers stay resident and
        # the peak-RSS measure sees nothing; a fixed threshold returns large buffers to the OS on free.
        os.execve(sys.executable, [sys.executable, *sys.argv],
                  {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 17)})
    if args.gpu:
        gpu_bench_attention()
    else:
        run_cpu(FULL if args.full else SHORT, reps=args.reps, csv_path=args.csv)


if __name__ == "__main__":
    main()
