"""Attention benchmarks: fastddpm.ops.attention against SDPA and the materialised formula.

* ``pytest benchmarks/bench_attention.py`` (pytest-benchmark): a short default set of U-Net shapes;
  ``FASTDDPM_BENCH_FULL=1`` runs the whole grid (N = 64, 256, 1024; d = 128, 256, 512; batch 1, 16).
* ``python benchmarks/bench_attention.py [--full] [--threads N] [--csv FILE]``: the CPU comparison the README
  quotes: providers interleaved in one process, medians, ratios, and the peak resident memory one call adds.
* ``python benchmarks/bench_attention.py --compile-report``: the Triton kernels compiled for sm_90 without
  a GPU, with ptxas' register and spill counts (how the tile sizes were chosen here).
* ``--gpu`` (gpu_bench_attention()): on a CUDA machine, the CUDA mode of fastddpm.bench.timing
  (triton.testing.do_bench medians) over the Triton kernel, each of SDPA's CUDA backends and the
  materialised formula, in fp16/bf16/fp32, reporting ms and TFLOP/s.

Shapes are (B, heads=1, N, d): the DDPM U-Net attends over the H*W positions of a feature map with one
head as wide as the channel count.
"""

from __future__ import annotations

import functools
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastddpm.bench import suite as S  # noqa: E402
from fastddpm.bench.ops import attention_flops, attention_inputs, attention_providers, attention_step  # noqa: E402
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
                best = None
                for p, fn in providers.items():
                    row = dict(op="attention", provider=p, mode=mode, B=B, N=N, d=d, dtype=str(dtype),
                               device=torch.cuda.get_device_name(dev))
                    try:
                        ms = cuda_ms(functools.partial(attention_step, fn, q, k, v, bwd))
                        torch.cuda.reset_peak_memory_stats()
                        attention_step(fn, q, k, v, bwd)
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


def compile_report(arch: int = 90, head_dims=(16, 64, 128, 256, 512)) -> list[dict]:
    """Compile the Triton kernels for sm_<arch> without a GPU and report registers, spills, shared memory.

    Uses triton.compile on a GPUTarget plus the ptxas that ships with Triton (``ptxas -v``); this is how
    the tile configurations in triton_kernels/attention.py were checked on a GPU-less machine. It compiles
    without a launch's specialisation (strides of 1 as constants, alignment hints), so its counts differ
    from a GPU's: scripts/compile_triton.py compiles each launch as the JIT specialises it.
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
    # (kernel, input ptrs, fp32 ptrs, output ptrs); the backward kernel once per launch (KEYS: dK and dV)
    bwd = (ka._attn_bwd_kernel, 4, 2, 3)
    kernels = {"fwd": (ka._attn_fwd_kernel, 4, 1, 0), "dkdv": bwd, "dq": bwd}
    rows = []
    for dtype, tname in ((torch.float16, "fp16"), (torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        for d in head_dims:
            for kind, (kern, n_in, n_f32, n_out) in kernels.items():
                bm, bn, warps, stages = ka._config(kind, d, dtype)
                consts = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": ka._block_d(d), **ka._dot_args(dtype)}
                consts.update(UPCAST=False, WIDE=False)  # the usual case: int32 indices (see _wide)
                if kind != "fwd":
                    consts["KEYS"] = kind == "dkdv"
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


def _extend(ap):
    ap.add_argument("--full", action="store_true", help="the whole shape grid (default: a short set)")
    ap.add_argument("--gpu", action="store_true", help="run gpu_bench_attention instead")
    ap.add_argument("--compile-report", action="store_true",
                    help="compile the Triton kernels for sm_90 offline; print registers and spills")


def _plan(a):
    if a.compile_report:
        compile_report()
        return []
    if a.gpu:
        gpu_bench_attention()
        return []
    return [S.op_case(f"attention {mode}", (B, 1, N, d), a.compile, memory=True)
            for mode in ("fwd", "fwd+bwd") for B, N, d in (FULL if a.full else SHORT)]


if __name__ == "__main__":
    S.script_main(__doc__, _plan, rounds=15, extend=_extend)
