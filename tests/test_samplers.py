"""Samplers: fastddpm's diffusers-compatible schedulers against diffusers over whole sampling loops,
the DDPM loop against an independent float64 Algorithm 2 (Ho et al. 2020), determinism, bad input."""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import re

import diffusers  # a pinned dev dependency: the parity reference, never skipped
import numpy as np
import pytest
import torch
from _utils import rel_err as rel

import fastddpm
from fastddpm.bench.countops import CountOps
from fastddpm.samplers import DDPMScheduler

SHAPE = (2, 3, 5, 7)  # awkward spatial sizes, small enough for 1000 steps


class ToyModel:
    """A fixed random "model": out = scale * tanh(W x + u t / T) per pixel, with extra variance
    channels for the learned variance types. Deterministic, contractive, time-dependent."""

    def __init__(self, C: int, T: int, out_channels: int | None = None, seed: int = 0, kind: str = "epsilon"):
        g = torch.Generator().manual_seed(seed)
        self.C, self.T = C, T
        self.out = out_channels or C
        self.W = torch.randn(self.out, C, generator=g) / math.sqrt(C)
        self.u = torch.randn(self.out, generator=g)
        self.kind = kind
        self._params = {}  # (device, dtype) -> (W, u)

    def to(self, device, dtype=torch.float32) -> ToyModel:
        """Copy the weights to ``device`` now: a CUDA graph cannot capture the host-to-device copy."""
        self._weights(torch.device(device), dtype)
        return self

    def _weights(self, device: torch.device, dtype: torch.dtype):
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        key = (device, dtype)
        if key not in self._params:
            self._params[key] = (self.W.to(device, dtype), self.u.to(device, dtype))
        return self._params[key]

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        # Computed on x's device and dtype (a CUDA sampling loop passes CUDA x and t), with weights copied
        # there once (the first call, or .to(device) before a CUDA graph's capture).
        W, u = self._weights(x.device, x.dtype)
        t = torch.as_tensor(t).reshape(-1, 1).to(x.device, x.dtype).expand(x.shape[0], 1)  # scalar or per sample
        h = torch.einsum("oc,bc...->bo...", W, x)
        h = h + (u * t / self.T).reshape(x.shape[0], -1, *([1] * (x.dim() - 2)))
        y = torch.tanh(h)
        if self.out > self.C:
            eps, var = y[:, : self.C], y[:, self.C :]
            if self.kind == "learned":  # sigma^2 itself: positive and small
                var = 1e-3 * (var + 1.5)
            return torch.cat([eps, var], dim=1)
        return y if self.kind == "sample" else 0.9 * y


class GaussianEps:
    """The exact epsilon predictor for data x0 ~ N(0, s^2) per channel (Ho et al.'s linear schedule):
    E[eps | x_t] = sqrt(1 - abar_t) x_t / (abar_t s^2 + 1 - abar_t). Sampling with it is stable and
    ends at N(0, s^2), a model with a known answer."""

    def __init__(self, C: int, T: int = 1000):
        self.abar = np.cumprod(1 - np.linspace(1e-4, 0.02, T))
        self.s2 = torch.linspace(0.2, 0.6, C, dtype=torch.float64) ** 2

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t).reshape(-1).cpu().expand(x.shape[0])  # a scalar or one per sample
        ab = torch.from_numpy(self.abar)[t].reshape(-1, 1)  # (B, 1)
        k = (1 - ab).sqrt() / (ab * self.s2 + 1 - ab)  # (B, C)
        return (k.reshape(*k.shape, *([1] * (x.dim() - 2))).to(x.device) * x.double()).to(x.dtype)


def run_loop(scheduler, model, x, generator, steps=None, timesteps=None):
    if steps is not None or timesteps is not None:
        scheduler.set_timesteps(steps, timesteps=timesteps) if timesteps is None else scheduler.set_timesteps(
            timesteps=timesteps
        )
    preds = []
    for t in scheduler.timesteps:
        out = scheduler.step(model(x, t), t, x, generator=generator)
        x = out.prev_sample
        preds.append(out.pred_original_sample)
    return x, preds


# Tolerances. diffusers forms current_beta_t = 1 - abar_t / abar_prev in float32, which cancels about
# three digits where beta_t ~ 1e-4 (relative error ~5e-4 in beta_t at small t); the fused kernels form it
# as (abar_prev - abar_t) / abar_prev, which is exact (Sterbenz). So over a whole loop both are compared
# with a float64 run of diffusers' own formulas on the same float32 tables and the same noise (the
# flash-attention rule of DESIGN.md: ours within twice diffusers' float32 error, plus a small floor), and
# directly with each other within LOOP_RTOL, which is diffusers' cancellation, compounded.
LOOP_FLOOR = 1e-5
LOOP_RTOL = 1e-3


def truth_loop(cls, kw, model, x, seed, steps=None, timesteps=None, monkeypatch=None, **step_kw):
    """diffusers' scheduler ``cls`` run in float64 on its float32 tables, with float32-drawn noise."""
    import diffusers.schedulers.scheduling_ddim as sd
    import diffusers.schedulers.scheduling_ddpm as sp

    def randn32(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(dtype)

    monkeypatch.setattr(sp, "randn_tensor", randn32)
    monkeypatch.setattr(sd, "randn_tensor", randn32)
    s = cls(**kw)
    s.alphas_cumprod = s.alphas_cumprod.double()
    if hasattr(s, "one"):
        s.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(s, "final_alpha_cumprod"):
        s.final_alpha_cumprod = s.final_alpha_cumprod.double()
    if steps is not None:
        s.set_timesteps(steps)
    elif timesteps is not None:
        s.set_timesteps(timesteps=timesteps)
    g = torch.Generator().manual_seed(seed)
    x = x.double()
    preds = []
    for t in s.timesteps:
        out = s.step(model(x, t), t, x, generator=g, **step_kw)
        x = out.prev_sample
        preds.append(out.pred_original_sample)
    monkeypatch.undo()
    return x, preds


def assert_loop_close(xa, pa, xb, pb, x64, p64, abar):
    """ours (a) and diffusers (b), both float32, against the float64 truth (x0 scaled by sqrt(abar_t))."""
    assert torch.isfinite(xa).all()
    ea, eb = rel(xa, x64), rel(xb, x64)
    assert ea <= 2 * eb + LOOP_FLOOR, (ea, eb)
    assert rel(xa, xb) < LOOP_RTOL, rel(xa, xb)
    # x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) magnifies a difference in x_t by 1/sqrt(abar_t)
    # (~160 at t = 999), so the x0 predictions are compared after multiplying by sqrt(abar_t).
    sab = abar.double().sqrt().tolist()
    pea = max(rel(a, c) * s for a, c, s in zip(pa, p64, sab))
    peb = max(rel(b, c) * s for b, c, s in zip(pb, p64, sab))
    assert pea <= 2 * peb + LOOP_FLOOR, (pea, peb)


DDPM_CASES = [
    dict(),
    dict(clip_sample=False),
    dict(variance_type="fixed_small_log"),
    dict(variance_type="fixed_large", clip_sample=False),
    dict(variance_type="learned", clip_sample=False),
    dict(variance_type="learned_range"),
    dict(prediction_type="sample"),
    dict(prediction_type="v_prediction", clip_sample=False),
    dict(prediction_type="v_prediction", clip_sample_range=0.5),
    dict(thresholding=True, sample_max_value=1.5),
    dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.0,
         prediction_type="v_prediction"),
    dict(beta_schedule="squaredcos_cap_v2", clip_sample=False),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="sigmoid"),
    dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"),
    dict(beta_schedule="laplace"),
    # a schedule none of the named ones gives (quadratic ramp), as a JSON-friendly list
    dict(trained_betas=(1e-4 + 0.02 * (np.arange(1000) / 999) ** 2).tolist(), variance_type="fixed_large",
         clip_sample=False),
]


def _id(kw):
    return ",".join(k if isinstance(v, (list, np.ndarray)) else f"{k}={v}" for k, v in kw.items()) or "default"


def _model_for(kw, T):
    vt = kw.get("variance_type", "fixed_small")
    learned = vt in ("learned", "learned_range")
    return ToyModel(SHAPE[1], T, 2 * SHAPE[1] if learned else None,
                    kind="learned" if vt == "learned" else kw.get("prediction_type", "epsilon"))


@pytest.mark.slow
@pytest.mark.parametrize("kw", DDPM_CASES, ids=_id)
@pytest.mark.parametrize("steps", [None, 37])
def test_ddpm_loop_matches_diffusers(kw, steps, monkeypatch):
    ours, theirs = DDPMScheduler(**kw), diffusers.DDPMScheduler(**kw)
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)
    model = _model_for(kw, ours.config.num_train_timesteps)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    xa, pa = run_loop(ours, model, x, torch.Generator().manual_seed(2), steps)
    xb, pb = run_loop(theirs, model, x, torch.Generator().manual_seed(2), steps)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    x64, p64 = truth_loop(diffusers.DDPMScheduler, kw, model, x, 2, steps, monkeypatch=monkeypatch)
    assert_loop_close(xa, pa, xb, pb, x64, p64, theirs.alphas_cumprod[theirs.timesteps])


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("steps", [1, 7, 50, 999, 1000])
def test_ddpm_spacing_matches_diffusers(spacing, steps):
    kw = dict(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" and steps < 999 else 0)
    ours, theirs = DDPMScheduler(**kw), diffusers.DDPMScheduler(**kw)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    for t in theirs.timesteps[:: max(1, steps // 10)]:
        assert int(ours.previous_timestep(t)) == int(theirs.previous_timestep(t))
    if steps <= 50:
        model = ToyModel(SHAPE[1], 1000)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
        xa, _ = run_loop(ours, model, x, torch.Generator().manual_seed(4))
        xb, _ = run_loop(theirs, model, x, torch.Generator().manual_seed(4))
        assert rel(xa, xb) < LOOP_RTOL


def test_ddpm_custom_timesteps_match_diffusers():
    ts = [987, 700, 513, 300, 31, 4, 0]
    ours, theirs = DDPMScheduler(clip_sample=False), diffusers.DDPMScheduler(clip_sample=False)
    model = ToyModel(SHAPE[1], 1000)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    xa, _ = run_loop(ours, model, x, torch.Generator().manual_seed(6), timesteps=ts)
    xb, _ = run_loop(theirs, model, x, torch.Generator().manual_seed(6), timesteps=ts)
    assert ours.custom_timesteps and torch.equal(ours.timesteps, theirs.timesteps)
    assert rel(xa, xb) < LOOP_RTOL


def test_ddpm_generator_list_and_int_timesteps():
    ours, theirs = DDPMScheduler(), diffusers.DDPMScheduler()
    ours.set_timesteps(20)
    theirs.set_timesteps(20)
    model = ToyModel(SHAPE[1], 1000)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    ga = [torch.Generator().manual_seed(10 + i) for i in range(SHAPE[0])]
    gb = [torch.Generator().manual_seed(10 + i) for i in range(SHAPE[0])]
    xa, xb = x, x
    for t in theirs.timesteps.tolist():  # Python ints
        xa = ours.step(model(xa, t), t, xa, generator=ga).prev_sample
        xb = theirs.step(model(xb, t), t, xb, generator=gb).prev_sample
    assert rel(xa, xb) < LOOP_RTOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ddpm_single_steps_match_diffusers(dtype, monkeypatch):
    import diffusers.schedulers.scheduling_ddpm as sp

    for kw in DDPM_CASES[:11]:
        ours, theirs = DDPMScheduler(**kw), diffusers.DDPMScheduler(**kw)
        truth = diffusers.DDPMScheduler(**kw)  # float64 tables holding the same float32 values
        truth.alphas_cumprod = truth.alphas_cumprod.double()
        truth.one = torch.tensor(1.0, dtype=torch.float64)
        model = _model_for(kw, 1000)
        x = torch.randn(SHAPE, dtype=dtype)
        for t in (999, 500, 17, 1, 0):
            m = model(x, t)
            a = ours.step(m, t, x, generator=torch.Generator().manual_seed(t), return_dict=False)
            b = theirs.step(m, t, x, generator=torch.Generator().manual_seed(t), return_dict=False)
            with monkeypatch.context() as mp:
                mp.setattr(sp, "randn_tensor", lambda shape, generator=None, device=None, dtype=None,
                           nd=x.dtype: torch.randn(shape, generator=generator, dtype=nd).double())
                c = truth.step(m.double(), t, x.double(), generator=torch.Generator().manual_seed(t),
                               return_dict=False)
            for i in (0, 1):
                if dtype == torch.float32:
                    # Within twice diffusers' own float32 error (see LOOP_RTOL), plus a floor: near t = T,
                    # x0 divides a difference of O(1) terms by sqrt(abar_t) ~ 6e-3, so one float32 ulp
                    # of those terms is ~2e-5 of x0 in either implementation (measured: 1e-6 to 5e-6).
                    assert rel(a[i], c[i]) <= 2 * rel(b[i], c[i]) + 2e-5, (kw, t, i)
                else:  # float64 runs the float64 reference on the same tables: float64 rounding only
                    assert rel(a[i], c[i]) < 1e-12, (kw, t, i)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ddpm_half_precision(dtype, monkeypatch):
    import diffusers.schedulers.scheduling_ddpm as sp

    ours, theirs = DDPMScheduler(clip_sample=False), diffusers.DDPMScheduler(clip_sample=False)
    truth = diffusers.DDPMScheduler(clip_sample=False)
    truth.alphas_cumprod = truth.alphas_cumprod.double()
    x, m = torch.randn(SHAPE).to(dtype), torch.randn(SHAPE).to(dtype)
    a = ours.step(m, 600, x, generator=torch.Generator().manual_seed(0)).prev_sample
    b = theirs.step(m, 600, x, generator=torch.Generator().manual_seed(0)).prev_sample
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=dtype).double()
    monkeypatch.setattr(sp, "randn_tensor", lambda *args, **kw: noise)
    ref = truth.step(m.double(), 600, x.double()).prev_sample
    assert a.dtype == dtype
    # fp32 math, one rounding to the half type at the end; diffusers computes in the half type
    assert rel(a, ref) <= max(rel(b, ref), torch.finfo(dtype).eps), (rel(a, ref), rel(b, ref))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("thresholding", [False, True])
def test_half_precision_outputs_have_diffusers_dtypes(dtype, kind, thresholding):
    # DDIM's thresholding step (unfused) returned a float32 pred_original_sample for half inputs
    kw = dict(thresholding=thresholding)
    pair = ((DDPMScheduler(**kw), diffusers.DDPMScheduler(**kw)) if kind == "ddpm"
            else (fastddpm.DDIMScheduler(**kw), diffusers.DDIMScheduler(**kw)))
    x, m = torch.randn(SHAPE).to(dtype), torch.randn(SHAPE).to(dtype)
    got = []
    for s in pair:
        s.set_timesteps(10)
        out = s.step(m, 500, x, generator=torch.Generator().manual_seed(0), **({"eta": 0.5} if kind == "ddim" else {}))
        got.append((out.prev_sample.dtype, out.pred_original_sample.dtype))
    assert got[0] == got[1] == (dtype, dtype)


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_assigned_alphas_cumprod_is_honoured_as_diffusers(kind):
    # Code that rescales a schedule by hand assigns scheduler.alphas_cumprod; diffusers' step and add_noise read
    # it. fastddpm's fused ops read tables built at construction, so the assignment was silently ignored.
    pair = ((DDPMScheduler(num_train_timesteps=100), diffusers.DDPMScheduler(num_train_timesteps=100))
            if kind == "ddpm" else
            (fastddpm.DDIMScheduler(num_train_timesteps=100), diffusers.DDIMScheduler(num_train_timesteps=100)))
    g = torch.Generator().manual_seed(1)
    x, m = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    out = []
    for s in pair:
        s.set_timesteps(10)
        s.alphas_cumprod = s.alphas_cumprod * 0.9
        kw = {"eta": 0.5} if kind == "ddim" else {}
        step = s.step(m, 50, x, generator=torch.Generator().manual_seed(3), **kw)
        noisy = s.add_noise(x, m, torch.tensor([10, 50]))
        out.append((step.prev_sample, step.pred_original_sample, noisy))
    for a, b in zip(*out):
        assert rel(a, b) < 1e-5
    base = pair[0].__class__(num_train_timesteps=100)  # and the assignment mattered
    assert rel(base.add_noise(x, m, torch.tensor([10, 50])), out[1][2]) > 1e-3
    with pytest.raises(ValueError, match="alphas_cumprod: expected a 1-D floating-point table of the 100"):
        pair[0].alphas_cumprod = torch.ones(50)


def test_assigned_ddpm_timesteps_are_honoured_as_diffusers():
    # diffusers' DDPM step goes to the successor of t in self.timesteps (after set_timesteps); assigning the
    # attribute changes where each step goes. Before set_timesteps both go to t - 1.
    g = torch.Generator().manual_seed(2)
    x, m = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    results = []
    for S in (DDPMScheduler, diffusers.DDPMScheduler):
        fresh = S(num_train_timesteps=100)
        fresh.timesteps = torch.tensor([90, 50, 10])
        before = [int(fresh.previous_timestep(t)) for t in (90, 50)]
        s = S(num_train_timesteps=100)
        s.set_timesteps(10)
        s.timesteps = torch.tensor([90, 50, 10])
        prevs = [int(s.previous_timestep(t)) for t in s.timesteps]
        xs = x
        for t in s.timesteps:
            xs = s.step(m, t, xs, generator=torch.Generator().manual_seed(int(t))).prev_sample
        results.append((before, prevs, xs))
    (b0, p0, x0), (b1, p1, x1) = results
    assert b0 == b1 == [89, 49] and p0 == p1 == [50, 10, -1]
    assert rel(x0, x1) < 1e-5


# Code that sets the attributes by hand, in either order (diffusers reads all three at each step).
_BY_HAND = {
    "timesteps, then num_inference_steps": lambda s: (setattr(s, "timesteps", torch.tensor([90, 50, 10])),
                                                      setattr(s, "num_inference_steps", 3)),
    "timesteps, then custom_timesteps": lambda s: (setattr(s, "timesteps", torch.tensor([90, 50, 10])),
                                                   setattr(s, "custom_timesteps", True)),
    "set_timesteps, then num_inference_steps None": lambda s: (s.set_timesteps(10),
                                                               setattr(s, "num_inference_steps", None)),
    "set_timesteps(10), then custom": lambda s: (s.set_timesteps(10), s.set_timesteps(timesteps=[90, 50, 10])),
}


@pytest.mark.parametrize("how", list(_BY_HAND))
def test_ddpm_timestep_attributes_set_by_hand_step_as_diffusers(how):
    # The successor table was rebuilt only when timesteps was assigned with num_inference_steps or
    # custom_timesteps already set: the step went to t - 1 where diffusers goes to the successor, and after
    # num_inference_steps = None previous_timestep said t - 1 while the step still went to the successor.
    g = torch.Generator().manual_seed(3)
    x, m = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    results = []
    for S in (DDPMScheduler, diffusers.DDPMScheduler):
        s = S(num_train_timesteps=100)
        _BY_HAND[how](s)
        prev = int(s.previous_timestep(50))
        out = s.step(m, 50, x, generator=torch.Generator().manual_seed(4)).prev_sample
        results.append((prev, s.num_inference_steps, out))
    (p0, n0, x0), (p1, n1, x1) = results
    assert p0 == p1 and n0 == n1, (how, p0, p1, n0, n1)
    assert rel(x0, x1) < 1e-5


def test_ddpm_scheduler_pickled_before_the_attribute_properties_loads():
    # num_inference_steps and custom_timesteps became properties (stored as _num_inference_steps, ...): the state
    # of a scheduler pickled before holds the public names, which __setstate__ moves.
    s = DDPMScheduler(num_train_timesteps=100)
    s.set_timesteps(10)
    state = s.__getstate__()
    for name in ("num_inference_steps", "custom_timesteps"):
        state[name] = state.pop("_" + name)
    old = DDPMScheduler.__new__(DDPMScheduler)
    old.__setstate__(state)
    assert (old.num_inference_steps, old.custom_timesteps) == (10, False)
    assert int(old.previous_timestep(50)) == int(s.previous_timestep(50)) == 40


def test_ddpm_variance_type_registered_later_is_stepped_as_diffusers():
    # diffusers reads config.variance_type at each step; register_to_config (and pipelines that replace the
    # config) change it. fastddpm had fixed it at construction and kept stepping fixed_small.
    g = torch.Generator().manual_seed(5)
    x, m = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    out = []
    for S in (DDPMScheduler, diffusers.DDPMScheduler):
        s = S()
        s.register_to_config(variance_type="fixed_large")
        s.set_timesteps(10)
        out.append(s.step(m, 500, x, generator=torch.Generator().manual_seed(6)).prev_sample)
    built = DDPMScheduler(variance_type="fixed_large")
    built.set_timesteps(10)
    assert rel(out[0], out[1]) < 1e-5
    assert torch.equal(out[0], built.step(m, 500, x, generator=torch.Generator().manual_seed(6)).prev_sample)


def test_ddim_variance_noise_broadcasts_as_diffusers():
    g = torch.Generator().manual_seed(7)
    x, m = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    for shape in [(1, *SHAPE[1:]), SHAPE[1:], (1,), SHAPE]:
        vn = torch.randn(shape, generator=g)
        out = []
        for S in (fastddpm.DDIMScheduler, diffusers.DDIMScheduler):
            s = S()
            s.set_timesteps(10)
            out.append(s.step(m, 501, x, eta=1.0, variance_noise=vn).prev_sample)
        assert rel(out[0], out[1]) < 1e-5, shape
    s = fastddpm.DDIMScheduler()
    s.set_timesteps(10)
    with pytest.raises(ValueError, match=r"variance_noise: expected shape .* or one that broadcasts to it"):
        s.step(m, 501, x, eta=1.0, variance_noise=torch.randn(SHAPE[0] + 1, *SHAPE[1:]))


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_threshold_sample_helper_is_diffusers(kind):
    # diffusers' schedulers carry _threshold_sample, which code written for them calls
    ours, theirs = (DDPMScheduler, diffusers.DDPMScheduler) if kind == "ddpm" else \
        (fastddpm.DDIMScheduler, diffusers.DDIMScheduler)
    x = 3 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(8))
    for kw in ({}, dict(dynamic_thresholding_ratio=0.8, sample_max_value=2.0)):
        assert torch.allclose(ours(**kw)._threshold_sample(x), theirs(**kw)._threshold_sample(x), rtol=1e-6, atol=0)
    assert ours()._threshold_sample(x.half()).dtype == torch.float16


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_thresholding_ratio_domain_is_diffusers(kind):
    # diffusers steps with any ratio in [0, 1] (torch.quantile's domain) and fails inside quantile() at the first
    # step outside it. fastddpm's DDPM refused 0, and its DDIM accepted 1.5 and failed at the step.
    ours, theirs = (DDPMScheduler, diffusers.DDPMScheduler) if kind == "ddpm" else \
        (fastddpm.DDIMScheduler, diffusers.DDIMScheduler)
    x, m = torch.randn(SHAPE), torch.randn(SHAPE)
    for ratio in (0.0, 1.0):
        out = []
        for S in (ours, theirs):
            s = S(thresholding=True, dynamic_thresholding_ratio=ratio, sample_max_value=2.0)
            s.set_timesteps(10)
            out.append(s.step(m, 500, x, generator=torch.Generator().manual_seed(0)).prev_sample)
        assert rel(out[0], out[1]) < 1e-5, ratio
    for ratio in (1.5, -0.1):
        with pytest.raises(ValueError, match=rf"dynamic_thresholding_ratio: expected a value in \[0, 1\], got {ratio}"):
            ours(thresholding=True, dynamic_thresholding_ratio=ratio)
        ours(dynamic_thresholding_ratio=ratio)  # without thresholding it is never read, as in diffusers


def test_sample_refuses_what_it_used_to_truncate_or_fail_deep_inside():
    model = fastddpm.UNet.tiny()
    for sampler in ("ddpm", "dpm++2m"):  # eta was silently ignored by the samplers that do not read it
        with pytest.raises(ValueError, match=re.escape(f"eta: DDIM's eta applies to sampler='ddim' only, got "
                                                       f"eta=1.0 with sampler='{sampler}'")):
            fastddpm.sample(model, (1, 3, 8, 8), sampler=sampler, steps=2, eta=1.0, progress=False)
    for ts, match in (([999.7, 500.2, 0.0], "timesteps: expected integers, got 999.7"),
                      (torch.tensor([999.0, 0.5]), "timesteps: expected integers, got 0.5"),
                      ([float("inf")], "timesteps: expected integers, got inf"),
                      ([], "timesteps: expected at least one timestep")):
        with pytest.raises(ValueError, match=match):
            fastddpm.sample(model, (1, 3, 8, 8), timesteps=ts, progress=False)
    # integral values of any type are timesteps (a float tensor of whole numbers, numpy integers)
    a = fastddpm.sample(model, (1, 3, 8, 8), timesteps=torch.tensor([999.0, 0.0]), seed=0, progress=False)
    b = fastddpm.sample(model, (1, 3, 8, 8), timesteps=np.array([999, 0]), seed=0, progress=False)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"dtype: torch.float16 is not the dtype of the model's parameters"):
        fastddpm.sample(model, (1, 3, 8, 8), steps=2, dtype=torch.float16, progress=False)
    for seed in (2**70, -1):  # torch.Generator.manual_seed's "Overflow when unpacking long long"
        with pytest.raises(ValueError, match=r"seed: expected an integer in \[0, 2\*\*63\)"):
            fastddpm.sample(model, (1, 3, 8, 8), steps=2, seed=seed, progress=False)


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("model_dtype, sample_dtype", [(torch.float64, torch.float32), (torch.float32, torch.float64),
                                                       (torch.float16, torch.float32)])
@pytest.mark.parametrize("gen", ["one", "list", "global"])
def test_step_with_mixed_dtypes_matches_diffusers(kind, model_dtype, sample_dtype, gen):
    """A model output in another dtype than the sample: diffusers steps in the promoted dtype and draws the
    noise in the model output's dtype (randn_tensor(..., dtype=model_output.dtype)), so the same generator
    gives other numbers than a draw in the sample's dtype (the drop-in gave float32 results 3.4 away)."""
    D, F = ((diffusers.DDPMScheduler(), DDPMScheduler()) if kind == "ddpm"
            else (diffusers.DDIMScheduler(), fastddpm.DDIMScheduler()))
    kw = {} if kind == "ddpm" else {"eta": 1.0}
    g = torch.Generator().manual_seed(1)
    m, x = torch.randn(SHAPE, generator=g).to(model_dtype), torch.randn(SHAPE, generator=g).to(sample_dtype)
    out = []
    for s in (D, F):
        s.set_timesteps(10)
        torch.manual_seed(5)  # the global generator, for gen="global"
        gens = {"one": torch.Generator().manual_seed(0), "global": None,
                "list": [torch.Generator().manual_seed(i) for i in range(SHAPE[0])]}[gen]
        out.append(s.step(m, 100, x, generator=gens, **kw))  # sqrt(abar_t) ~ 0.94: little amplification
    theirs, ours = out
    assert ours.prev_sample.dtype == theirs.prev_sample.dtype == torch.promote_types(model_dtype, sample_dtype)
    # diffusers takes its coefficients (sqrt(abar_t) ...) from 0-d float32 tensors, so its float64 step holds
    # float32 roundings; with a float16 operand it also rounds products such as sqrt(1 - abar_t) eps and
    # sigma z to float16, where fastddpm computes in float32 (a float16 rounding of terms of size ~1).
    # A draw in the sample's dtype (the defect) is off by O(1).
    tol = 1e-6 if torch.float16 not in (model_dtype, sample_dtype) else 2e-3
    for a, b in ((ours.prev_sample, theirs.prev_sample), (ours.pred_original_sample, theirs.pred_original_sample)):
        assert (a.double() - b.double()).abs().max() < tol


# ---------------------------------------------------------------------------
# Ho et al. 2020, Algorithm 2, written independently in float64
# ---------------------------------------------------------------------------
def algorithm2(model, x, T, generator, sigma="beta", betas=None):
    """x_{t-1} = 1/sqrt(a_t) (x_t - (1 - a_t)/sqrt(1 - abar_t) eps) + sigma_t z, z = 0 at the end."""
    betas = np.linspace(1e-4, 0.02, T) if betas is None else betas
    alphas = 1 - betas
    abar = np.cumprod(alphas)
    x = x.double()
    for i in reversed(range(T)):  # paper's t = i + 1
        z = torch.randn(x.shape, generator=generator, dtype=torch.float32).double() if i > 0 else 0.0
        eps = model(x.float(), i).double()
        if sigma == "beta":
            s = math.sqrt(betas[i])
        else:  # beta tilde, eq. 7
            s = math.sqrt((1 - abar[i - 1]) / (1 - abar[i]) * betas[i]) if i > 0 else 0.0
        x = 1 / math.sqrt(alphas[i]) * (x - (1 - alphas[i]) / math.sqrt(1 - abar[i]) * eps) + s * z
    return x


@pytest.mark.slow
@pytest.mark.parametrize("variance_type,sigma", [("fixed_large", "beta"), ("fixed_small", "tilde")])
def test_ddpm_loop_equals_algorithm2(variance_type, sigma):
    T = 1000
    model = GaussianEps(SHAPE[1], T)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(11))
    sched = DDPMScheduler(clip_sample=False, variance_type=variance_type)
    ours, _ = run_loop(sched, model, x, torch.Generator().manual_seed(12))
    ref = algorithm2(model, x, T, torch.Generator().manual_seed(12), sigma)
    # diffusers' float32 tables (float32 linspace and cumprod: abar off by ~1e-6 relative) and float32
    # steps against float64 throughout, over 1000 steps: measured 1.3e-5 to 1.5e-5.
    assert rel(ours, ref) < 5e-5, rel(ours, ref)
    # and the chain lands where the exact model says: N(0, s^2) per channel
    std = ours.double().transpose(0, 1).reshape(SHAPE[1], -1).std(dim=1)
    assert torch.allclose(std, model.s2.sqrt(), rtol=0.35)


# ---------------------------------------------------------------------------
# Determinism, API, config
# ---------------------------------------------------------------------------
def test_ddpm_bitwise_deterministic():
    model = ToyModel(SHAPE[1], 1000)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(13))
    outs = []
    for _ in range(2):
        s = DDPMScheduler(variance_type="learned_range")
        m2 = ToyModel(SHAPE[1], 1000, 2 * SHAPE[1])
        xa, _ = run_loop(s, m2, x, torch.Generator().manual_seed(14), 40)
        s2 = DDPMScheduler()
        xb, _ = run_loop(s2, model, x, torch.Generator().manual_seed(14), 40)
        outs.append((xa, xb))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_ddpm_attributes_match_diffusers():
    ours, theirs = DDPMScheduler(), diffusers.DDPMScheduler()
    assert ours.order == theirs.order == 1
    assert ours.init_noise_sigma == theirs.init_noise_sigma
    assert len(ours) == len(theirs)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    assert torch.equal(ours.betas, theirs.betas) and torch.equal(ours.alphas, theirs.alphas)
    x = torch.randn(SHAPE)
    assert ours.scale_model_input(x, 3) is x
    for k, v in theirs.config.items():
        if not k.startswith("_"):
            assert ours.config[k] == v, k
    assert ours.config.num_train_timesteps == 1000
    assert type(ours.config) is type(theirs.config)  # diffusers' own FrozenDict
    assert int(ours.previous_timestep(10)) == int(theirs.previous_timestep(10)) == 9


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_add_noise_and_velocity_match_diffusers(dtype):
    ours, theirs = DDPMScheduler(beta_schedule="squaredcos_cap_v2"), diffusers.DDPMScheduler(
        beta_schedule="squaredcos_cap_v2"
    )
    x0, noise = torch.randn(SHAPE, dtype=dtype), torch.randn(SHAPE, dtype=dtype)
    for t in (torch.tensor([0, 999]), torch.tensor([500]), torch.tensor(3)):
        tb = t.expand(SHAPE[0]) if t.dim() == 0 else t
        a, b = ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, tb if t.dim() == 0 else t)
        assert rel(a, b) < 1e-6
        a, b = ours.get_velocity(x0, noise, t), theirs.get_velocity(x0, noise, tb if t.dim() == 0 else t)
        assert rel(a, b) < 1e-6


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_half_precision_add_noise_rounds_once_on_both_paths(dtype, tol):
    """Against float64, the bound being a few roundings of the result in ``dtype`` (ulp(1) / 2 is 5e-4 in
    float16 and 4e-3 in bfloat16, and |x_t| reaches about 4). The fused path (noise of the sample's shape) and the
    broadcasting path (noise of shape (1, C, H, W)) agree. The broadcasting path used diffusers' rounding of
    alphas_cumprod to the sample's dtype first: in bfloat16 0.12 off, in float16 no noise at all at t = 1."""
    s = DDPMScheduler()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1000, 3, 4, 4, generator=g)
    noise = torch.randn(1, 3, 4, 4, generator=g)
    t = torch.arange(1000)
    ref = s.add_noise(x0.double(), noise.double().expand(x0.shape), t)
    ref_v = s.get_velocity(x0.double(), noise.double().expand(x0.shape), t)
    xh, nh = x0.to(dtype), noise.to(dtype)
    fused, broadcast = s.add_noise(xh, nh.expand(x0.shape).contiguous(), t), s.add_noise(xh, nh, t)
    assert fused.dtype == broadcast.dtype == dtype
    for out in (fused, broadcast):  # each input rounded to dtype too: compare with the rounded inputs' float64
        exact = s.add_noise(xh.double(), nh.double().expand(x0.shape), t)
        assert (out.double() - exact).abs().max() < tol
    assert (fused.double() - ref).abs().max() < 4 * tol  # (the inputs' own rounding on top)
    v = s.get_velocity(xh, nh, t)
    assert (v.double() - s.get_velocity(xh.double(), nh.double().expand(x0.shape), t)).abs().max() < tol
    assert (v.double() - ref_v).abs().max() < 4 * tol


def test_add_noise_refuses_fractional_timesteps():
    """A fraction was truncated (1.7 read as 1); diffusers refuses float indices, step() refuses fractions."""
    s = DDPMScheduler()
    x, n = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    for f in (s.add_noise, s.get_velocity):
        with pytest.raises(ValueError, match=r"^timesteps: expected integer timesteps, got 1\.7"):
            f(x, n, torch.tensor([1.7, 500.0]))
        assert torch.equal(f(x, n, torch.tensor([3.0, 500.0])), f(x, n, torch.tensor([3, 500])))
        for bad in ("inf", "nan"):  # no index either: inf was cast to int64's minimum and failed deep inside
            with pytest.raises(ValueError, match=rf"^timesteps: expected integer timesteps, got {bad}"):
                f(x, n, torch.tensor([float(bad), 500.0]))


def test_step_refuses_a_non_integer_float_timestep():
    """step() reads a float timestep tensor of a whole number (999.0, as pipelines pass it) as that timestep;
    a fraction, inf or NaN is refused by name (inf and NaN were Python's OverflowError/ValueError of int())."""
    from fastddpm.samplers import DDIMScheduler

    x, eps = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    for cls in (DDPMScheduler, DDIMScheduler):
        s = cls()
        s.set_timesteps(10)
        t = int(s.timesteps[0])
        g = functools.partial(torch.Generator().manual_seed, 0)
        assert torch.equal(s.step(eps, torch.tensor(float(t)), x, generator=g()).prev_sample,
                           s.step(eps, torch.tensor(t), x, generator=g()).prev_sample)
        for bad in ("0.5", "inf", "nan"):
            with pytest.raises(ValueError, match=rf"^timestep: expected integer timesteps, got {bad}"):
                s.step(eps, torch.tensor(float(bad)), x)
        # one per sample: DDPM rounded a fraction, DDIM truncated it, without a word
        x2, eps2 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
        with pytest.raises(ValueError, match=r"^timestep: expected integer timesteps, got 100\.5"):
            s.step(eps2, torch.tensor([100.5, 100.0]), x2)


def test_step_takes_a_numpy_timestep_as_diffusers_does():
    """diffusers indexes its tables with the timestep, so a numpy array (``t.numpy()``: 0-d, one element, or one
    per sample) steps as the same tensor would; step() raised TypeError."""
    from fastddpm.samplers import DDIMScheduler

    x, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    for cls in (DDPMScheduler, DDIMScheduler):
        s, theirs = cls(), getattr(diffusers, cls.__name__)()
        s.set_timesteps(10)
        theirs.set_timesteps(10)
        t = int(s.timesteps[2])
        for ts in (np.array(t), np.array([t]), np.array(float(t)), np.array([t, t])):
            g = functools.partial(torch.Generator().manual_seed, 0)
            ours = s.step(eps, ts, x, generator=g()).prev_sample
            assert torch.equal(ours, s.step(eps, torch.from_numpy(ts), x, generator=g()).prev_sample), ts
            if ts.size == 1 and ts.dtype.kind == "i":  # diffusers takes the integer single ones
                ref = theirs.step(eps, ts, x, generator=g()).prev_sample
                assert (ours - ref).abs().max() < 1e-5, ts
        with pytest.raises(TypeError, match="timestep: expected an int or an integer tensor, got a numpy array"):
            s.step(eps, np.array(["1"]), x)
    s = DDPMScheduler()
    s.set_timesteps(10)
    assert s.previous_timestep(np.array(500)) == s.previous_timestep(500)
    # before set_timesteps, t - 1 of what was given, as diffusers returns it (a numpy value for a numpy array)
    fresh, theirs = DDPMScheduler(), diffusers.DDPMScheduler()
    got, want = fresh.previous_timestep(np.array(500)), theirs.previous_timestep(np.array(500))
    assert type(got) is type(want) and got == want == 499


def test_ddim_float64_variance_noise_makes_a_float64_step_as_in_diffusers():
    from fastddpm.samplers import DDIMScheduler

    x, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    z = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    ours, theirs = DDIMScheduler(), diffusers.DDIMScheduler()
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    a = ours.step(eps, 501, x, eta=0.5, variance_noise=z)
    b = theirs.step(eps, 501, x, eta=0.5, variance_noise=z)
    assert a.prev_sample.dtype == b.prev_sample.dtype == torch.float64
    assert a.pred_original_sample.dtype == b.pred_original_sample.dtype == torch.float32
    assert (a.prev_sample - b.prev_sample).abs().max() < 1e-5
    # eta = 0 draws no noise: the step stays float32 in both
    assert ours.step(eps, 501, x, variance_noise=z).prev_sample.dtype == torch.float32
    assert theirs.step(eps, 501, x, variance_noise=z).prev_sample.dtype == torch.float32


def test_config_round_trip(tmp_path):
    kw = dict(num_train_timesteps=500, beta_schedule="scaled_linear", variance_type="fixed_large",
              prediction_type="v_prediction", timestep_spacing="trailing", trained_betas=None)
    ours = DDPMScheduler(**kw)
    ours.save_pretrained(tmp_path / "a")
    data = json.loads(open(tmp_path / "a" / "scheduler_config.json").read())
    assert data["_class_name"] == "DDPMScheduler" and data["num_train_timesteps"] == 500
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.endswith(".tmp")]  # atomic write left nothing
    back = DDPMScheduler.from_pretrained(tmp_path / "a")

    def public(c):  # diffusers' bookkeeping (_use_default_values) is not saved, as in diffusers
        return {k: v for k, v in c.items() if not k.startswith("_")}

    assert public(back.config) == public(ours.config)
    theirs = diffusers.DDPMScheduler.from_pretrained(tmp_path / "a")  # diffusers reads our file
    assert theirs.config.prediction_type == "v_prediction"
    assert torch.equal(theirs.alphas_cumprod, back.alphas_cumprod)
    theirs.save_pretrained(tmp_path / "b")  # and we read diffusers'
    again = DDPMScheduler.from_pretrained(tmp_path / "b")
    assert public(again.config) == public(ours.config)
    # from_config: a diffusers FrozenDict, a plain dict, another scheduler's config (extra keys ignored)
    assert DDPMScheduler.from_config(theirs.config).config.timestep_spacing == "trailing"
    assert DDPMScheduler.from_config(dict(theirs.config), clip_sample=False).config.clip_sample is False
    ddim = diffusers.DDIMScheduler(num_train_timesteps=300)
    assert DDPMScheduler.from_config(ddim.config).config.num_train_timesteps == 300
    # and a scheduler object itself, ours or diffusers', of either class: its config is read
    for obj in (theirs, ours, ddim, fastddpm.DDIMScheduler(num_train_timesteps=300)):
        back = DDPMScheduler.from_config(obj, variance_type="fixed_small")
        assert type(back) is DDPMScheduler and back.config.variance_type == "fixed_small"
        for k in ("num_train_timesteps", "beta_schedule", "prediction_type", "timestep_spacing"):
            assert back.config[k] == obj.config[k], k
        assert torch.equal(back.alphas_cumprod, obj.alphas_cumprod)
    with pytest.raises(TypeError, match="config"):
        DDPMScheduler.from_config(42)
    tb = DDPMScheduler(num_train_timesteps=10, trained_betas=np.linspace(0.01, 0.2, 10))
    tb.save_pretrained(tmp_path / "c")
    assert torch.equal(DDPMScheduler.from_pretrained(tmp_path / "c").betas, tb.betas)
    with pytest.raises(OSError, match="scheduler_config.json"):  # diffusers' own error, naming the file
        DDPMScheduler.from_pretrained(tmp_path / "missing")


def test_set_timesteps_device():
    # The timesteps land on the device asked for, as diffusers puts them ("meta" stands in for a GPU
    # here; the CUDA test above runs a loop on timesteps set with device="cuda").
    for cls, ref_cls in ((DDPMScheduler, diffusers.DDPMScheduler), (fastddpm.DDIMScheduler, diffusers.DDIMScheduler)):
        for dev in ("meta", torch.device("meta"), "cpu", None):
            ours, theirs = cls(), ref_cls()
            ours.set_timesteps(12, device=dev)
            theirs.set_timesteps(12, device=dev)
            assert ours.timesteps.device == theirs.timesteps.device == torch.device(dev or "cpu"), (cls, dev)
            assert ours.timesteps.dtype == theirs.timesteps.dtype
    ours = DDPMScheduler()
    ours.set_timesteps(timesteps=[900, 500, 3], device="meta")
    assert ours.timesteps.device.type == "meta"
    # a loop over timesteps set with device="cpu" is the loop over the default ones
    model = ToyModel(SHAPE[1], 1000)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(17))
    a, b = DDPMScheduler(), DDPMScheduler()
    a.set_timesteps(9, device="cpu")
    b.set_timesteps(9)
    xa, _ = run_loop(a, model, x, torch.Generator().manual_seed(18))
    xb, _ = run_loop(b, model, x, torch.Generator().manual_seed(18))
    assert torch.equal(xa, xb)


def test_diffusers_pipeline_accepts_our_scheduler():
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))
    ref = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler())
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    ref.set_progress_bar_config(disable=True)
    a = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=5,
             output_type="np")
    b = ref(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=5,
            output_type="np")
    assert np.abs(a.images - b.images).max() < 1e-5


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_set_timesteps_takes_a_whole_float_count_as_diffusers(spacing):
    """diffusers computes its leading and trailing spacings from a float count as from the int (50.0 steps are
    50 steps; its linspace spacing raises on a float), so 50.0 gives diffusers' timesteps of 50; a fraction of
    a step has no meaning (diffusers' arange would round 2.5 up to 3 timesteps), so it is refused."""
    for ours_cls, theirs_cls in ((DDPMScheduler, diffusers.DDPMScheduler),
                                 (fastddpm.DDIMScheduler, diffusers.DDIMScheduler)):
        ours, theirs = ours_cls(timestep_spacing=spacing), theirs_cls(timestep_spacing=spacing)
        ours.set_timesteps(50.0)
        theirs.set_timesteps(50)
        assert ours.timesteps.tolist() == theirs.timesteps.tolist() and ours.num_inference_steps == 50
        ours.set_timesteps(np.float32(20))
        assert len(ours.timesteps) == 20
        with pytest.raises(TypeError, match="num_inference_steps: expected a positive integer, got 2.5"):
            ours.set_timesteps(2.5)


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------
def test_ddpm_bad_input():
    s = DDPMScheduler(num_train_timesteps=100)
    with pytest.raises(ValueError, match="cannot be larger"):
        s.set_timesteps(101)
    with pytest.raises(ValueError, match="Can only pass one"):
        s.set_timesteps(10, timesteps=[5, 3])
    with pytest.raises(ValueError, match="descending"):
        s.set_timesteps(timesteps=[50, 60, 10])
    with pytest.raises(ValueError, match="descending"):
        s.set_timesteps(timesteps=[50, 50, 10])
    with pytest.raises(ValueError, match="must start before"):
        s.set_timesteps(timesteps=[100, 50, 0])
    with pytest.raises(ValueError, match="non-negative"):
        s.set_timesteps(timesteps=[50, 10, -1])
    # a fraction, inf or NaN is no timestep (inf was cast to int64's minimum and refused as "not descending")
    for bad, ts in (("50.5", [50.5, 10.0]), ("inf", [float("inf"), 0.0]), ("-inf", [50.0, float("-inf")]),
                    ("nan", [50.0, float("nan")]), ("True", [True, False])):
        with pytest.raises(ValueError, match=rf"^timesteps: expected integers, got {bad}$"):
            s.set_timesteps(timesteps=ts)
    with pytest.raises(ValueError, match="num_inference_steps"):
        s.set_timesteps()
    with pytest.raises(ValueError, match="num_inference_steps"):
        s.set_timesteps(0)
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="model_output: expected shape"):
        s.step(torch.randn(2, 4, 5, 7), 10, x)
    with pytest.raises(IndexError, match="timestep"):
        s.step(torch.randn(SHAPE), 100, x)
    s.set_timesteps(10)
    with pytest.raises(IndexError, match="not one of the scheduler's timesteps"):
        s.step(torch.randn(SHAPE), 11, x)
    with pytest.raises(IndexError, match="not one of the scheduler's timesteps"):
        s.step(torch.randn(SHAPE), torch.tensor([10, 11]), x)
    with pytest.warns(UserWarning, match="variance_type: 'nope'"):  # diffusers takes it as fixed_small
        DDPMScheduler(variance_type="nope")
    with pytest.raises(ValueError, match="prediction_type"):
        DDPMScheduler(prediction_type="x0")
    with pytest.raises(NotImplementedError, match="beta_schedule"):
        DDPMScheduler(beta_schedule="quadratic")
    with pytest.warns(UserWarning, match="trained_betas: 9 values but num_train_timesteps=10"):
        short = DDPMScheduler(num_train_timesteps=10, trained_betas=[0.1] * 9)
    with pytest.raises(ValueError, match="trained_betas has 9 values"):  # diffusers: an IndexError there
        short.step(torch.randn(SHAPE), 9, x)
    learned = DDPMScheduler(variance_type="learned_range")
    with pytest.raises(ValueError, match="model_output: variance_type='learned_range'"):
        learned.step(torch.randn(SHAPE), 10, x)
    with pytest.raises(NotImplementedError, match="fixed_large_log"):
        DDPMScheduler(variance_type="fixed_large_log").step(torch.randn(SHAPE), 10, x)


def test_ddpm_step_checks_survive_the_fast_path():
    # step() resolves its backend once per (device, dtype) and passes int timesteps as cached
    # tensors; the checks must still run on every call.
    s = DDPMScheduler(num_train_timesteps=100)
    s.set_timesteps(10)
    x, m = torch.randn(SHAPE), torch.randn(SHAPE)
    first = s.step(m, 90, x, generator=torch.Generator().manual_seed(0)).prev_sample
    again = s.step(m, torch.tensor(90), x, generator=torch.Generator().manual_seed(0)).prev_sample
    assert torch.equal(first, again)
    with pytest.raises(TypeError, match="sample: expected dtype"):
        s.step(m.long(), 90, x.long())
    with pytest.raises(ValueError, match="sample: expected at least 1"):
        s.step(torch.tensor(0.5), 90, torch.tensor(0.5))
    with pytest.raises(ValueError, match="timestep: expected one timestep or one per sample"):
        s.step(m, torch.tensor([90] * (SHAPE[0] + 1)), x)
    with pytest.raises(ValueError, match="model_output: expected shape"):
        s.step(m[:1], 90, x)
    with pytest.raises(TypeError, match="model_output: expected a torch.Tensor"):
        s.step(m.numpy(), 90, x)
    with pytest.raises(ValueError, match="model_output: expected device cpu"):  # another device than sample's
        s.step(m.to("meta"), 90, x)
    # the per-(device, dtype) kernel cache survives pickling and copying
    import copy
    import pickle

    for c in (copy.deepcopy(s), pickle.loads(pickle.dumps(s))):
        assert torch.equal(c.step(m, 90, x, generator=torch.Generator().manual_seed(0)).prev_sample, first)


# ---------------------------------------------------------------------------
# step() is one fused pass: no search of the timestep table, no host-device synchronisation
# ---------------------------------------------------------------------------
# Operators that would find t in the timestep table (diffusers: (self.timesteps == t).nonzero()).
SEARCH_OPS = {"aten.eq", "aten.ne", "aten.nonzero", "aten.argwhere", "aten.where", "aten.searchsorted",
              "aten.isin", "aten.argmax", "aten.argmin", "aten.sort", "aten.index"}


class TableReads(CountOps):
    """CountOps that also records every operator given the whole timestep table (or a slice longer than
    one timestep) as an argument: on a device that is a search kernel plus a synchronising read-back."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.ptr = table.untyped_storage().data_ptr()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for a in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(a, torch.Tensor) and a.numel() > 1 and a.untyped_storage().data_ptr() == self.ptr:
                self.reads.append(str(func.overloadpacket))
        return super().__torch_dispatch__(func, types, args, kwargs)


class Untouchable:
    """Stands in for scheduler.timesteps during step(): any use of it (a host-side search in Python or
    numpy) fails the test."""

    def _touched(self, *args, **kwargs):
        raise AssertionError("step() read scheduler.timesteps: a per-step search of the timestep table")

    __getattr__ = __eq__ = __ne__ = __iter__ = __len__ = __getitem__ = __array__ = _touched
    __torch_function__ = _touched
    __hash__ = None


def _counted_step(s, m, t, x, gen, **step_kw):
    table = s.timesteps
    s.step(m, t, x, generator=gen, **step_kw)  # first call resolves and caches the kernel (once per device)
    # DDPMScheduler.timesteps is a property (an assigned tensor rebuilds the successor table): its storage
    attr = "_timesteps" if isinstance(getattr(type(s), "timesteps", None), property) else "timesteps"
    setattr(s, attr, Untouchable())
    try:
        with torch.no_grad(), TableReads(table) as c:
            s.step(m, t, x, generator=gen, **step_kw)
    finally:
        setattr(s, attr, table)
    return c


STEP_COUNT_CASES = [
    dict(),
    dict(variance_type="learned_range"),
    dict(variance_type="fixed_large", prediction_type="v_prediction"),
    dict(prediction_type="sample", clip_sample=False),
]


@pytest.mark.parametrize("kw", STEP_COUNT_CASES, ids=_id)
def test_ddpm_step_is_one_fused_op_without_search(kw, monkeypatch):
    monkeypatch.delenv("FASTDDPM_BACKEND", raising=False)  # the default (C++) path is the one counted
    s = DDPMScheduler(**kw)
    s.set_timesteps(50)
    x = torch.randn(SHAPE)
    m = torch.randn(SHAPE[0], SHAPE[1] * (2 if "learned" in kw.get("variance_type", "") else 1), *SHAPE[2:])
    ts = s.timesteps
    # A pipeline's loop variable (a 0-d view of the table), a Python int, the last step (no noise).
    for t in (ts[1], int(ts[1]), ts[-1]):
        for gen in (None, torch.Generator().manual_seed(0)):
            c = _counted_step(s, m, t, x, gen)
            assert not c.reads, (t, c.names)
            assert not SEARCH_OPS & set(c.names), (t, c.names)
            assert sum(v for k, v in c.names.items() if k.startswith("fastddpm.")) == 1, (t, c.names)
            # The fused op, plus at most once each: the learned variance's split (a view), drawing z (the
            # op draws it itself where the generator allows), reading a CPU 0-d t on the host (no device
            # involved). No arithmetic outside the op; diffusers dispatches 57 operators here.
            extra = {k: v for k, v in c.names.items() if not k.startswith("fastddpm.")}
            assert set(extra) <= {"aten.split", "aten.randn", "aten._local_scalar_dense"}, (t, c.names)
            assert max(extra.values(), default=1) == 1 and c.ops <= 4, (t, c.names)
    # One timestep per sample: one gather from the previous-timestep table, still no search; on the CPU
    # the validity check of t runs here (on CUDA it is an asynchronous assert).
    c = _counted_step(s, m, ts[1:3].flip(0).repeat(SHAPE[0])[: SHAPE[0]].clone(), x, None)
    assert not c.reads and not {"aten.nonzero", "aten.argwhere", "aten.searchsorted", "aten.isin"} & set(c.names)
    assert c.names.get("aten.index", 0) == 1 and c.kernels <= 16, c.names


def test_step_search_detector_catches_diffusers():
    # The detector itself must see a search: diffusers' step finds t with (timesteps == t).nonzero().
    theirs = diffusers.DDPMScheduler()
    theirs.set_timesteps(50)
    x = torch.randn(SHAPE)
    with torch.no_grad(), TableReads(theirs.timesteps) as c:
        theirs.step(torch.randn(SHAPE), theirs.timesteps[1], x)
    assert "aten.eq" in c.reads and "aten.nonzero" in c.names and c.kernels > 3
    theirs.timesteps = Untouchable()
    with pytest.raises(AssertionError, match="per-step search"):
        theirs.step(torch.randn(SHAPE), 960, x)


@pytest.mark.parametrize("step_kw", [dict(), dict(eta=0.5)], ids=["eta0", "eta0.5"])
def test_ddim_step_is_one_fused_op_without_search(step_kw, monkeypatch):
    monkeypatch.delenv("FASTDDPM_BACKEND", raising=False)
    s = fastddpm.DDIMScheduler()
    s.set_timesteps(20)
    x, m = torch.randn(SHAPE), torch.randn(SHAPE)
    for t in (s.timesteps[1], int(s.timesteps[1]), s.timesteps[-1]):
        c = _counted_step(s, m, t, x, torch.Generator().manual_seed(0), **step_kw)
        assert not c.reads and not SEARCH_OPS & set(c.names), (t, c.names)
        assert c.names.get("fastddpm.ddim_step") == 1, c.names
        # the fused op, z, and the op's CPU-only check that prev_t < t (a (B,) compare and any())
        assert c.kernels <= 7, (t, c.names)


@contextlib.contextmanager
def sync_errors():
    """Every synchronising CUDA call (.item(), nonzero, a blocking copy either way) raises inside."""
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(prev)


def _guarded_step(sched, model, t, x, g, **step_kw):
    m = model(x, t)  # the toy model copies its weights to the device: outside the guarded region
    with sync_errors():
        return sched.step(m, t, x, generator=g, **step_kw).prev_sample


@pytest.mark.cuda
@pytest.mark.parametrize("kw", STEP_COUNT_CASES[:2], ids=_id)
def test_step_never_synchronises_on_cuda(kw):
    dev = torch.device("cuda")
    learned = "learned" in kw.get("variance_type", "")
    model = ToyModel(SHAPE[1], 1000, 2 * SHAPE[1] if learned else None)
    cases = [(DDPMScheduler(**kw), {})] + ([] if learned else [(fastddpm.DDIMScheduler(), dict(eta=0.5))])
    for sched, step_kw in cases:
        sched.set_timesteps(10, device=dev)
        assert sched.timesteps.device.type == "cuda"
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(SHAPE, device=dev)
        ints = sched.timesteps.tolist()
        per_sample = sched.timesteps[:2].repeat(SHAPE[0])[: SHAPE[0]].contiguous()

        for t in (sched.timesteps[0], ints[0], per_sample):  # warm-up: kernel resolution, cached tables
            sched.step(model(x, t), t, x, generator=g, **step_kw)
        torch.cuda.synchronize()
        for i, t in enumerate(sched.timesteps):  # 0-d CUDA tensors, as diffusers' pipeline passes them
            x = _guarded_step(sched, model, t, x, g, **step_kw)
            x = _guarded_step(sched, model, ints[i], x, g, **step_kw)  # Python ints
        x = _guarded_step(sched, model, per_sample, x, g, **step_kw)  # one timestep per sample
        assert torch.isfinite(x).all()
    # the guard works here: diffusers' step reads t's index back to the host
    theirs = diffusers.DDPMScheduler()
    theirs.set_timesteps(10, device=dev)
    t = theirs.timesteps[0]
    m = model(x, t)
    with pytest.raises(RuntimeError, match="synchroniz"), sync_errors():
        theirs.step(m, t, x, generator=g)


# ---------------------------------------------------------------------------
# DDIMScheduler
# ---------------------------------------------------------------------------
DDIM_CASES = [
    (dict(), dict()),
    (dict(clip_sample=False), dict(eta=1.0)),
    (dict(clip_sample=False, set_alpha_to_one=False), dict(eta=0.5)),
    (dict(prediction_type="v_prediction"), dict(eta=0.3, use_clipped_model_output=True)),
    (dict(prediction_type="sample", timestep_spacing="trailing"), dict()),
    (dict(prediction_type="epsilon", timestep_spacing="linspace", clip_sample_range=0.8),
     dict(use_clipped_model_output=True)),
    (dict(thresholding=True, sample_max_value=1.5), dict(eta=0.2)),
    (dict(beta_schedule="squaredcos_cap_v2", steps_offset=1), dict()),
    (dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing",
          clip_sample=False), dict()),
]


def run_ddim(s, model, x, g, steps, **step_kw):
    s.set_timesteps(steps)
    preds = []
    for t in s.timesteps:
        out = s.step(model(x, t), t, x, generator=g, **step_kw)
        x = out.prev_sample
        preds.append(out.pred_original_sample)
    return x, preds


@pytest.mark.parametrize("kw,step_kw", DDIM_CASES, ids=[_id({**a, **b}) for a, b in DDIM_CASES])
@pytest.mark.parametrize("steps", [10, 50])
def test_ddim_loop_matches_diffusers(kw, step_kw, steps, monkeypatch):
    ours, theirs = fastddpm.DDIMScheduler(**kw), diffusers.DDIMScheduler(**kw)
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)
    model = ToyModel(SHAPE[1], 1000, kind=kw.get("prediction_type", "epsilon"))
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(21))
    xa, pa = run_ddim(ours, model, x, torch.Generator().manual_seed(22), steps, **step_kw)
    xb, pb = run_ddim(theirs, model, x, torch.Generator().manual_seed(22), steps, **step_kw)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    x64, p64 = truth_loop(diffusers.DDIMScheduler, kw, model, x, 22, steps, monkeypatch=monkeypatch, **step_kw)
    assert_loop_close(xa, pa, xb, pb, x64, p64, theirs.alphas_cumprod[theirs.timesteps])


def test_ddim_variance_noise_and_generator_list():
    ours, theirs = fastddpm.DDIMScheduler(), diffusers.DDIMScheduler()
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    x = torch.randn(SHAPE)
    m = torch.randn(SHAPE)
    z = torch.randn(SHAPE)
    a = ours.step(m, 500, x, eta=0.7, variance_noise=z).prev_sample
    b = theirs.step(m, 500, x, eta=0.7, variance_noise=z).prev_sample
    assert rel(a, b) < 1e-5
    ga = [torch.Generator().manual_seed(i) for i in range(SHAPE[0])]
    gb = [torch.Generator().manual_seed(i) for i in range(SHAPE[0])]
    a = ours.step(m, 500, x, eta=0.7, generator=ga).prev_sample
    b = theirs.step(m, 500, x, eta=0.7, generator=gb).prev_sample
    assert rel(a, b) < 1e-5
    with pytest.raises(ValueError, match="Cannot pass both generator and variance_noise"):
        ours.step(m, 500, x, eta=0.7, variance_noise=z, generator=torch.Generator())


def test_ddim_bad_input_and_attributes(tmp_path):
    s = fastddpm.DDIMScheduler(num_train_timesteps=100)
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(torch.randn(SHAPE), 10, x)
    with pytest.raises(ValueError, match="cannot be larger"):
        s.set_timesteps(101)
    s.set_timesteps(10)
    with pytest.raises(ValueError, match="model_output: expected shape"):
        s.step(torch.randn(2, 3, 5, 6), 10, x)
    with pytest.raises(ValueError, match="model_output: expected device cpu"):  # another device than sample's
        s.step(torch.randn(SHAPE, device="meta"), 10, x)
    with pytest.raises(IndexError, match="timestep"):
        s.step(torch.randn(SHAPE), 100, x)
    with pytest.raises(ValueError, match="eta"):
        s.step(torch.randn(SHAPE), 10, x, eta=-1.0)
    with pytest.raises(NotImplementedError, match="beta_schedule"):
        fastddpm.DDIMScheduler(beta_schedule="sigmoid")  # diffusers' DDIM does not have it either
    theirs = diffusers.DDIMScheduler(num_train_timesteps=100)
    assert len(s) == len(theirs) and s.order == theirs.order
    for k, v in theirs.config.items():
        if not k.startswith("_"):
            assert s.config[k] == v, k
    s.save_pretrained(tmp_path)
    assert diffusers.DDIMScheduler.from_pretrained(tmp_path).config.num_train_timesteps == 100
    x0, n = torch.randn(SHAPE), torch.randn(SHAPE)
    t = torch.tensor([3, 97])
    assert rel(s.add_noise(x0, n, t), theirs.add_noise(x0, n, t)) < 1e-6
    assert rel(s.get_velocity(x0, n, t), theirs.get_velocity(x0, n, t)) < 1e-6


# ---------------------------------------------------------------------------
# DDPMPipeline
# ---------------------------------------------------------------------------
def _tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))


def _pipeline_model(unet, model_kind):
    from fastddpm.compat.diffusers import from_diffusers, is_patched

    if model_kind == "diffusers":
        return unet
    if model_kind == "patched":
        model = fastddpm.patch(copy.deepcopy(unet))
        assert is_patched(model) and not is_patched(unet)
        return model
    model = from_diffusers(unet)
    assert isinstance(model, fastddpm.UNet)
    return model


@functools.cache
def _reference_pipeline_images(kind):
    """diffusers' DDPMPipeline on the unpatched diffusers UNet: {output_type: images}, computed once for
    all the models compared with it (the machine is slow)."""
    theirs_s = diffusers.DDPMScheduler() if kind == "ddpm" else diffusers.DDIMScheduler()
    ref = diffusers.DDPMPipeline(unet=_tiny_unet(), scheduler=theirs_s)
    ref.set_progress_bar_config(disable=True)
    return {output_type: ref(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=8,
                             output_type=output_type).images for output_type in ("np", "pt", "pil")}


@pytest.mark.parametrize("model_kind", ["diffusers", "patched", "fastddpm"])
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_pipeline_matches_diffusers(kind, model_kind):
    # diffusers' pipeline with the unpatched diffusers UNet is the reference for every model: the same
    # weights as a diffusers UNet2DModel, patched with fastddpm's fused ops, or converted to a fastddpm.UNet.
    unet = _tiny_unet()
    model = _pipeline_model(unet, model_kind)
    ours_s = fastddpm.DDPMScheduler() if kind == "ddpm" else fastddpm.DDIMScheduler()
    pipe = fastddpm.DDPMPipeline(model, ours_s)
    pipe.set_progress_bar_config(disable=True)
    # DDIM: diffusers' float32 1 - abar_t/abar_prev cancellation (see LOOP_RTOL), compounded over 8 steps
    # through a network, measured ~2e-5 with every model; DDPM agrees to ~1e-6 (measured 5e-7 to 1.3e-6
    # with the patched and converted models: the fused GroupNorm+SiLU and attention round differently
    # from torch's in the last fp32 bits, and DDPM's clipped x0 keeps that from growing).
    tol = 1e-4 if kind == "ddim" else 1e-5
    images = {}
    for output_type in ("np", "pt", "pil"):
        a = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=8,
                 output_type=output_type).images
        b = _reference_pipeline_images(kind)[output_type]
        images[output_type] = a, b
        if output_type == "pil":
            continue
        assert type(a) is type(b)
        a, b = torch.as_tensor(a), torch.as_tensor(b)
        assert a.shape == b.shape and a.dtype == b.dtype
        assert (a - b).abs().max().item() < tol, (a - b).abs().max().item()
    a_pil, b_pil = images["pil"]
    assert len(a_pil) == len(b_pil) == 2
    assert all(x.size == y.size == (8, 8) and x.mode == y.mode == "RGB" for x, y in zip(a_pil, b_pil))
    pa = np.stack([np.asarray(im) for im in a_pil]).astype(np.int64)
    pb = np.stack([np.asarray(im) for im in b_pil]).astype(np.int64)
    # The pixels are the floats above times 255, rounded. The two float images differ by up to tol, so
    # a value within 255 tol of a rounding boundary (k + 1/2) may round to the neighbouring integer in
    # one of them: off by one is allowed there, and only there.
    b_np = images["np"][1] * 255
    near_boundary = np.abs(b_np - np.floor(b_np) - 0.5) <= 255 * tol
    assert np.abs(pa - pb).max() <= 1
    assert ((pa == pb) | near_boundary).all(), np.argwhere((pa != pb) & ~near_boundary)[:5]
    assert (pa == pb).mean() > 0.9  # most pixels are nowhere near a boundary
    (imgs,) = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=2,
                   return_dict=False)
    assert len(imgs) == 2 and imgs[0].size == (8, 8)
    with pytest.raises(ValueError, match="output_type"):
        pipe(num_inference_steps=2, output_type="jpg")


# ---------------------------------------------------------------------------
# fastddpm.sample
# ---------------------------------------------------------------------------
@pytest.mark.slow
def test_sample_full_chain_equals_algorithm2():
    model = GaussianEps(SHAPE[1])
    ours = fastddpm.sample(model, SHAPE, seed=0, progress=False, clip_denoised=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g)  # sample draws x_T first, then one z per step t > 0
    ref = algorithm2(model, x, 1000, g, "tilde")
    # fastddpm's own float64-derived float32 tables: closer to float64 than diffusers' (measured 1e-5)
    assert rel(ours, ref) < 5e-5


@pytest.mark.parametrize("sampler,steps,eta,noise", [
    ("ddpm", 1000, 0.0, "torch"), ("ddpm", 25, 0.0, "philox"), ("ddim", 20, 0.0, "torch"),
    ("ddim", 20, 1.0, "philox"), ("ddim", 7, 0.5, "torch"),
])
def test_sample_bitwise_deterministic(sampler, steps, eta, noise):
    model = ToyModel(SHAPE[1], 1000)
    runs = [fastddpm.sample(model, SHAPE, steps=steps, sampler=sampler, eta=eta, noise=noise, seed=42,
                            progress=False) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    other = fastddpm.sample(model, SHAPE, steps=steps, sampler=sampler, eta=eta, noise=noise, seed=43,
                            progress=False)
    assert not torch.equal(runs[0], other) or (sampler == "ddim" and eta == 0 and noise == "philox")


def test_sample_respaced_ddpm_matches_scheduler_with_custom_timesteps():
    # Respacing to S steps = a DDPM step from s_i to s_{i-1}: the DDPMScheduler with the same custom
    # timesteps on the same tables computes the same chain.
    from fastddpm.samplers.respace import space_timesteps

    ts = space_timesteps(1000, 30)
    assert ts[0] == 0 and ts[-1] == 999 and len(ts) == 30
    model = ToyModel(SHAPE[1], 1000)
    g = torch.Generator().manual_seed(3)
    ours = fastddpm.sample(model, SHAPE, steps=30, generator=g, progress=False)
    sched = DDPMScheduler()
    sched.schedule = fastddpm.NoiseSchedule()  # fastddpm.sample's tables
    sched.set_timesteps(timesteps=ts[::-1])
    g = torch.Generator().manual_seed(3)
    x = torch.randn(SHAPE, generator=g)
    for t in sched.timesteps:
        x = sched.step(model(x, t), t, x, generator=g).prev_sample
    # Not bitwise: the scheduler forms beta_t with diffusers' float32 rounding (1 - abar_t / abar_prev, so
    # that diffusers' pinned numbers hold), fastddpm.sample the exact (abar_prev - abar_t) / abar_prev.
    assert rel(ours, x) < 1e-5, rel(ours, x)


def test_sample_models_and_options():
    unet = _tiny_unet()
    x, inter = fastddpm.sample(unet, (2, 3, 8, 8), steps=4, seed=0, progress=False, return_intermediates=True)
    assert x.shape == (2, 3, 8, 8) and len(inter) == 4 and torch.equal(inter[-1], x)
    seen = []
    fastddpm.sample(lambda x, t: (torch.tanh(x),), (1, 2, 3), steps=5, sampler="ddim", seed=0,
                    progress=False, callback=lambda i, t, x: seen.append((i, t)))
    assert [i for i, _ in seen] == list(range(5)) and seen[0][1] > seen[-1][1] == 0
    v = fastddpm.sample(lambda x, t: 0.1 * x, (2, 3, 4, 4), steps=3, prediction_type="v_prediction",
                        seed=1, progress=False)
    assert torch.isfinite(v).all()
    learned = fastddpm.sample(lambda x, t: torch.cat([0.5 * x, torch.zeros_like(x)], 1), (2, 3, 4, 4), steps=3,
                              variance_type="learned_range", seed=1, progress=False)
    assert torch.isfinite(learned).all()


HO_ABAR = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))  # Ho et al.'s linear schedule, float64


class Rewritten:
    """An x0 or v model that is an exact rewrite of an epsilon model through the float64 schedule:
    x0 = (x - sqrt(1 - abar) eps) / sqrt(abar), v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho)."""

    def __init__(self, eps_model, kind):
        self.eps_model, self.kind = eps_model, kind

    def __call__(self, x, t):
        eps = self.eps_model(x, t).double()
        ab = torch.from_numpy(HO_ABAR)[t].reshape(-1, *([1] * (x.dim() - 1)))
        x0 = (x.double() - (1 - ab).sqrt() * eps) / ab.sqrt()
        out = x0 if self.kind == "sample" else ab.sqrt() * eps - (1 - ab).sqrt() * x0
        return out.to(x.dtype)


@pytest.mark.parametrize("sampler,steps,eta", [("ddpm", 1000, 0.0), ("ddpm", 40, 0.0), ("ddim", 25, 0.7)])
def test_sample_x0_and_v_models_equal_the_epsilon_model(sampler, steps, eta):
    eps_model = GaussianEps(SHAPE[1])  # a stable chain without clipping (the toy model's runs away)
    kw = dict(steps=steps, sampler=sampler, eta=eta, seed=4, progress=False, clip_denoised=False)
    ref = fastddpm.sample(eps_model, SHAPE, **kw)
    for kind in ("sample", "v_prediction"):
        out = fastddpm.sample(Rewritten(eps_model, kind), SHAPE, prediction_type=kind, **kw)
        # The same chain up to float32 rounding: the rewritten outputs are rounded to float32, and near
        # t = T an x0 output is ~1/sqrt(abar_T) = 160 times larger than x_t, so the kernel's conversion
        # back to eps loses ~160 ulp of eps there (the chain forgets it as t falls). Measured 2e-7 to 1e-6.
        assert rel(out, ref) < 1e-5, (kind, rel(out, ref))
    # and the models are not interchangeable without saying what they predict
    assert rel(fastddpm.sample(Rewritten(eps_model, "sample"), SHAPE, **kw), ref) > 1e-2


def ddim_eq12(model, x, ts, eta, generator, clip, consistent=False):
    """Song et al. 2021, eq. 12 in float64 (the last step to abar = 1); z ~ N(0, I) drawn in float32 at every
    step, as fastddpm.sample draws it when eta > 0. With clip, x0 is clipped; ``consistent`` then recomputes
    eps from the clipped x0 (the pair (x0, eps) that reproduces x_t, DDIM's own reading), else eps is the
    model's (diffusers' default reading)."""
    x = x.double()
    for i, t in enumerate(ts):
        ab = HO_ABAR[t]
        ab_prev = HO_ABAR[ts[i + 1]] if i + 1 < len(ts) else 1.0
        eps = model(x.float(), torch.full((x.shape[0],), t)).double()
        x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
        if clip:
            x0 = x0.clamp(-1, 1)
            if consistent:
                eps = (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab)) * math.sqrt(1 - ab / ab_prev)
        z = torch.randn(x.shape, generator=generator, dtype=torch.float32).double()
        x = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev - sigma**2) * eps + sigma * z
    return x


@pytest.mark.parametrize("clip,consistent", [(False, True), (True, True), (True, False)])
def test_sample_ddim_equals_eq12(clip, consistent):
    # The default (consistent=True) recomputes eps from the clipped x0 (issue 17: the model's eps with a
    # clipped x0 drifts off DDIM's path, and DDIM's images got worse with more steps); False is diffusers'.
    from fastddpm.samplers.respace import space_timesteps

    # the toy model's chain runs away unclipped (to |x| ~ 500); the Gaussian one stays put
    model = ToyModel(SHAPE[1], 1000) if clip else GaussianEps(SHAPE[1])
    ts = space_timesteps(1000, 20)[::-1]
    seen = []
    kw = {} if consistent else dict(use_clipped_model_output=False)
    ours = fastddpm.sample(model, SHAPE, steps=20, sampler="ddim", eta=0.6, seed=9, clip_denoised=clip,
                           progress=False, callback=lambda i, t, x: seen.append(t), **kw)
    assert seen == ts
    g = torch.Generator().manual_seed(9)
    ref = ddim_eq12(model, torch.randn(SHAPE, generator=g), ts, 0.6, g, clip, consistent)
    # fastddpm's float64-derived float32 tables and float32 steps against float64 throughout, 20 steps:
    # measured 2e-6
    assert rel(ours, ref) < 1e-5, rel(ours, ref)
    deterministic = fastddpm.sample(model, SHAPE, steps=20, sampler="ddim", eta=0.0, seed=9, clip_denoised=clip,
                                    progress=False, **kw)
    assert rel(deterministic, ref) > 1e-2  # eta reaches the noise term
    if clip:  # the two readings of a clipped step differ on this chain, so each check above can fail
        g = torch.Generator().manual_seed(9)
        other = ddim_eq12(model, torch.randn(SHAPE, generator=g), ts, 0.6, g, clip, not consistent)
        assert rel(ours, other) > 1e-3, rel(ours, other)


def test_cli_generate_ddim_clips_consistently():
    # The sample/eval command line samples through fastddpm.sample, so DDIM there recomputes eps from the
    # clipped x0 by default too (and differs from diffusers' reading on this clipped chain).
    from types import SimpleNamespace

    from fastddpm.sampling_cli import generate

    model = ToyModel(SHAPE[1], 1000)
    lm = SimpleNamespace(model=model, image_shape=SHAPE[1:], schedule=fastddpm.NoiseSchedule(),
                         prediction_type="epsilon")
    out = generate(lm, SHAPE[0], SHAPE[0], "ddim", 20, 4, torch.device("cpu"), progress=False)[0]
    kw = dict(steps=20, sampler="ddim", schedule=lm.schedule, progress=False)
    a = fastddpm.sample(model, SHAPE, generator=torch.Generator().manual_seed(4), **kw)
    b = fastddpm.sample(model, SHAPE, generator=torch.Generator().manual_seed(4), use_clipped_model_output=False,
                        **kw)
    assert torch.equal(out, a) and rel(a, b) > 1e-3


def learned_range_loop(model, x, ts, generator):
    """Nichol & Dhariwal 2021 eq. 15 on a respaced chain, float64: log sigma^2 = f log beta_t + (1 - f)
    log beta~_t, f = (v + 1) / 2, with beta_t = 1 - abar_t / abar_prev and beta~_t its posterior share."""
    x = x.double()
    C = x.shape[1]
    for i, t in enumerate(ts):
        ab = HO_ABAR[t]
        ab_prev = HO_ABAR[ts[i + 1]] if i + 1 < len(ts) else 1.0
        beta = 1 - ab / ab_prev
        out = model(x.float(), torch.full((x.shape[0],), t)).double()
        eps, v = out[:, :C], out[:, C:]
        x0 = ((x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)).clamp(-1, 1)
        mean = (math.sqrt(ab_prev) * beta / (1 - ab)) * x0 + (math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)) * x
        if i + 1 == len(ts):
            return mean
        tilde = (1 - ab_prev) / (1 - ab) * beta
        f = (v + 1) / 2
        log_var = f * math.log(beta) + (1 - f) * math.log(max(tilde, 1e-20))
        x = mean + (0.5 * log_var).exp() * torch.randn(x.shape, generator=generator, dtype=torch.float32).double()
    return x


def test_sample_learned_range_equals_nichol_dhariwal():
    from fastddpm.samplers.respace import space_timesteps

    model = ToyModel(SHAPE[1], 1000, 2 * SHAPE[1])
    ours = fastddpm.sample(model, SHAPE, steps=30, variance_type="learned_range", seed=2, progress=False)
    g = torch.Generator().manual_seed(2)
    ref = learned_range_loop(model, torch.randn(SHAPE, generator=g), space_timesteps(1000, 30)[::-1], g)
    # float32 tables and steps against float64, 30 steps, the log-variance interpolation in float32:
    # measured 4e-6
    assert rel(ours, ref) < 1e-5, rel(ours, ref)
    fixed = fastddpm.sample(lambda x, t: model(x, t)[:, : SHAPE[1]], SHAPE, steps=30, seed=2, progress=False)
    assert rel(fixed, ref) > 1e-3  # the model's variance channels matter


def test_sample_progress_bar(capfd):
    model = ToyModel(SHAPE[1], 1000)
    fastddpm.sample(model, SHAPE, steps=3, seed=0, progress=True)
    out, err = capfd.readouterr()
    assert "fastddpm ddpm" in err and "3/3" in err, err  # tqdm writes to stderr
    fastddpm.sample(model, SHAPE, steps=3, sampler="ddim", seed=0, progress=False)
    assert capfd.readouterr() == ("", "")


def test_sample_bad_input():
    model = ToyModel(SHAPE[1], 1000)
    with pytest.raises(ValueError, match="steps"):
        fastddpm.sample(model, SHAPE, steps=1001, progress=False)
    with pytest.raises(ValueError, match="steps"):
        fastddpm.sample(model, SHAPE, steps=0, progress=False)
    with pytest.raises(ValueError, match="sampler"):
        fastddpm.sample(model, SHAPE, sampler="euler", progress=False)
    with pytest.raises(ValueError, match="noise"):
        fastddpm.sample(model, SHAPE, noise="sobol", progress=False)
    with pytest.raises(ValueError, match="model output"):
        fastddpm.sample(lambda x, t: x[:, :2], SHAPE, steps=2, progress=False)
    with pytest.raises(ValueError, match="variance_type='learned_range'"):
        fastddpm.sample(lambda x, t: torch.cat([x, x], 1), SHAPE, steps=2, progress=False)
    with pytest.raises(ValueError, match="timesteps"):
        fastddpm.sample(model, SHAPE, timesteps=[5, 1000], progress=False)
    with pytest.raises(ValueError, match="steps, timesteps"):
        fastddpm.sample(model, SHAPE, steps=3, timesteps=[5, 1], progress=False)
    with pytest.raises(TypeError, match="model"):
        fastddpm.sample(lambda x, t: "x", SHAPE, steps=2, progress=False)


def test_sample_checks_a_unets_input_shape_before_its_first_step(capsys):
    """A shape fastddpm's UNet does not take is refused before the loop (no progress bar, no model call)."""
    net = fastddpm.UNet.tiny()
    calls = []
    net.register_forward_pre_hook(lambda *a: calls.append(1))
    for shape, match in (((1, 3, 7, 7), "multiples of 2"), ((1, 1, 8, 8), r"expected shape \(B, 3, H, W\)")):
        with pytest.raises(ValueError, match=match):
            fastddpm.sample(net, shape, steps=2)
    assert calls == [] and "it/s" not in capsys.readouterr().err


# ---------------------------------------------------------------------------
# CUDA graphs: what runs without CUDA
# ---------------------------------------------------------------------------
def test_cuda_graph_fails_loudly_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the failure path is for CUDA-less machines")
    with pytest.raises(RuntimeError, match="cuda_graph=True"):
        fastddpm.sample(ToyModel(SHAPE[1], 1000), SHAPE, steps=3, cuda_graph=True, progress=False)


def test_graph_buffers_and_index_tables():
    from fastddpm.samplers.graph import plan_buffers
    from fastddpm.samplers.sample import plan_sampling

    plan = plan_sampling(SHAPE, steps=10, sampler="ddpm", noise="philox")
    x_T = torch.randn(SHAPE)
    buf = plan_buffers(plan, x_T)
    assert buf.t_table.tolist() == sorted(buf.t_table.tolist(), reverse=True)
    assert buf.t_table[0] == 999 and buf.t_table[-1] == 0
    assert buf.prev_table[:-1].tolist() == buf.t_table[1:].tolist() and buf.prev_table[-1] == -1
    assert buf.offset.dim() == 0 and buf.offset.dtype == torch.int64 and buf.offset.item() == x_T.numel()
    assert buf.step_index.tolist() == [0] and buf.step_index.dtype == torch.int64
    assert torch.equal(buf.x, x_T) and buf.x.data_ptr() != x_T.data_ptr()
    with pytest.raises(ValueError, match="x_T"):
        plan_buffers(plan, torch.randn(1, 3, 5, 7))


def test_graph_step_advances_the_device_offset():
    # The captured step reads the Philox offset from buf.offset and advances it by numel: step k's noise is
    # normal(seed, (k + 1) * numel + i), what the eager loop passes as an int.
    from fastddpm.samplers.graph import graph_step, plan_buffers, reset_buffers
    from fastddpm.samplers.sample import call_model, plan_sampling

    plan = plan_sampling(SHAPE, steps=4, sampler="ddim", eta=1.0, noise="philox")
    x_T = torch.randn(SHAPE)
    buf = plan_buffers(plan, x_T)
    model = ToyModel(SHAPE[1], 1000)
    for k in range(2):
        x = buf.x.clone()
        graph_step(model, plan, buf, None, 21)
        assert buf.offset.item() == (k + 2) * plan.numel
        t, prev = int(plan.t[k]), int(plan.prev_t[k])
        m = call_model(model, x, torch.full((SHAPE[0],), t))
        want = fastddpm.ops.ddim_step(x, m, t, plan.schedule, prev, eta=1.0, noise="philox", seed=21,
                                      offset=(k + 1) * plan.numel, clip_sample=plan.clip_denoised,
                                      use_clipped_model_output=plan.use_clipped_model_output)
        assert torch.equal(buf.x, want), k
    reset_buffers(plan, buf, x_T)
    assert buf.offset.item() == plan.numel and buf.step_index.item() == 0 and torch.equal(buf.x, x_T)


@pytest.mark.parametrize("sampler,steps,eta,noise", [
    ("ddpm", 12, 0.0, "torch"), ("ddpm", 12, 0.0, "philox"), ("ddim", 9, 0.0, "torch"),
    ("ddim", 9, 1.0, "torch"), ("ddim", 9, 0.6, "philox"),
])
def test_graph_step_eager_equals_sample(sampler, steps, eta, noise):
    # The function a CUDA graph captures, run eagerly on the CPU, walks the same chain as fastddpm.sample.
    from fastddpm.samplers.graph import graph_step, plan_buffers
    from fastddpm.samplers.sample import initial_noise, plan_sampling

    model = ToyModel(SHAPE[1], 1000)
    plan = plan_sampling(SHAPE, steps=steps, sampler=sampler, eta=eta, noise=noise)
    g = torch.Generator().manual_seed(8) if noise == "torch" else None
    buf = plan_buffers(plan, initial_noise(plan, g, 5))
    for _ in range(plan.num_steps):
        graph_step(model, plan, buf, g, 5)
    assert buf.step_index.item() == plan.num_steps
    ref = fastddpm.sample(model, SHAPE, steps=steps, sampler=sampler, eta=eta, noise=noise,
                          generator=torch.Generator().manual_seed(8) if noise == "torch" else None,
                          seed=5 if noise == "philox" else None, progress=False)
    # the same torch.randn draws, or the same in-kernel Philox stream (the offset read from a tensor): bitwise
    assert torch.equal(buf.x, ref)


@pytest.mark.cuda
def test_cuda_graph_matches_eager_on_gpu():
    model = ToyModel(SHAPE[1], 1000).to("cuda")  # device weights before the capture
    for noise in ("philox", "torch"):
        kw = dict(steps=20, noise=noise, device="cuda", progress=False)
        g = torch.Generator(device="cuda")
        a = fastddpm.sample(model, SHAPE, cuda_graph=True, seed=3, generator=g.manual_seed(1), **kw)
        b = fastddpm.sample(model, SHAPE, cuda_graph=False, seed=3, generator=g.manual_seed(1), **kw)
        assert rel(a, b) < 1e-5
