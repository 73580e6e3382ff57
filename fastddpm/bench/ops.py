"""Providers of the per-op benchmarks: each op as fastddpm runs it and as its peers do.

A provider is a zero-argument callable over inputs made once (fresh random values, never zeros). The
per-op scripts in benchmarks/ and the `fastddpm bench` suite both take their providers from here.
Bytes counted for GB/s are the minimum each op must move (countops.min_bytes); a "bound" provider copies
exactly those bytes, a "component" provider runs one part of the op's work alone (drawing the noise).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .. import NoiseSchedule, ops
from ..ops import reference
from . import refuse_reference_run
from .countops import min_bytes

Providers = dict[str, Callable[[], object]]
COPY = "torch copy (minimum bytes)"  # the name suite.role() reads as a bound


def copy_bound(nbytes: int) -> Callable[[], object]:
    """A copy that reads and writes ``nbytes`` in all (a float32 buffer of nbytes / 8 into another): what no
    implementation of an op that must move ``nbytes`` can beat."""
    src = torch.randn(max(1, nbytes // 8))
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def _schedule() -> NoiseSchedule:
    return NoiseSchedule()


# ----------------------------------------------------------------------------- q_sample
def eager_add_noise(x0, noise, t, ac):
    # diffusers' DDPMScheduler.add_noise, line by line
    sqrt_alpha_prod = ac[t] ** 0.5
    sqrt_alpha_prod = sqrt_alpha_prod.flatten()
    while len(sqrt_alpha_prod.shape) < len(x0.shape):
        sqrt_alpha_prod = sqrt_alpha_prod.unsqueeze(-1)
    sqrt_one_minus = (1 - ac[t]) ** 0.5
    sqrt_one_minus = sqrt_one_minus.flatten()
    while len(sqrt_one_minus.shape) < len(x0.shape):
        sqrt_one_minus = sqrt_one_minus.unsqueeze(-1)
    return sqrt_alpha_prod * x0 + sqrt_one_minus * noise


def q_sample_providers(shape, backend: str = "cpu", compile: bool = False, with_v: bool = True,
                       copy: bool = True) -> Providers:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps: reads x0 and eps, writes x_t (and v)."""
    refuse_reference_run()  # never time the torch reference under fastddpm's name
    sched = _schedule()
    x0, noise = torch.randn(shape), torch.randn(shape)
    t = torch.randint(0, 1000, (shape[0],))
    ac = sched.alphas_cumprod
    eager = lambda: eager_add_noise(x0, noise, t, ac)
    p: Providers = {
        "eager (diffusers add_noise)": eager,
        f"fastddpm {backend}": lambda: ops.q_sample(x0, t, noise, sched, backend=backend),
    }
    if with_v:
        p[f"fastddpm {backend} (x_t and v)"] = lambda: ops.q_sample(x0, t, noise, sched, target="v",
                                                                    backend=backend)
    if compile:
        p["torch.compile (eager)"] = torch.compile(eager)
    if copy:
        p[COPY] = copy_bound(min_bytes("q_sample", shape))
        if with_v:
            p[f"{COPY} (x_t and v)"] = copy_bound(min_bytes("q_sample", shape, v=True))
    return p


def q_sample_bytes(shape, provider: str) -> int:
    return min_bytes("q_sample", shape, v="and v" in provider)


# ----------------------------------------------------------------------------- ddpm_step
def ddpm_step_providers(shape, backend: str = "cpu", compile: bool = False, noise: str | None = None
                        ) -> Providers:
    """One reverse step at t = 500 (epsilon, fixed_small, clipped x0, as diffusers' defaults).

    ``noise``: "generator" (providers that draw their own noise: diffusers' step with a torch.Generator,
    fastddpm with the same generator or with in-kernel Philox, and torch.randn alone, a component: the
    generator's draw the first two cannot avoid), "tensor" (providers given the noise as a tensor:
    fastddpm's kernel against the reference formula in eager torch and under torch.compile), or None for
    both sets. Each set has a copy of its minimum bytes (the bound).
    """
    refuse_reference_run()  # never time the torch reference under fastddpm's name
    import diffusers

    if noise not in (None, "generator", "tensor"):
        raise ValueError(f"noise: expected None, 'generator' or 'tensor', got {noise!r}")
    sched = _schedule()
    theirs = diffusers.DDPMScheduler()
    x, m, z = torch.randn(shape), torch.randn(shape), torch.randn(shape)
    t = 500
    g = torch.Generator().manual_seed(0)
    kw = dict(clip_sample=True, backend=backend)
    p: Providers = {}
    if noise in (None, "generator"):
        p["diffusers step (generator)"] = lambda: theirs.step(m, t, x, generator=g).prev_sample
        p[f"fastddpm {backend} (generator)"] = lambda: ops.ddpm_step(x, m, t, sched, generator=g, **kw)
        p[f"fastddpm {backend} (philox)"] = lambda: ops.ddpm_step(x, m, t, sched, noise="philox", seed=1, **kw)
    if noise in (None, "tensor"):
        p[f"fastddpm {backend} (noise tensor)"] = lambda: ops.ddpm_step(x, m, t, sched, noise=z, **kw)
    if noise == "tensor":
        tt = torch.full((shape[0],), t)
        ref = lambda: ops.ddpm_step(x, m, tt, sched, noise=z, clip_sample=True, backend="torch")
        p["eager (reference, noise tensor)"] = ref
        if compile:
            p["torch.compile (reference, noise tensor)"] = torch.compile(ref)
    if noise in (None, "generator"):
        p["torch.randn alone"] = lambda: torch.randn(shape, generator=g)
        p[COPY] = copy_bound(min_bytes("ddpm_step", shape))
    if noise == "tensor":
        p[COPY] = copy_bound(min_bytes("ddpm_step", shape, noise_tensor=True))
    return p


def ddpm_step_bytes(shape, provider: str) -> int:
    if provider == "torch.randn alone":
        return 4 * math.prod(shape)  # the noise written
    return min_bytes("ddpm_step", shape, noise_tensor="tensor" in provider)


# ----------------------------------------------------------------------------- ddim_step
def ddim_step_providers(shape, backend: str = "cpu", compile: bool = False) -> Providers:
    """One DDIM step of a 50-step schedule, t = 500 to 480 (epsilon, clipped x0, as diffusers' defaults):
    diffusers' DDIMScheduler.step (eta 0), fastddpm's kernel with eta 0 and with eta 1 and a noise tensor,
    the reference formula in eager torch (and compiled), and the bound."""
    refuse_reference_run()  # never time the torch reference under fastddpm's name
    import diffusers

    sched = _schedule()
    theirs = diffusers.DDIMScheduler()
    theirs.set_timesteps(50)
    x, m, z = torch.randn(shape), torch.randn(shape), torch.randn(shape)
    kw = dict(clip_sample=True)
    tt, pt = torch.full((shape[0],), 500), torch.full((shape[0],), 480)
    ref = lambda: ops.ddim_step(x, m, tt, sched, pt, backend="torch", noise="none", **kw)
    p: Providers = {
        "diffusers step (eta 0)": lambda: theirs.step(m, 500, x, eta=0.0).prev_sample,
        f"fastddpm {backend} (eta 0)": lambda: ops.ddim_step(x, m, 500, sched, 480, backend=backend, **kw),
        f"fastddpm {backend} (eta 1, noise tensor)": lambda: ops.ddim_step(x, m, 500, sched, 480, eta=1.0, noise=z,
                                                                           backend=backend, **kw),
        "eager (reference, eta 0)": ref,
    }
    if compile:
        p["torch.compile (reference, eta 0)"] = torch.compile(ref)
    p[COPY] = copy_bound(min_bytes("ddim_step", shape))
    return p


def ddim_step_bytes(shape, provider: str) -> int:
    return min_bytes("ddim_step", shape, noise_tensor="tensor" in provider)


# ----------------------------------------------------------------------------- group_norm_silu
GN_GROUPS = 32


def eager_group_norm_silu(x, w, b):
    """What the fused op replaces: F.silu(F.group_norm(x, 32, w, b)), two ATen operators."""
    return F.silu(F.group_norm(x, GN_GROUPS, w, b))


def fused_group_norm_silu(x, w, b, backend: str = "auto"):
    return ops.group_norm_silu(x, GN_GROUPS, w, b, backend=backend)


def group_norm_silu_inputs(shape, grad: bool = False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 2 + 1
    w = torch.randn(shape[1], generator=g)
    b = torch.randn(shape[1], generator=g)
    if grad:
        for a in (x, w, b):
            a.requires_grad_()
    return x, w, b


def group_norm_silu_providers(shape, compile: bool = False, backward: bool = False, copy: bool = False
                              ) -> Providers:
    """silu(group_norm(x)) with 32 groups: the fused op, eager, eager with an in-place SiLU, compiled, and
    (``copy``) the copy of the minimum bytes.

    With ``backward`` each call is forward + backward against a fixed upstream gradient (the in-place
    variant cannot be differentiated and is left out)."""
    refuse_reference_run()  # never time the torch reference under fastddpm's name
    args = group_norm_silu_inputs(shape, grad=backward)
    fns = {"fastddpm": fused_group_norm_silu, "eager": eager_group_norm_silu}
    if not backward:
        fns["eager (in-place silu)"] = lambda x, w, b: F.silu(F.group_norm(x, GN_GROUPS, w, b), inplace=True)
    if compile:
        fns["torch.compile (eager)"] = torch.compile(eager_group_norm_silu)
    dy = torch.randn(shape) if backward else None
    p = {k: tensor_call(f, args, dy) for k, f in fns.items()}
    if copy:
        p[COPY] = copy_bound(min_bytes("group_norm_silu", shape, backward=backward))
    return p


def group_norm_silu_bytes(shape, backward: bool = False) -> int:
    return min_bytes("group_norm_silu", shape, backward=backward)


# ----------------------------------------------------------------------------- attention
def attention_providers_fns() -> dict[str, Callable]:
    return {
        "fastddpm": lambda q, k, v: ops.attention(q, k, v),  # auto: backend "cpu" on CPU tensors
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
        "materialised": lambda q, k, v: reference.attention(q, k, v),
    }


def attention_inputs(B, N, d, dtype=torch.float32, device="cpu", grad=False):
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, 1, N, d, generator=g, device=device, dtype=dtype) for _ in range(3))
    if grad:
        for x in (q, k, v):
            x.requires_grad_()
    return q, k, v


def attention_providers(B, N, d, compile: bool = False, backward: bool = False) -> Providers:
    """Single-head attention over (B, 1, N, d), as the DDPM U-Net attends over a feature map."""
    refuse_reference_run()  # never time the torch reference under fastddpm's name
    q, k, v = attention_inputs(B, N, d, grad=backward)
    do = torch.ones_like(q) if backward else None  # the upstream gradient
    fns = attention_providers_fns()
    if compile:
        fns["torch.compile (materialised)"] = torch.compile(reference.attention)
    return {name: tensor_call(f, (q, k, v), do) for name, f in fns.items()}


def attention_flops(B, N, d, backward: bool = False, heads: int = 1) -> float:
    # Q K^T and P V: 2 matmuls of 2 B H N^2 d each; backward 2.5x the forward (FlashAttention-2's count)
    return 4.0 * B * heads * N * N * d * (3.5 if backward else 1.0)


def grad_fn(f: Callable, leaves, dy) -> Callable[[], object]:
    """A zero-argument callable: the gradients of ``f(*leaves)`` against ``dy`` (torch.autograd.grad, so
    nothing accumulates in ``.grad`` between calls)."""
    return lambda: torch.autograd.grad(f(*leaves), leaves, dy)


def tensor_call(f: Callable, args, dy=None) -> Callable[[], object]:
    """A zero-argument callable: ``f(*args)`` under no_grad, or with an upstream gradient ``dy`` (made once,
    outside the timed call) the gradients of ``f(*args)`` in ``args`` (grad_fn)."""
    if dy is not None:
        return grad_fn(f, args, dy)

    def run():
        with torch.no_grad():
            return f(*args)
    return run
