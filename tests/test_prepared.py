"""fastddpm.ops.prepare_step: a prepared step gives bitwise the output of its public op, and of the op's
schema called directly with the kernels' integer codes written out here (csrc/include/fastddpm/
elementwise.h), for every backend that runs here and every noise mode."""

import gc
import inspect

import pytest
import torch
from _utils import backends_for, stable_seed

from fastddpm import NoiseSchedule, ops
from fastddpm.ops import reference
from fastddpm.ops.prepared import _CACHE, STEP_OPS, cached_step

SCHED = NoiseSchedule()
CPU = torch.device("cpu")
# The schemas' codes, written out by hand: a renamed or renumbered code in _codes.py fails here.
EPS, SAMPLE, V = 0, 1, 2
FIXED_SMALL, FIXED_LARGE, LEARNED_RANGE = 0, 2, 5
NONE, TENSOR, PHILOX = 0, 1, 2
NOISES = ["tensor", "generator", "default_generator", "philox", "philox_tensor_offset", "none"]


def _direct(backend, op):
    """The op's function on ``backend``, looked up here rather than through fastddpm's dispatch."""
    if backend == "cpu":
        return getattr(torch.ops.fastddpm, op)
    if backend == "triton":
        import importlib

        return getattr(importlib.import_module(f"fastddpm.triton_kernels.{op}"), f"{op}_triton")
    return getattr(reference, op)


def _inputs(op, noise, backend):
    g = torch.Generator().manual_seed(stable_seed(op, noise, backend))
    x = torch.randn(3, 2, 4, 5, generator=g)
    m = torch.randn(3, 2, 4, 5, generator=g)
    z = torch.randn(3, 2, 4, 5, generator=g)
    return x, m, z


def _noise_kw(noise, z):
    """(keyword arguments of the op, a function that gives the same call's z / mode for the schema call)."""
    if noise == "tensor":
        return dict(noise=z)
    if noise == "generator":
        return dict(noise=None, generator=torch.Generator().manual_seed(7))
    if noise == "default_generator":
        torch.manual_seed(11)
        return dict(noise=None)
    if noise == "philox":
        return dict(noise="philox", seed=5, offset=9)
    if noise == "philox_tensor_offset":
        return dict(noise="philox", seed=5, offset=torch.tensor(9))
    return dict(noise="none")


def _schema_noise(noise, z, shape):
    """(z, mode, seed, offset, extra args) for the schema call that matches _noise_kw(noise)."""
    if noise == "tensor":
        return z, TENSOR, 0, 0, ()
    if noise == "generator":
        return torch.randn(shape, generator=torch.Generator().manual_seed(7)), TENSOR, 0, 0, ()
    if noise == "default_generator":
        torch.manual_seed(11)
        return torch.randn(shape), TENSOR, 0, 0, ()
    if noise == "philox":
        return None, PHILOX, 5, 9, ()
    if noise == "philox_tensor_offset":
        return None, PHILOX, 5, 0, (torch.tensor(9),)
    return None, NONE, 0, 0, ()


def _params(op):
    return [(b, n) for b in backends_for(CPU, op) for n in (NOISES if op != "dpmpp_step" else ["none"])]


@pytest.mark.parametrize("backend, noise", _params("ddpm_step"))
@pytest.mark.parametrize("int_t", [True, False])
def test_prepared_ddpm_step(backend, noise, int_t):
    x, m, z = _inputs("ddpm_step", noise, backend)
    step = ops.prepare_step("ddpm_step", SCHED, CPU, torch.float32, backend=backend)
    assert (step.op, step.backend, step.device, step.dtype, step.schedule) == (
        "ddpm_step", backend, CPU, torch.float32, SCHED)
    t, pt = (600, 580) if int_t else (torch.tensor([600, 3, 0]), torch.tensor([580, 2, -20]))
    common = dict(prediction_type="v_prediction", variance_type="fixed_large", clip_sample=True,
                  clip_sample_range=1.5, diffusers_beta=True, return_pred_original=True)
    got, got_pred = step(x, m, t, pt, **_noise_kw(noise, z), **common)
    want, want_pred = ops.ddpm_step(x, m, t, SCHED, pt, **_noise_kw(noise, z), **common, backend=backend)
    assert torch.equal(got, want) and torch.equal(got_pred, want_pred)

    zz, mode, seed, off, extra = _schema_noise(noise, z, x.shape)
    tt = torch.full((3,), t) if int_t else t
    ptt = torch.full((3,), pt) if int_t else pt
    direct, direct_pred = _direct(backend, "ddpm_step")(
        x, m, tt, ptt, SCHED.alphas_cumprod, zz, None, seed, off, mode, V, FIXED_LARGE, 1.5, True, *extra,
        diffusers_beta=True)
    assert torch.equal(got, direct) and torch.equal(got_pred, direct_pred)
    # return_pred_original=False: no prediction, the same sample
    again, none = step(x, m, t, pt, **_noise_kw(noise, z), **{**common, "return_pred_original": False})
    assert none is None and torch.equal(again, got)


def test_prepared_ddpm_step_learned_range():
    x, m, z = _inputs("ddpm_step", "learned", "cpu")
    pv = torch.rand_like(x) * 2 - 1
    for backend in backends_for(CPU, "ddpm_step"):
        step = ops.prepare_step("ddpm_step", SCHED, CPU, torch.float32, backend=backend)
        got, _ = step(x, m, 500, noise=z, variance_type="learned_range", predicted_variance=pv)
        want = _direct(backend, "ddpm_step")(x, m, torch.full((3,), 500), torch.full((3,), 499), SCHED.alphas_cumprod,
                                             z, pv, 0, 0, TENSOR, EPS, LEARNED_RANGE, 0.0, False)[0]
        assert torch.equal(got, want), backend


@pytest.mark.parametrize("backend, noise", _params("ddim_step"))
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_prepared_ddim_step(backend, noise, eta):
    x, m, z = _inputs("ddim_step", noise, backend)
    step = ops.prepare_step("ddim_step", SCHED, CPU, torch.float32, backend=backend)
    t, pt = torch.tensor([600, 3, 0]), torch.tensor([580, 2, -20])
    common = dict(prediction_type="sample", clip_sample=True, clip_sample_range=0.8, final_alpha_cumprod=0.9,
                  use_clipped_model_output=True, diffusers_beta=True, return_pred_original=True)
    got, got_pred = step(x, m, t, pt, eta=eta, **_noise_kw(noise, z), **common)
    want, want_pred = ops.ddim_step(x, m, t, SCHED, pt, eta=eta, **_noise_kw(noise, z), **common, backend=backend)
    assert torch.equal(got, want) and torch.equal(got_pred, want_pred)

    zz, mode, seed, off, extra = _schema_noise(noise, z, x.shape)
    if noise in ("generator", "default_generator") and eta == 0:
        zz, mode = None, NONE  # diffusers draws no noise where eta = 0
    direct, direct_pred = _direct(backend, "ddim_step")(
        x, m, t, pt, SCHED.alphas_cumprod, 0.9, zz, seed, off, mode, SAMPLE, eta, 0.8, True, True, *extra,
        diffusers_beta=True)
    assert torch.equal(got, direct) and torch.equal(got_pred, direct_pred)


@pytest.mark.parametrize("backend", backends_for(CPU, "dpmpp_step"))
@pytest.mark.parametrize("second", [False, True])
def test_prepared_dpmpp_step(backend, second):
    x, m, d1 = _inputs("dpmpp_step", second, backend)
    step = ops.prepare_step("dpmpp_step", SCHED, CPU, torch.float32, backend=backend)
    t, pt, lt = torch.tensor([600, 3, 5]), torch.tensor([580, 2, -1]), torch.tensor([620, 9, 30])
    kw = dict(prev_x0=d1, last_t=lt) if second else {}
    got, got_pred = step(x, m, t, pt, **kw, prediction_type="epsilon", clip_sample=True, return_pred_original=True)
    want, want_pred = ops.dpmpp_step(x, m, t, SCHED, pt, **kw, clip_sample=True, return_pred_original=True,
                                     backend=backend)
    assert torch.equal(got, want) and torch.equal(got_pred, want_pred)
    direct, direct_pred = _direct(backend, "dpmpp_step")(
        x, m, d1 if second else None, t, pt, lt if second else None, SCHED.alphas_cumprod, EPS, 1.0, True)
    assert torch.equal(got, direct) and torch.equal(got_pred, direct_pred)
    # int timesteps broadcast over the batch
    a, _ = step(x, m, 600, 580, **({"prev_x0": d1, "last_t": 620} if second else {}))
    b = ops.dpmpp_step(x, m, 600, SCHED, 580, d1 if second else None, 620 if second else None, backend=backend)
    assert torch.equal(a, b)


@pytest.mark.parametrize("op", STEP_OPS)
def test_prepared_step_takes_the_ops_keyword_names(op):
    # The prepared step's keywords are the public op's (same names, same defaults).
    pub = inspect.signature(getattr(ops, op)).parameters
    step = ops.prepare_step(op, SCHED, CPU, torch.float32)
    for name, p in inspect.signature(step.__call__).parameters.items():
        assert name in pub, name
        if p.kind is p.KEYWORD_ONLY:
            assert p.default == pub[name].default, name


def test_prepare_step_errors():
    with pytest.raises(ValueError, match="op: expected one of ddpm_step, ddim_step, dpmpp_step"):
        ops.prepare_step("q_sample", SCHED, CPU, torch.float32)
    with pytest.raises(TypeError, match="schedule: expected a fastddpm.NoiseSchedule"):
        ops.prepare_step("ddpm_step", object(), CPU, torch.float32)
    with pytest.raises(TypeError, match="dtype: expected"):
        ops.prepare_step("ddpm_step", SCHED, CPU, torch.int64)
    with pytest.raises(ops.BackendNotSupported, match="ddim_step: backend 'cuda' cannot serve"):
        ops.prepare_step("ddim_step", SCHED, CPU, torch.float32, backend="cuda")
    with pytest.raises(ops.BackendNotSupported, match="float64 inputs run only"):
        ops.prepare_step("ddpm_step", SCHED, CPU, torch.float64, backend="cpu")
    with pytest.raises(ValueError, match="backend: expected one of"):
        ops.prepare_step("ddpm_step", SCHED, CPU, torch.float32, backend="gpu")
    step = ops.prepare_step("ddpm_step", SCHED, CPU, torch.float32)
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="variance_type: expected one of"):
        step(x, x, 5, variance_type="fixed_tiny")
    with pytest.raises(ValueError, match="prediction_type: expected one of"):
        step(x, x, 5, prediction_type="eps")
    with pytest.raises(ValueError, match="seed: required with noise='philox'"):
        step(x, x, 5, noise="philox")
    with pytest.raises(ValueError, match="noise: expected a tensor, None, 'philox' or 'none'"):
        step(x, x, 5, noise="gaussian")
    with pytest.raises(ValueError, match="last_t: required with prev_x0"):
        ops.prepare_step("dpmpp_step", SCHED, CPU, torch.float32)(x, x, 5, prev_x0=x)
    # a NaN or non-positive clip range turned the clipping off (x0 of 261 returned), eta = inf gave NaN images on
    # the CPU and eta -1 or NaN ran on the torch backend: the checks of ops.ddpm_step/ddim_step
    for backend in ("cpu", "torch"):
        for op in ("ddpm_step", "ddim_step", "dpmpp_step"):
            st = ops.prepare_step(op, SCHED, CPU, torch.float32, backend)
            for r in (float("nan"), -1.0, 0.0):
                with pytest.raises(ValueError, match="clip_sample_range: expected a positive number"):
                    st(x, x * 100, 999, clip_sample=True, clip_sample_range=r)
        st = ops.prepare_step("ddim_step", SCHED, CPU, torch.float32, backend)
        for eta in (float("inf"), -1.0, float("nan")):
            with pytest.raises(ValueError, match="eta: expected a finite non-negative number"):
                st(x, x, 5, eta=eta, noise="none")


def test_a_prev_t_below_int64_is_the_end():
    """Any negative prev_t is the end of the chain; -2**70 was torch.full's OverflowError naming nothing."""
    x, m, z = (torch.randn(2, 3, 4, 4) for _ in range(3))
    assert torch.equal(ops.ddpm_step(x, m, 5, SCHED, prev_t=-2**70, noise=z),
                       ops.ddpm_step(x, m, 5, SCHED, prev_t=-1, noise=z))
    assert torch.equal(ops.ddim_step(x, m, 5, SCHED, prev_t=-2**63 - 1, noise="none"),
                       ops.ddim_step(x, m, 5, SCHED, prev_t=-20, noise="none"))


def test_float64_prepared_step_reads_the_float64_table():
    step = ops.prepare_step("ddim_step", SCHED, CPU, torch.float64)
    assert step.backend == "torch" and step.alphas_cumprod.dtype == torch.float64
    assert torch.equal(step.alphas_cumprod, SCHED.table("alphas_cumprod", CPU, torch.float64))


def test_ops_cache_holds_the_schedule_weakly():
    s = NoiseSchedule(num_train_timesteps=50)
    x = torch.randn(2, 3)
    ops.ddim_step(x, x, 10, s)
    step = cached_step("ddim_step", s, CPU, torch.float32, "auto")
    assert step is cached_step("ddim_step", s, CPU, torch.float32, "auto")  # one step per configuration
    assert step.schedule is s and s in _CACHE
    n = len(_CACHE)
    del s
    gc.collect()
    assert len(_CACHE) == n - 1
