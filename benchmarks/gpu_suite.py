"""The GPU suite: every op on every backend, correctness against float64 on the device, then timings.

    python benchmarks/gpu_suite.py [--quick] [--no-compile] [--csv PATH]
    python benchmarks/gpu_suite.py --unet-only --batches 1,64 --dtypes float32,bfloat16 [--max-autotune]
                                   [--budget SECONDS] [--csv PATH]

On any CUDA GPU: measures the device's copy bandwidth and matmul rates first (fp32, tf32, bf16, fp16);
for each op and shape (q_sample; ddpm_step with a noise tensor and with in-kernel Philox; ddim_step
deterministic and with noise; dpmpp_step's second-order update; group_norm_silu and attention forward and
forward+backward) checks every backend (triton, cuda, torch eager, torch.compile, and SDPA called directly
for attention) against the float64 reference on the device, with the same bounds as the CPU tests, then
times it with
triton.testing.do_bench (median ms), reporting GB/s (counting the minimum bytes the op must move) and
TFLOP/s (attention), each also as a fraction of the measured copy bandwidth and matmul rate. It ends
with the whole denoising step of the CIFAR-10 U-Net (eager, CUDA graph, and with --max-autotune the model
under torch.compile(mode="max-autotune")), each row's images checked: eager's against the same run on the
PyTorch path, the others' against eager's; then a short table and optional CSV rows. Exit code 1 when
any backend's result is outside its bound against float64 ("NO") or a row errored (each such row is
listed on stderr, after the table and the CSV); 2 without a GPU, or for a bad option, with a clear
message.

Everything but the GPU timing runs on a CPU too (tests/test_gpu_suite.py checks the planning, the inputs,
the providers and the float64 references on the CPU backends and on the triton backend through Triton's
interpreter, the fractions, the table, the CSV and the exit code).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastddpm.bench.countops import min_bytes  # noqa: E402
from fastddpm.bench.ops import attention_flops, eager_group_norm_silu, fused_group_norm_silu, tensor_call  # noqa: E402
from fastddpm.bench.suite import Case  # noqa: E402
from fastddpm.bench.timing import cuda_ms, machine, time_calls, write_csv  # noqa: E402

BACKENDS = ("triton", "cuda")


def nbytes(case: Case) -> int:
    """The minimum bytes the case's op must move (GB/s counts against it)."""
    es = torch.finfo(case.dtype).bits // 8
    noise = case.extra.get("noise") == "tensor" or bool(case.extra.get("eta"))
    return min_bytes(case.op, case.shape, es, noise_tensor=noise, backward=case.backward)


def flops(case: Case) -> float:
    """Attention's matmul FLOPs (fastddpm.bench.ops.attention_flops); 0 for the other ops."""
    if case.op != "attention":
        return 0.0
    B, H, N, d = case.shape
    return attention_flops(B, N, d, case.backward, heads=H)


def plan(quick: bool = False) -> list[Case]:
    """The cases of the suite (pure: no GPU needed)."""
    dtypes = [torch.float32, torch.bfloat16] if quick else [torch.float32, torch.float16, torch.bfloat16]
    img = [(16, 3, 32, 32), (64, 3, 256, 256)]  # the U-Net's images; the large one is bandwidth-bound
    gn = [(16, 128, 32, 32), (64, 256, 32, 32)] if quick else [(16, 128, 32, 32), (16, 256, 16, 16),
                                                               (1, 256, 8, 8), (64, 256, 32, 32)]
    att = [(16, 256, 256)] if quick else [(16, 256, 256), (16, 1024, 128), (1, 64, 512), (64, 1024, 256)]
    ops_ = [("q_sample", s, {}) for s in img]
    ops_ += [("ddpm_step", s, {"noise": n}) for s in img for n in ("tensor", "philox")]
    ops_ += [("ddim_step", s, {"eta": e}) for s in img for e in ((0,) if quick else (0, 1))]
    ops_ += [("dpmpp_step", s, {}) for s in img]  # the second-order update (every step but the first)
    ops_ += [("group_norm_silu", s, b) for s in gn for b in ({}, {"backward": True})]
    ops_ += [("attention", (B, 1, N, d), b) for B, N, d in att for b in ({}, {"backward": True})]
    return [Case("op", op, s, dtype=dt, extra=x) for dt in dtypes for op, s, x in ops_]


def _inputs(case: Case, dev):
    from fastddpm import NoiseSchedule

    g = torch.Generator(device=dev).manual_seed(0)
    sched = NoiseSchedule(device=dev)

    def rnd(*shape):
        return torch.randn(shape, generator=g, device=dev).to(case.dtype)

    B = case.shape[0]
    if case.op == "q_sample":
        return sched, (rnd(*case.shape), rnd(*case.shape), torch.randint(0, 1000, (B,), generator=g, device=dev))
    if case.op in ("ddpm_step", "ddim_step"):
        t = torch.randint(1, 1000, (B,), generator=g, device=dev)
        return sched, (rnd(*case.shape), rnd(*case.shape), rnd(*case.shape), t)
    if case.op == "dpmpp_step":  # x, the model's output, the previous x0 prediction; t, prev_t, last_t
        t = torch.randint(20, 980, (B,), generator=g, device=dev)
        return sched, (rnd(*case.shape), rnd(*case.shape), rnd(*case.shape), t, t - 20, t + 20)
    if case.op == "group_norm_silu":
        args = (rnd(*case.shape), rnd(case.shape[1]), rnd(case.shape[1]))
    else:
        args = tuple(rnd(*case.shape) for _ in range(3))
    if case.backward:
        dy = rnd(*case.shape)
        return sched, tuple(a.requires_grad_() for a in args) + (dy,)
    return sched, args


def _tensor_fns(op: str, backends) -> tuple[dict[str, Callable], Callable]:
    """group_norm_silu (32 groups) or attention: ({backend: fused function}, torch's eager function)."""
    from fastddpm import ops
    from fastddpm.ops import reference

    if op == "group_norm_silu":
        fused = {b: functools.partial(fused_group_norm_silu, backend=b) for b in backends}
        return fused, eager_group_norm_silu
    fused = {b: (lambda q, k, v, b=b: ops.attention(q, k, v, backend=b)) for b in backends}
    fused["sdpa"] = F.scaled_dot_product_attention  # PyTorch's own choice of fused kernel, called directly
    return fused, reference.attention


def providers(case: Case, sched, args, backends=BACKENDS, compile: bool = True) -> dict[str, Callable]:
    """name -> zero-argument callable, for every provider of this case."""
    from fastddpm import ops
    from fastddpm.ops import reference

    p: dict[str, Callable] = {}
    if case.op == "q_sample":
        x, e, t = args
        eager = lambda: reference.q_sample(x, e, t, sched.sqrt_alphas_cumprod, sched.sqrt_one_minus_alphas_cumprod)[0]
        p = {b: (lambda b=b: ops.q_sample(x, t, e, sched, backend=b)) for b in backends}
    elif case.op == "ddpm_step":
        x, m, z, t = args
        philox = case.extra.get("noise") == "philox"
        kw = dict(noise="philox", seed=1) if philox else dict(noise=z)
        eager = lambda: ops.ddpm_step(x, m, t, sched, backend="torch", **kw)
        p = {b: (lambda b=b: ops.ddpm_step(x, m, t, sched, backend=b, **kw)) for b in backends}
    elif case.op == "ddim_step":
        x, m, z, t = args
        prev = (t - 20).clamp(min=-1)
        kw = dict(eta=float(case.extra["eta"]), noise=z if case.extra["eta"] else "none")
        eager = lambda: ops.ddim_step(x, m, t, sched, prev, backend="torch", **kw)
        p = {b: (lambda b=b: ops.ddim_step(x, m, t, sched, prev, backend=b, **kw)) for b in backends}
    elif case.op == "dpmpp_step":
        x, m, x0, t, pt, lt = args
        eager = lambda: ops.dpmpp_step(x, m, t, sched, pt, x0, lt, backend="torch")
        p = {b: (lambda b=b: ops.dpmpp_step(x, m, t, sched, pt, x0, lt, backend=b)) for b in backends}
    else:  # group_norm_silu and attention: functions of their tensors, forward or forward + backward
        fused, ref = _tensor_fns(case.op, backends)
        leaves, dy = (args[:-1], args[-1]) if case.backward else (args, None)
        p, eager = {b: tensor_call(f, leaves, dy) for b, f in fused.items()}, tensor_call(ref, leaves, dy)
    p["torch eager"] = eager
    # compiling the int64 Philox reference takes minutes: skip it
    if compile and case.extra.get("noise") != "philox":
        p["torch.compile"] = torch.compile(eager)
    return p


def reference64(case: Case, sched, args):
    """The float64 result on the device (the gradients for a backward case)."""
    from fastddpm.ops import reference

    if case.op == "q_sample":
        x, e, t = args
        return reference.q_sample(x.double(), e.double(), t, sched.sqrt_alphas_cumprod.double(),
                                  sched.sqrt_one_minus_alphas_cumprod.double())[0]
    if case.op == "ddpm_step":
        x, m, z, t = args
        philox = case.extra.get("noise") == "philox"
        zz = reference.philox_normal(x.shape, 1, 0, x.device) if philox else z.double()
        # seed, offset, noise_mode (1: the tensor zz), prediction (epsilon), variance (fixed_small), no clip
        return reference.ddpm_step(x.double(), m.double(), t, t - 1, sched.alphas_cumprod.double(), zz, None,
                                   0, 0, 1, 0, 0, 0.0, False)[0]
    if case.op == "ddim_step":
        x, m, z, t = args
        eta = float(case.extra["eta"])
        # final abar 1, noise tensor (mode 1) or none (0), epsilon, no clip, no clipped model output
        return reference.ddim_step(x.double(), m.double(), t, (t - 20).clamp(min=-1), sched.alphas_cumprod.double(),
                                   1.0, z.double(), 0, 0, 1 if eta else 0, 0, eta, 0.0, False, False)[0]
    if case.op == "dpmpp_step":
        x, m, x0, t, pt, lt = args
        # epsilon prediction, no clip, no predicted x0 returned
        return reference.dpmpp_step(x.double(), m.double(), x0.double(), t, pt, lt, sched.alphas_cumprod.double(),
                                    0, 0.0, False)[0]
    f = _tensor_fns(case.op, ())[1]
    if case.backward:
        *leaves, dy = args
        leaves64 = [a.detach().double().requires_grad_() for a in leaves]
        return torch.autograd.grad(f(*leaves64), leaves64, dy.double())
    return f(*(a.double() for a in args))


def error(out, ref) -> float:
    """max |out - ref| / max(max |ref|, 1); for tuples (gradients) the worst of the elements."""
    if isinstance(ref, (tuple, list)):
        return max(error(o, r) for o, r in zip(out, ref))
    return ((out.double() - ref).abs().max() / ref.abs().max().clamp(min=1.0)).item()


TOL = {torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def tolerance(case: Case, provider: str) -> float:
    """The bound a provider's error must stay within: the dtype's, 5x for torch's own implementations (which
    round every intermediate), 4x more for gradients (several reductions in a row)."""
    tol = TOL[case.dtype] * (5 if provider.startswith("torch") else 1)
    return tol * (4 if case.backward else 1)


def rates(case: Case, ms: float, device: dict, nbytes_: int | None = None) -> dict:
    """GB/s and TFLOP/s of one timed call, and their fractions of the device's measured rates (pure)."""
    b, f = nbytes(case) if nbytes_ is None else nbytes_, flops(case)
    out = {"gbps": b / ms * 1e-6 if b else float("nan"), "tflops": f / ms * 1e-9 if f else float("nan")}
    out["bw_frac"] = out["gbps"] / device["copy_gbps"] if device.get("copy_gbps") else float("nan")
    peak = device.get({torch.float32: "fp32_tflops", torch.float16: "fp16_tflops",
                       torch.bfloat16: "bf16_tflops"}[case.dtype])
    out["flops_frac"] = out["tflops"] / peak if peak and f else float("nan")
    return out


def check_and_time(case: Case, dev, bench: Callable[[Callable], float], device_rates_: dict,
                   backends=BACKENDS, compile: bool = True) -> list[dict]:
    """Rows for one case: each provider's error against float64 on ``dev``, then its time via ``bench``."""
    sched, args = _inputs(case, dev)
    ref = reference64(case, sched, args)
    rows = []
    for name, fn in providers(case, sched, args, backends, compile).items():
        row = dict(op=case.label, shape="x".join(map(str, case.shape)), dtype=str(case.dtype).replace("torch.", ""),
                   provider=name)
        try:
            out = fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            err = error(out, ref)
            row["err"] = err
            row["ok"] = "yes" if err <= tolerance(case, name) else "NO"
            ms = bench(fn)
            row["ms"] = ms
            row.update(rates(case, ms, device_rates_))
        except Exception as exc:  # noqa: BLE001  (a backend that cannot serve the case is a row, not a stop)
            row["ok"] = f"error: {type(exc).__name__}: {str(exc)[:80]}"
        rows.append(row)
    return rows


def render_table(rows: list[dict]) -> str:
    """The final short table (pure)."""
    head = (f"{'op':28} {'shape':18} {'dtype':9} {'provider':14} {'ms':>9} {'GB/s':>7} {'%bw':>5} "
            f"{'TFLOP/s':>8} {'%mm':>5} {'err':>9} ok")
    lines = [head, "-" * len(head)]

    def num(r, key, fmt, scale=1.0):
        v = r.get(key)
        return format(v * scale, fmt) if isinstance(v, (int, float)) and v == v else "-"

    for r in rows:
        lines.append(f"{r['op']:28} {r['shape']:18} {r['dtype']:9} {r['provider']:14} {num(r, 'ms', '9.4f')} "
                     f"{num(r, 'gbps', '7.0f')} {num(r, 'bw_frac', '5.0f', 100)} {num(r, 'tflops', '8.1f')} "
                     f"{num(r, 'flops_frac', '5.0f', 100)} {num(r, 'err', '9.2e')} {r.get('ok', '-')}")
    return "\n".join(lines)


bench_median = cuda_ms  # fastddpm.bench.timing's CUDA mode: do_bench medians in ms


def device_rates(dev) -> dict:
    """The device's copy bandwidth (read + write) and matmul rates, measured (not from a spec sheet)."""
    n = 256 * 2**20
    a = torch.empty(n, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    out = {"copy_gbps": 2 * n / bench_median(lambda: b.copy_(a)) * 1e-6}
    N = 8192
    for key, dt, tf32 in (("fp32_tflops", torch.float32, False), ("tf32_tflops", torch.float32, True),
                          ("bf16_tflops", torch.bfloat16, False), ("fp16_tflops", torch.float16, False)):
        x = torch.randn(N, N, device=dev, dtype=dt)
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            out[key] = 2 * N**3 / bench_median(lambda x=x: x @ x) * 1e-9
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
        del x
    return out


def run(quick: bool, csv_path: str | None, compile: bool = True, unet: dict | None = None, ops: bool = True
        ) -> list[dict]:
    """The op rows (``ops``; ``compile``: with torch.compile providers), then the whole denoising step (``unet``:
    keyword arguments of whole_step; default batch 16, fp32, eager and CUDA graph); the table, the CSV."""
    dev = torch.device("cuda")
    print(f"# {machine()}", flush=True)
    rows, dr = [], {}
    if ops:
        dr = device_rates(dev)
        print("# measured: copy {copy_gbps:.0f} GB/s; matmul fp32 {fp32_tflops:.0f}, tf32 {tf32_tflops:.0f}, "
              "bf16 {bf16_tflops:.0f}, fp16 {fp16_tflops:.0f} TFLOP/s".format(**dr), flush=True)
        for case in plan(quick):
            for row in check_and_time(case, dev, bench_median, dr, compile=compile):
                rows.append(row)
                print(row, flush=True)
    rows += whole_step(dev, **(unet or {}))
    print()
    print(render_table(rows))
    if csv_path:
        write_csv(csv_path, [{**r, **dr} for r in rows])
    return rows


# Bounds of the whole-step rows, max |out - ref| / max(max |ref|, 1) over the final images after `steps` steps.
# Eager against the PyTorch path (every fused op through the float-by-float torch reference): the kernels round
# differently, and 20 steps carry the differences along. CUDA graph and torch.compile against eager: the same
# kernels replayed (graph), or the model's ops fused by Inductor (compile).
UNET_TOL = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}
UNET_REPLAY_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
UNET_PROVIDERS = ("eager", "cuda graph", "torch.compile max-autotune")


def _cifar10_unet(dev, dtype):
    import fastddpm

    return fastddpm.UNet.ddpm_cifar10().to(dev, dtype).eval()


def whole_step(dev, batches=(16,), dtypes=(torch.float32,), providers=("eager", "cuda graph"), steps: int = 20,
               reps: int = 3, deadline: float | None = None, model_fn=None, sample_fn=None) -> list[dict]:
    """Whole denoising steps of the CIFAR-10 U-Net (``model_fn(dev, dtype)``): ``fastddpm.sample`` with ``steps``
    DDPM steps and in-kernel Philox noise (seed 0), per batch size and dtype and provider: "eager", "cuda
    graph" (the step captured once and replayed), "torch.compile max-autotune" (the model compiled). Each row
    is the median of ``reps`` timed runs after a warm-up (which also captures or compiles), in ms per step,
    and checks its images: eager's against the same run with every fused op on the PyTorch path
    (FASTDDPM_BACKEND=torch), the others' against eager's. Providers not started before ``deadline``
    (time.monotonic()) are rows marked "skipped: out of time" (not failures)."""
    model_fn = model_fn or _cifar10_unet
    if sample_fn is None:
        import fastddpm

        sample_fn = fastddpm.sample
    rows = []
    for B in batches:
        for dt in dtypes:
            shape = (B, 3, 32, 32)
            base = dict(op="unet+step", shape="x".join(map(str, shape)), dtype=str(dt).replace("torch.", ""))
            kw = dict(steps=steps, seed=0, noise="philox", progress=False, device=dev)
            try:
                model = model_fn(dev, dt)
                with torch.no_grad(), mock.patch.dict(os.environ, FASTDDPM_BACKEND="torch"):
                    ref = sample_fn(model, shape, **kw).double()
            except Exception as exc:  # noqa: BLE001
                rows.append({**base, "provider": "-", "ok": f"error: {type(exc).__name__}: {str(exc)[:100]}"})
                print(rows[-1], flush=True)
                continue
            eager_out = None
            for prov in providers:
                row = {**base, "provider": prov}
                if deadline is not None and time.monotonic() > deadline:
                    rows.append({**row, "ok": "skipped: out of time"})
                    print(rows[-1], flush=True)
                    continue
                try:
                    m = torch.compile(model, mode="max-autotune") if prov.startswith("torch.compile") else model
                    pkw = dict(kw, cuda_graph=prov == "cuda graph")
                    with torch.no_grad():
                        out = sample_fn(m, shape, **pkw)  # warm-up (and capture, or compilation)
                        run = functools.partial(sample_fn, m, shape, **pkw)
                        ts = [time_calls(run, 1, dev) for _ in range(reps)]
                    if prov == "eager":
                        eager_out = out
                        against, tol, row["vs"] = ref, UNET_TOL[dt], "torch path"
                    elif eager_out is None:
                        raise RuntimeError("no eager row to check against (list 'eager' first)")
                    else:
                        against, tol, row["vs"] = eager_out.double(), UNET_REPLAY_TOL[dt], "eager"
                        if prov.startswith("torch.compile"):
                            tol = UNET_TOL[dt]  # Inductor fuses and reorders the model's arithmetic
                    row["err"] = error(out, against)
                    row["ok"] = "yes" if row["err"] <= tol else "NO"
                    row["ms"] = statistics.median(ts) / steps * 1e3
                except Exception as exc:  # noqa: BLE001
                    row["ok"] = f"error: {type(exc).__name__}: {str(exc)[:100]}"
                rows.append(row)
                print(rows[-1], flush=True)
    return rows


def failures(rows: list[dict]) -> list[dict]:
    """The rows that fail the run: a result outside its bound against float64, or an error (pure)."""
    return [r for r in rows if r.get("ok") == "NO" or str(r.get("ok", "")).startswith("error")]


def report_failures(rows: list[dict]) -> int:
    """List the failing rows on stderr; the exit code (1 if any, else 0)."""
    bad = failures(rows)
    if not bad:
        return 0
    print(f"gpu_suite: {len(bad)} of {len(rows)} rows failed:", file=sys.stderr)
    for r in bad:
        err = f" (error {r['err']:.2e}, over the bound)" if r.get("ok") == "NO" and "err" in r else ""
        print(f"  {r.get('op')} {r.get('shape', '')} {r.get('dtype', '')} {r.get('provider')}: {r['ok']}{err}",
              file=sys.stderr)
    return 1


def _csv_list(text: str, kind):
    return tuple(kind(v) for v in text.split(",") if v)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes, two dtypes")
    ap.add_argument("--no-compile", action="store_true", help="no torch.compile providers in the op rows")
    ap.add_argument("--csv", default=None, help="append rows to this CSV")
    ap.add_argument("--unet-only", action="store_true", help="only the whole-step rows of the CIFAR-10 U-Net")
    ap.add_argument("--batches", default="16", help="whole-step batch sizes, comma-separated (default 16)")
    ap.add_argument("--dtypes", default="float32", help="whole-step dtypes: float32,bfloat16,float16")
    ap.add_argument("--max-autotune", action="store_true",
                    help="whole-step rows of the model under torch.compile(mode='max-autotune') (and eager's, "
                         "its check) instead of eager and CUDA graph")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds from start after which no new whole-step provider starts (its row says so)")
    args = ap.parse_args(argv)
    start = time.monotonic()

    def usage(msg: str) -> int:
        print(f"gpu_suite: {msg}", file=sys.stderr)
        return 2

    try:
        batches = _csv_list(args.batches, int)
        dtypes = _csv_list(args.dtypes, lambda n: {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                                   "float16": torch.float16}[n])
    except (ValueError, KeyError) as exc:
        return usage(f"--batches/--dtypes: cannot read {exc} (e.g. --batches 1,64 --dtypes float32,bfloat16)")
    if not batches or any(b < 1 for b in batches):
        return usage(f"--batches: expected positive batch sizes, comma-separated, got {args.batches!r}")
    if not dtypes:
        return usage(f"--dtypes: expected float32, bfloat16 or float16, comma-separated, got {args.dtypes!r}")
    if args.budget is not None and not 0 < args.budget < float("inf"):
        return usage(f"--budget: expected a positive number of seconds, got {args.budget}")
    if args.csv is not None:  # before the GPU run (minutes), not after it
        from fastddpm._io import check_output_file
        from fastddpm.bench.timing import check_appendable

        try:
            check_output_file(args.csv, "--csv", (".csv",))
            check_appendable(args.csv, "--csv")
        except ValueError as exc:
            return usage(str(exc))
    if not torch.cuda.is_available():
        print("gpu_suite: no CUDA device is visible (torch.cuda.is_available() is False); "
              "run it on a machine with an NVIDIA GPU", file=sys.stderr)
        return 2
    # --max-autotune: eager (what the compiled model is checked against) and the compiled model
    providers = (UNET_PROVIDERS[0], UNET_PROVIDERS[2]) if args.max_autotune else UNET_PROVIDERS[:2]
    unet = dict(batches=batches, dtypes=dtypes, providers=providers,
                deadline=start + args.budget if args.budget is not None else None)
    return report_failures(run(args.quick, args.csv, compile=not args.no_compile, unet=unet, ops=not args.unet_only))


if __name__ == "__main__":
    raise SystemExit(main())
