"""Compile every Triton kernel launch the ops make for an NVIDIA GPU, on a machine without one.

    python scripts/compile_triton.py [--arch 90] [--json FILE] [--launches FILE] [--only TEXT]

Triton's CPU interpreter runs the kernels' Python, not Triton's compiler: code it accepts can still fail to
compile for a GPU (a function returning an int64 on one constexpr branch and an int32 on the other did). This
script first runs the ops' Triton backends through the interpreter on small inputs, in a child process,
recording each kernel launch as Triton's JIT would specialise it on a GPU (argument types, alignment hints,
constexpr values, num_warps and num_stages); then,
without the interpreter, compiles each distinct launch with triton.compile for GPUTarget("cuda", ARCH, 32),
through PTX to a cubin with the ptxas that ships with Triton, and prints ptxas' register and spill counts and
the shared memory of each. Exit status 1
when a launch fails to compile (each is listed; a launch that needs more shared memory than a block of that
architecture may have compiles, and is marked), 2 when Triton or its CUDA backend is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ops_calls():
    """The launches to record: every Triton op with each option that selects other compiled code."""
    import torch
    from fastddpm.triton_kernels.ddpm_step import philox_bits_triton

    from fastddpm import NoiseSchedule, ops

    g = torch.Generator().manual_seed(0)
    s = NoiseSchedule()
    x, m, z = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    t, kw = torch.tensor([5, 500]), dict(backend="triton")
    for target in ("eps", "v"):
        ops.q_sample(x, t, z, s, target=target, **kw)
    ops.q_sample(x.half(), t, z.half(), s, **kw)
    for pred in ("epsilon", "sample", "v_prediction"):
        for noise in (z, "philox", "none"):
            seed = 1 if isinstance(noise, str) and noise == "philox" else None
            ops.ddpm_step(x, m, t, s, noise=noise, seed=seed, prediction_type=pred, clip_sample=pred == "sample",
                          return_pred_original=noise is z, **kw)
    ops.ddpm_step(x, m, t, s, noise="philox", seed=1, offset=torch.tensor(3), diffusers_beta=True, **kw)
    for vt in ("fixed_small_log", "fixed_large", "learned", "learned_range"):
        ops.ddpm_step(x, m, t, s, noise=z, variance_type=vt, predicted_variance=z if "learned" in vt else None, **kw)
    ops.ddpm_step(x.bfloat16(), m.bfloat16(), t, s, noise="philox", seed=1, **kw)
    for pred in ("epsilon", "sample", "v_prediction"):
        for eta, noise in ((0.0, "none"), (1.0, z), (0.5, "philox")):
            seed = 1 if isinstance(noise, str) and noise == "philox" else None
            ops.ddim_step(x, m, t, s, t - 20, eta=eta, noise=noise, seed=seed, prediction_type=pred,
                          clip_sample=eta == 0, use_clipped_model_output=eta > 0, return_pred_original=eta > 0, **kw)
    ops.ddim_step(x, m, t, s, t - 20, eta=1.0, noise="philox", seed=1, offset=torch.tensor(2), diffusers_beta=True,
                  **kw)
    for pred in ("epsilon", "sample", "v_prediction"):
        ops.dpmpp_step(x, m, t, s, t - 20, prediction_type=pred, clip_sample=True, **kw)
        ops.dpmpp_step(x, m, t, s, t - 20, x, t + 20, prediction_type=pred, return_pred_original=True, **kw)
    ops.dpmpp_step(x, m, t, s, -1, x, t + 20, **kw)
    for dtype in (torch.float32, torch.bfloat16):
        for cl in (False, True):
            xg = torch.randn(1, 8, 4, 4, generator=g, dtype=dtype)
            xg = xg.contiguous(memory_format=torch.channels_last) if cl else xg
            w, b, sh = torch.randn(8, dtype=dtype), torch.randn(8, dtype=dtype), torch.randn(1, 8, dtype=dtype)
            leaves = [a.requires_grad_() for a in (xg, w, b, sh)]
            y = ops.group_norm_silu(xg, 4, w, b, shift=sh if cl else None, **kw)
            torch.autograd.grad(y, leaves if cl else leaves[:3], torch.randn_like(y))
            with torch.no_grad():
                ops.group_norm_silu(xg, 4, None, None, activation=None, **kw)
    ops.philox_randn((2, 8), 1, 3, **kw)
    philox_bits_triton(8, 1, 3, x.device)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for d in (16, 64, 128, 256, 512):  # every head-width bucket of attention._config
            q, k, v = (torch.randn(1, 1, 5, d, generator=g, dtype=dtype).requires_grad_() for _ in range(3))
            o = ops.attention(q, k, v, **kw)
            torch.autograd.grad(o, (q, k, v), torch.randn_like(o))
    # The attention kernels' int64 variant (an offset inside one (batch, head) slice past 2**31): rows 2**30
    # elements apart in an 8 GiB buffer that is reserved, never touched beyond the rows used.
    buf = torch.empty(2 * 2**30 + 48)
    q, k, v = (buf.as_strided((1, 1, 3, 16), (0, 0, 2**30, 1), off) for off in (0, 16, 32))
    for a in (q, k, v):
        a.copy_(torch.randn(a.shape, generator=g)).requires_grad_()
    o = ops.attention(q, k, v, **kw)
    torch.autograd.grad(o, (q, k, v), torch.ones_like(o))


def record(path: str) -> None:
    """Run _ops_calls through the interpreter, writing each distinct launch to ``path`` (JSON)."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "record runs under TRITON_INTERPRET=1"
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    from triton.runtime.interpreter import InterpretedFunction

    seen: dict[str, dict] = {}
    run = InterpretedFunction.run

    def recording(self, *args, grid, warmup, **kwargs):
        params = list(self.arg_names)
        bound = dict(zip(params, args), **kwargs)
        ann = self.fn.__annotations__
        sig, consts, attrs = {}, {}, []
        for i, name in enumerate(params):
            v = bound[name]
            if "constexpr" in str(ann.get(name, "")):
                sig[name], consts[name] = "constexpr", getattr(v, "value", v)  # tl.constexpr -> its value
                continue
            # the type and the alignment hint (16-byte aligned pointers, ints divisible by 16) that Triton's JIT
            # gives this argument at a launch; an int 1 or None becomes a constexpr, as there
            kind, desc = native_specialize_impl(BaseBackend, v, False, True, True)
            sig[name] = kind
            if kind == "constexpr":
                consts[name] = desc
            elif isinstance(desc, str) and BaseBackend.parse_attr(desc):
                attrs.append([i, BaseBackend.parse_attr(desc)])
        if consts.get("UPCAST"):  # attention's bf16 workaround for the interpreter: a GPU launch passes False
            consts["UPCAST"] = False
        options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        rec = dict(module=self.fn.__module__, name=self.fn.__name__, signature=sig, constexprs=consts,
                   attrs=attrs, options=options)
        seen.setdefault(json.dumps(rec, sort_keys=True), rec)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording
    try:
        _ops_calls()
    finally:
        InterpretedFunction.run = run
    with open(path, "w") as f:
        json.dump(list(seen.values()), f, indent=1)


# The most shared memory one block may use (bytes, opt-in), per compute capability (CUDA C++ Programming Guide,
# "Technical Specifications per Compute Capability"): a kernel asking for more compiles but cannot launch.
MAX_SHARED = {75: 65536, 80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}


def _ptxas_usage(ptx: str, arch: int) -> str:
    """ptxas -v's register and spill counts of a kernel's PTX (the ptxas that ships with Triton)."""
    import re

    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"  # the "a" targets exist from sm_90 on
        err = subprocess.run([ptxas, f"-arch={sm}", "-v", f.name, "-o", os.devnull], capture_output=True,
                             text=True).stderr
    finally:
        os.unlink(f.name)
    regs, spill = re.search(r"Used (\d+) registers", err), re.search(r"(\d+) bytes spill stores", err)
    return f"{regs.group(1) if regs else '?'} registers, {spill.group(1) if spill else '?'} bytes of spill stores"


def compile_all(launches: list[dict], arch: int, log=print) -> list[str]:
    """Compile each launch for sm_<arch>, adding its shared memory in bytes to its record ("shared"); returns the
    failures (one line each)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    failures = []
    for rec in launches:
        kernel = getattr(importlib.import_module(rec["module"]), rec["name"])
        consts, attrs = rec["constexprs"], {(i,): a for i, a in rec["attrs"]}
        first = next((t for t in rec["signature"].values() if t.startswith("*")), "")
        what = f"{rec['name']} {first[1:]} {', '.join(f'{k}={v}' for k, v in consts.items())}"
        try:
            ck = triton.compile(ASTSource(fn=kernel, signature=rec["signature"], constexprs=consts, attrs=attrs),
                                target=target, options=rec["options"])
        except Exception as exc:  # noqa: BLE001  (every failing launch is reported, not only the first)
            cause = exc.__cause__ or exc  # Triton's CompilationError quotes the source; the cause says why
            lines = [ln for ln in str(cause).splitlines() if ln.strip(" ^")]
            failures.append(f"{what}: {type(cause).__name__}: {lines[-1][:300] if lines else ''}")
            log(f"FAILED {failures[-1]}")
            continue
        rec["shared"] = shared = ck.metadata.shared
        limit = MAX_SHARED.get(arch, shared)
        over = f" (more than a block of sm_{arch} may have: {limit}; it cannot launch there)" if shared > limit else ""
        log(f"ok {what}: {_ptxas_usage(ck.asm['ptx'], arch)}, {shared} bytes of shared memory{over}")
    return failures


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90 (default 90)")
    ap.add_argument("--json", default=None, metavar="FILE",
                    help="write the launches, each with its shared memory on this architecture, to FILE")
    ap.add_argument("--launches", default=None, metavar="FILE", help="compile the launches of an earlier --json")
    ap.add_argument("--only", default="", metavar="TEXT", help="only the kernels whose name contains TEXT")
    ap.add_argument("--record", default=None, help=argparse.SUPPRESS)  # the child process
    a = ap.parse_args(argv)
    if a.record:
        record(a.record)
        return 0
    if not 50 <= a.arch <= 130:
        ap.error(f"--arch: expected a compute capability such as 80 or 90, got {a.arch}")
    if a.json is not None:  # before the compile (minutes), not after it
        folder = os.path.dirname(os.path.abspath(a.json))
        if not a.json.endswith(".json") or os.path.isdir(a.json):
            ap.error(f"--json: expected a file name ending in .json, got {a.json!r}")
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            ap.error(f"--json: cannot write in the folder {folder!r}")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_triton: unset TRITON_INTERPRET (the compile step needs Triton's compiler)", file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        print(f"compile_triton: Triton with its CUDA backend is needed ({type(exc).__name__}: {exc})",
              file=sys.stderr)
        return 2
    if a.launches:
        try:
            with open(a.launches) as f:
                launches = json.load(f)
            if not (isinstance(launches, list) and all(isinstance(r, dict) and "name" in r for r in launches)):
                raise ValueError("expected a list of launches, as --json writes")
        except (OSError, ValueError) as exc:  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
            ap.error(f"--launches: cannot read {a.launches!r} ({exc})")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "launches.json")
            env = {**os.environ, "TRITON_INTERPRET": "1",
                   "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
            r = subprocess.run([sys.executable, os.path.abspath(__file__), "--record", path], env=env, cwd=ROOT)
            if r.returncode != 0:
                print(f"compile_triton: recording the launches failed (exit {r.returncode})", file=sys.stderr)
                return 1
            with open(path) as f:
                launches = json.load(f)
    launches = [rec for rec in launches if a.only in rec["name"]]
    print(f"# {len(launches)} distinct launches, compiled for sm_{a.arch} (Triton {triton.__version__})", flush=True)
    failures = compile_all(launches, a.arch, log=lambda s: print(s, flush=True))
    if a.json:  # atomically: a temporary file in the same folder, renamed into place
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=os.path.dirname(os.path.abspath(a.json)))
        try:
            with os.fdopen(fd, "w") as f:
                json.dump([{**rec, "arch": a.arch} for rec in launches], f, indent=1)
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, a.json)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    if failures:
        print(f"compile_triton: {len(failures)} of {len(launches)} launches failed to compile:", file=sys.stderr)
        for f_ in failures:
            print(f"  {f_}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
