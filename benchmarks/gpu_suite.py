"""The GPU suite: every op on every backend, correctness against float64 on the device, then timings.

    python benchmarks/gpu_suite.py [--quick] [--csv PATH]

On any CUDA GPU: measures the device's copy bandwidth and matmul rate first; for each op
and shape checks every backend against the float64 reference on the device (the same
bounds as the CPU tests), then times it with triton.testing.do_bench (median ms),
reporting GB/s (elementwise and normalisation ops, counting the minimum bytes each must
move) and TFLOP/s (attention). It ends with the whole denoising step of the CIFAR-10
U-Net with and without a CUDA graph, a short table and optional CSV rows. Without a GPU
it stops with a clear message (exit code 2); planning, rendering and CSV are CPU-testable.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import machine, write_csv  # noqa: E402


@dataclass
class Case:
    op: str
    shape: tuple
    dtype: torch.dtype
    bytes_moved: int = 0  # the minimum bytes the op must read + write
    flops: float = 0.0
    extra: dict = field(default_factory=dict)


def plan(quick: bool = False) -> list[Case]:
    """The cases of the suite (pure: no GPU needed)."""
    cases: list[Case] = []
    dtypes = [torch.float32, torch.bfloat16] if quick else [torch.float32, torch.float16, torch.bfloat16]
    img = [(16, 3, 32, 32), (64, 3, 256, 256)] if not quick else [(16, 3, 32, 32)]
    for dt in dtypes:
        es = torch.finfo(dt).bits // 8
        for s in img:
            n = math.prod(s)
            cases.append(Case("q_sample", s, dt, bytes_moved=3 * n * es))
            cases.append(Case("ddpm_step", s, dt, bytes_moved=4 * n * es, extra={"noise": "tensor"}))
            cases.append(Case("ddpm_step", s, dt, bytes_moved=3 * n * es, extra={"noise": "philox"}))
        gn = [(16, 128, 32, 32), (16, 256, 16, 16), (1, 256, 8, 8)] if not quick else [(16, 128, 32, 32)]
        for s in gn:
            n = math.prod(s)
            cases.append(Case("group_norm_silu", s, dt, bytes_moved=3 * n * es))  # read x twice, write y
        att = [(16, 256, 256), (16, 1024, 128), (1, 64, 512)] if not quick else [(16, 256, 256)]
        for B, N, d in att:
            cases.append(Case("attention", (B, 1, N, d), dt, bytes_moved=4 * B * N * d * es,
                              flops=4.0 * B * N * N * d))
    return cases


def _inputs(case: Case, dev):
    from fastddpm import NoiseSchedule

    g = torch.Generator(device=dev).manual_seed(0)
    sched = NoiseSchedule(device=dev)
    if case.op == "q_sample":
        x = torch.randn(case.shape, generator=g, device=dev).to(case.dtype)
        e = torch.randn(case.shape, generator=g, device=dev).to(case.dtype)
        t = torch.randint(0, 1000, (case.shape[0],), generator=g, device=dev)
        return sched, (x, e, t)
    if case.op == "ddpm_step":
        x = torch.randn(case.shape, generator=g, device=dev).to(case.dtype)
        m = torch.randn(case.shape, generator=g, device=dev).to(case.dtype)
        z = torch.randn(case.shape, generator=g, device=dev).to(case.dtype)
        t = torch.randint(1, 1000, (case.shape[0],), generator=g, device=dev)
        return sched, (x, m, z, t)
    if case.op == "group_norm_silu":
        x = torch.randn(case.shape, generator=g, device=dev).to(case.dtype)
        w = torch.randn(case.shape[1], generator=g, device=dev).to(case.dtype)
        b = torch.randn(case.shape[1], generator=g, device=dev).to(case.dtype)
        return sched, (x, w, b)
    q, k, v = (torch.randn(case.shape, generator=g, device=dev).to(case.dtype) for _ in range(3))
    return sched, (q, k, v)


def providers(case: Case, sched, args) -> dict:
    """name -> zero-argument callable, for every provider of this case."""
    from fastddpm import ops
    from fastddpm.ops import reference

    if case.op == "q_sample":
        x, e, t = args
        eager = lambda: reference.q_sample(x, e, t, sched.sqrt_alphas_cumprod, sched.sqrt_one_minus_alphas_cumprod)[0]
        p = {b: (lambda b=b: ops.q_sample(x, t, e, sched, backend=b)) for b in ("triton", "cuda")}
    elif case.op == "ddpm_step":
        x, m, z, t = args
        philox = case.extra.get("noise") == "philox"
        kw = dict(noise="philox", seed=1) if philox else dict(noise=z)
        eager = lambda: ops.ddpm_step(x, m, t, sched, backend="torch", **kw)
        p = {b: (lambda b=b: ops.ddpm_step(x, m, t, sched, backend=b, **kw)) for b in ("triton", "cuda")}
    elif case.op == "group_norm_silu":
        x, w, b_ = args
        G = 32
        eager = lambda: F.silu(F.group_norm(x, G, w, b_))
        p = {b: (lambda b=b: ops.group_norm_silu(x, G, w, b_, backend=b)) for b in ("triton", "cuda")}
    else:
        q, k, v = args
        eager = lambda: reference.attention(q, k, v)
        p = {b: (lambda b=b: ops.attention(q, k, v, backend=b)) for b in ("triton", "cuda")}
    p["torch eager"] = eager
    if case.extra.get("noise") != "philox":  # compiling the int64 Philox reference takes minutes: skip it
        p["torch.compile"] = torch.compile(eager)
    return p


def reference64(case: Case, sched, args):
    from fastddpm import ops
    from fastddpm.ops import reference

    if case.op == "q_sample":
        x, e, t = args
        return reference.q_sample(x.double(), e.double(), t, sched.sqrt_alphas_cumprod.double(),
                                  sched.sqrt_one_minus_alphas_cumprod.double())[0]
    if case.op == "ddpm_step":
        x, m, z, t = args
        philox = case.extra.get("noise") == "philox"
        zz = reference.philox_normal(x.shape, 1, 0, x.device) if philox else z.double()
        return reference.ddpm_step(x.double(), m.double(), t, t - 1, sched.alphas_cumprod.double(), zz, None,
                                   0, 0, 1, 0, 0, 0.0, False)[0]
    if case.op == "group_norm_silu":
        x, w, b = args
        return F.silu(F.group_norm(x.double(), 32, w.double(), b.double()))
    q, k, v = args
    return ops.reference.attention(q.double(), k.double(), v.double())


def error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max(max |ref|, 1)."""
    return ((out.double() - ref).abs().max() / ref.abs().max().clamp(min=1.0)).item()


def render_table(rows: list[dict]) -> str:
    """The final short table (pure)."""
    head = f"{'op':16} {'shape':18} {'dtype':9} {'provider':14} {'ms':>9} {'GB/s':>7} {'TFLOP/s':>8} {'err':>9} ok"
    lines = [head, "-" * len(head)]
    def num(r, key, fmt):
        v = r.get(key)
        return format(v, fmt) if isinstance(v, (int, float)) and v == v else "-"

    for r in rows:
        lines.append(f"{r['op']:16} {r['shape']:18} {r['dtype']:9} {r['provider']:14} {num(r, 'ms', '9.4f')} "
                     f"{num(r, 'gbps', '7.0f')} {num(r, 'tflops', '8.1f')} {num(r, 'err', '9.2e')} {r.get('ok', '-')}")
    return "\n".join(lines)


def device_rates(dev) -> dict:
    import triton.testing

    n = 256 * 2**20
    a = torch.empty(n, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a))
    x = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    ms_mm = triton.testing.do_bench(lambda: x @ x)
    return {"copy_gbps": 2 * n / ms * 1e-6, "bf16_tflops": 2 * 8192**3 / ms_mm * 1e-9}


TOL = {torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def run(quick: bool, csv_path: str | None) -> list[dict]:
    import triton.testing

    dev = torch.device("cuda")
    rates = device_rates(dev)
    print(f"# {machine()}")
    print(f"# measured: copy {rates['copy_gbps']:.0f} GB/s, bf16 matmul {rates['bf16_tflops']:.0f} TFLOP/s", flush=True)
    rows = []
    for case in plan(quick):
        sched, args = _inputs(case, dev)
        ref = reference64(case, sched, args)
        for name, fn in providers(case, sched, args).items():
            row = dict(op=case.op + (f"[{case.extra['noise']}]" if case.extra else ""),
                       shape="x".join(map(str, case.shape)), dtype=str(case.dtype).replace("torch.", ""),
                       provider=name)
            try:
                out = fn()
                torch.cuda.synchronize()
                err = error(out, ref)
                row["err"] = err
                row["ok"] = "yes" if err <= TOL[case.dtype] * (5 if name.startswith("torch") else 1) else "NO"
                ms = triton.testing.do_bench(fn)
                row["ms"] = ms
                row["gbps"] = case.bytes_moved / ms * 1e-6 if case.bytes_moved else float("nan")
                row["tflops"] = case.flops / ms * 1e-9 if case.flops else float("nan")
            except Exception as exc:  # noqa: BLE001
                row["ok"] = f"error: {type(exc).__name__}: {str(exc)[:80]}"
            rows.append(row)
            print(row, flush=True)
    rows += whole_step(dev)
    print()
    print(render_table(rows))
    if csv_path:
        write_csv(csv_path, [{**r, **rates} for r in rows])
    return rows


def whole_step(dev) -> list[dict]:
    """One denoising step of the CIFAR-10 U-Net at batch 16, eager vs CUDA graph."""
    rows = []
    try:
        import fastddpm

        model = fastddpm.UNet.ddpm_cifar10().to(dev).eval()
        for steps, graph in ((20, False), (20, True)):
            kw = dict(steps=steps, seed=0, progress=False, device=dev)
            if graph:
                kw["cuda_graph"] = True
            with torch.no_grad():
                fastddpm.sample(model, (16, 3, 32, 32), **kw)  # warm-up (and capture)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                fastddpm.sample(model, (16, 3, 32, 32), **kw)
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) / steps * 1e3
            rows.append(dict(op="unet+step", shape="16x3x32x32", dtype="float32",
                             provider="cuda graph" if graph else "eager", ms=ms, ok="-"))
            print(rows[-1], flush=True)
    except Exception as exc:  # noqa: BLE001
        rows.append(dict(op="unet+step", shape="16x3x32x32", dtype="float32", provider="-",
                         ok=f"error: {type(exc).__name__}: {str(exc)[:100]}"))
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one shape per op, two dtypes")
    ap.add_argument("--csv", default=None, help="append rows to this CSV")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_suite: no CUDA device is visible (torch.cuda.is_available() is False); "
              "run it on a machine with an NVIDIA GPU", file=sys.stderr)
        return 2
    run(args.quick, args.csv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
