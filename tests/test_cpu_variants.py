"""The portable CPU build: each CPU-kernel build of the install (baseline x86-64, AVX2, AVX-512, or the one
FASTDDPM_CPU_FLAGS build) that this CPU runs gives the float64 reference's answers when it is the one loaded;
the best one torch's CPU capability allows is loaded by default; one the CPU cannot run is refused with a
clear error; `fastddpm info` names the build in use. Each build runs in a subprocess of its own
(FASTDDPM_CPU_VARIANT picks it), since a process loads one.

An editable build compiles only the best build for this CPU (setup.py, FASTDDPM_CPU_VARIANTS=host), so the
others are skipped here, saying so; tests/test_packaging.py builds the wheel with all three and runs CHECK
under each one this CPU runs."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

from fastddpm.ops import _library

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Fresh random inputs of awkward sizes (vector tails, channels_last, bf16/fp16 conversions), each op against
# the float64 reference (backend "torch" on float64 inputs). fp32: relative error (max |err| / max |ref|)
# 1e-6 for q_sample and 1e-5 for the reductions (DESIGN.md's bounds); half types: no more than twice the
# error of the same reference computed in that dtype; the steps as their own test files judge them.
CHECK = r"""
import sys, torch
import fastddpm
from fastddpm.ops import _library
print(_library.CPU_VARIANT)
g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
sched = fastddpm.NoiseSchedule(1000)
ops = fastddpm.ops

def rel(a, ref):
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()

def check(name, got, ref, bound):
    e = rel(got, ref)
    assert torch.isfinite(got).all() and e <= bound, f"{name}: relative error {e:.3g} > {bound:.3g}"

def rnd(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(dtype)

# q_sample: 2163 elements per sample (not a multiple of any vector width), fp32 and bf16
for dt in (torch.float32, torch.bfloat16, torch.float16):
    x0, eps = rnd(3, 3, 7, 103, dtype=dt), rnd(3, 3, 7, 103, dtype=dt)
    t = torch.tensor([0, 431, 999])
    ref = ops.q_sample(x0.double(), t, eps.double(), sched, backend="torch")
    got = ops.q_sample(x0, t, eps, sched, backend="cpu")
    bound = 1e-6 if dt == torch.float32 else 2 * rel(ops.q_sample(x0, t, eps, sched, backend="torch"), ref)
    check(f"q_sample {dt}", got, ref, bound)

# group_norm_silu forward (NCHW and channels_last) and backward, fp32; forward in bf16
for cl in (False, True):
    x = rnd(2, 48, 13, 11) * 3 + 1
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = rnd(48), rnd(48)
    xd, wd, bd = (v.double().requires_grad_() for v in (x, w, b))
    ref = ops.group_norm_silu(xd, 6, wd, bd, backend="torch")
    xf, wf, bf = (v.clone().requires_grad_() for v in (x, w, b))
    got = ops.group_norm_silu(xf, 6, wf, bf, backend="cpu")
    check(f"group_norm_silu channels_last={cl}", got, ref.detach(), 1e-5)
    dy = rnd(*x.shape)
    ref.backward(dy.double())
    got.backward(dy)
    for nm, a, r in (("dx", xf, xd), ("dw", wf, wd), ("db", bf, bd)):
        check(f"group_norm_silu {nm} channels_last={cl}", a.grad, r.grad, 1e-5)
xh = (rnd(2, 64, 9, 19) * 2).to(torch.bfloat16)
w, b = rnd(64), rnd(64)
ref = ops.group_norm_silu(xh.double(), 8, w.double(), b.double(), backend="torch")
eager = ops.group_norm_silu(xh, 8, w.to(torch.bfloat16), b.to(torch.bfloat16), backend="torch")
check("group_norm_silu bf16", ops.group_norm_silu(xh, 8, w, b, backend="cpu"), ref, 2 * rel(eager, ref))

# the sampler steps (DDPM, DDIM, DPM-Solver++(2M) first and second order), judged as their own tests judge
# them: the error over the step's forward-error scale (the update in float64 on absolute values) <= 1e-6
sys.path.insert(0, sys.argv[1])
import test_ddim_step, test_ddpm_step, test_dpmpp_step
s, m, z, d1 = (rnd(4, 3, 9, 37) for _ in range(4))
# (t near 0 is left to the ops' own tests: there the fp32 table's rounding, not the kernel, dominates)
ts, prev = torch.tensor([980, 500, 120, 61]), torch.tensor([960, 480, 70, -1])
got = ops.ddpm_step(s, m, ts, test_ddpm_step.SCHED, noise=z, backend="cpu")
ref = test_ddpm_step.ref64(s, m, ts, noise=z)[0]  # float64 arithmetic on the kernels' own fp32 abar table
e = test_ddpm_step.forward_error_ratio(got, ref, s, m, z, ts)
assert e <= 1e-6, f"ddpm_step: {e:.3g}"
sc = test_ddim_step.SCHED
got = ops.ddim_step(s, m, ts, sc, prev_t=prev, backend="cpu")
ref = ops.ddim_step(s.double(), m.double(), ts, sc, prev_t=prev, backend="torch")
e = test_ddim_step.err_ratio(got, ref, test_ddim_step.forward_scale(s, m, ts, prev, 0.0, "epsilon")[1])
assert e <= 1e-6, f"ddim_step: {e:.3g}"
last = torch.tensor([999, 520, 170, 90])
for p, lt in ((None, None), (d1, last)):
    got = ops.dpmpp_step(s, m, ts, test_dpmpp_step.SCHED, prev_t=prev, prev_x0=p, last_t=lt, backend="cpu")
    ref = test_dpmpp_step.ref64(s, m, p, ts, prev, lt, "epsilon", False)
    k = test_dpmpp_step.forward_scale(s, m, p, ts, prev, lt, "epsilon")[1]
    e = test_ddim_step.err_ratio(got, ref, k)
    assert e <= 1e-6, f"dpmpp_step order {1 if p is None else 2}: {e:.3g}"
print("ok")
"""


def _run(code: str, *args: str, **env):
    e = dict(os.environ, OMP_NUM_THREADS="1", FASTDDPM_REQUIRE_EXTENSION="1")
    e.pop("FASTDDPM_CPU_VARIANT", None)
    e.update(env)
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=e, capture_output=True, text=True,
                          timeout=600)


def _best(built) -> str:
    if "flags" in built:
        return "flags"
    return next(v for v in _library.cpu_variants_runnable() if v in built)


def _capability_order() -> list[str]:
    # Decided here from /proc/cpuinfo, independently of torch's answer, which _library follows.
    with open("/proc/cpuinfo") as f:
        flags = set(next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), []))
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return ["avx512", "avx2", "default"]
    return ["avx2", "default"] if {"avx2", "fma"} <= flags else ["default"]


@pytest.mark.skipif(platform.machine() != "x86_64" or not os.path.exists("/proc/cpuinfo"), reason="x86-64 Linux")
def test_runnable_builds_follow_the_cpu():
    assert _library.cpu_variants_runnable() == _capability_order()


def test_the_best_build_is_loaded_and_info_names_it():
    built = _library.cpu_variants_built()
    assert built, "this install records no CPU kernel build (rebuild with setup.py)"
    assert _library.CPU_VARIANT == _best(built)
    r = _run("from fastddpm.cli import main; raise SystemExit(main(['info']))")
    assert r.returncode == 0, r.stderr
    assert f"CPU kernels: the {_best(built)} build in use" in r.stdout, r.stdout


@pytest.mark.parametrize("variant", ["default", "avx2", "avx512", "flags"])
def test_each_build_matches_float64(variant):
    built = _library.cpu_variants_built()
    if variant not in built:
        pytest.skip(f"this install has no {variant} build (built: {', '.join(built)})")
    if variant != "flags" and variant not in _library.cpu_variants_runnable():
        pytest.skip(f"this CPU ({torch.backends.cpu.get_cpu_capability()}) cannot run the {variant} build")
    r = _run(CHECK, os.path.join(ROOT, "tests"), FASTDDPM_CPU_VARIANT=variant)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == [variant, "ok"], r.stdout


def test_a_build_the_cpu_cannot_run_is_refused():
    # ATEN_CPU_CAPABILITY=default makes torch (and so fastddpm) treat this CPU as a baseline x86-64.
    r = _run("import fastddpm", FASTDDPM_CPU_VARIANT="avx2", ATEN_CPU_CAPABILITY="default")
    assert r.returncode != 0
    assert "CpuVariantError: FASTDDPM_CPU_VARIANT=avx2: this CPU cannot run it" in r.stderr, r.stderr[-2000:]
    r = _run("import fastddpm", FASTDDPM_CPU_VARIANT="sse9")
    assert r.returncode != 0 and "FASTDDPM_CPU_VARIANT: expected one of avx512, avx2, default, got 'sse9'" in r.stderr
    # From the command: one line and exit status 2.
    r = subprocess.run([sys.executable, "-m", "fastddpm", "info"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, FASTDDPM_CPU_VARIANT="sse9"))
    assert r.returncode == 2 and r.stdout == "", r.stdout + r.stderr
    assert r.stderr.strip() == "fastddpm: FASTDDPM_CPU_VARIANT: expected one of avx512, avx2, default, got 'sse9'"


def test_a_build_not_made_is_refused():
    built = _library.cpu_variants_built()
    missing = [v for v in _library.cpu_variants_runnable() if v not in built]
    if not missing:
        pytest.skip(f"every build this CPU runs is built here ({', '.join(built)})")
    r = _run("import fastddpm", FASTDDPM_CPU_VARIANT=missing[0])
    assert r.returncode != 0 and f"FASTDDPM_CPU_VARIANT={missing[0]}: not built here" in r.stderr, r.stderr[-2000:]


def test_what_was_built_matches_how():
    from fastddpm import _build_info as bi

    built, mode = list(_library.cpu_variants_built()), getattr(bi, "CPU_VARIANTS_MODE", None)
    if mode == "flags":
        assert built == ["flags"]
    elif platform.machine() not in ("x86_64", "AMD64"):
        assert built == ["default"]
    elif mode == "host":
        assert built == [_capability_order()[0]]
    else:
        assert mode == "all" and sorted(built) == ["avx2", "avx512", "default"]
