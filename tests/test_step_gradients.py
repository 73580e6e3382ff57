"""Gradients through the reverse steps: never dropped, and the same as the float64 reference's and diffusers'.

The fused step kernels have no backward; with grad mode on and an input that requires grad the prepared step
runs the PyTorch path (fastddpm/ops/prepared.py). Before that, the C++ and Triton steps returned outputs with
``requires_grad`` set and no gradient at all (torch only warned "an autograd kernel was not registered"), so
guidance or a loss through ``DDPMScheduler.step`` silently trained nothing.
"""

import warnings

import diffusers  # a pinned dev dependency: the parity reference, never skipped
import pytest
import torch
from _utils import backends_for, stable_seed

import fastddpm
from fastddpm import NoiseSchedule, ops
from fastddpm.ops import reference

SCHED = NoiseSchedule()
SHAPE = (2, 3, 4, 4)


def _leaves(*tensors, dtype=torch.float32):
    return [x.to(dtype).detach().requires_grad_() for x in tensors]


def _no_autograd_warning(record):
    msgs = [str(w.message) for w in record if "autograd kernel was not registered" in str(w.message)]
    assert not msgs, msgs


def _grads(fn, inputs, weights):
    """Gradients of sum(w * output) over the outputs, with respect to ``inputs``."""
    outs = fn(*inputs)
    loss = sum((o.double() * w).sum() for o, w in zip(outs, weights))
    return torch.autograd.grad(loss, inputs)


# Every step op, its public call on ``backend`` and the same step on the float64 reference (codes as in
# fastddpm/ops/_codes.py: prediction epsilon 0, sample 1, v 2; noise mode tensor 1; variance fixed_small 0).
def _ddpm(x, m, z, t, backend, pred, clip):
    kw = dict(prediction_type=pred, clip_sample=clip, return_pred_original=True)
    return ops.ddpm_step(x, m, t, SCHED, noise=z, backend=backend, **kw)


def _ddpm64(x, m, z, t, pred, clip):
    ac = SCHED.tables(x.device)["alphas_cumprod"].double()
    return reference.ddpm_step(x, m, t, t - 1, ac, z, None, 0, 0, 1, pred, 0, 1.0 if clip else 0.0, True)


def _ddim(x, m, z, t, backend, pred, clip):
    kw = dict(eta=0.7, prediction_type=pred, clip_sample=clip, use_clipped_model_output=clip,
              return_pred_original=True)
    return ops.ddim_step(x, m, t, SCHED, (t - 20).clamp(min=-1), noise=z, backend=backend, **kw)


def _ddim64(x, m, z, t, pred, clip):
    ac = SCHED.tables(x.device)["alphas_cumprod"].double()
    return reference.ddim_step(x, m, t, (t - 20).clamp(min=-1), ac, 1.0, z, 0, 0, 1, pred, 0.7,
                               1.0 if clip else 0.0, clip, True)


def _dpmpp(x, m, x0, t, backend, pred, clip):
    kw = dict(prediction_type=pred, clip_sample=clip, return_pred_original=True)
    return ops.dpmpp_step(x, m, t, SCHED, t - 20, x0, t + 20, backend=backend, **kw)


def _dpmpp64(x, m, x0, t, pred, clip):
    ac = SCHED.tables(x.device)["alphas_cumprod"].double()
    return reference.dpmpp_step(x, m, x0, t, t - 20, t + 20, ac, pred, 1.0 if clip else 0.0, True)


OPS = {"ddpm_step": (_ddpm, _ddpm64), "ddim_step": (_ddim, _ddim64), "dpmpp_step": (_dpmpp, _dpmpp64)}
CODES = {"epsilon": 0, "sample": 1, "v_prediction": 2}


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("pred", list(CODES))
@pytest.mark.parametrize("clip", [False, True])
def test_step_gradients_match_float64(op, pred, clip):
    fn, fn64 = OPS[op]
    g = torch.Generator().manual_seed(stable_seed(op, pred, clip))
    x, m, third = (torch.randn(SHAPE, generator=g) for _ in range(3))  # third: the noise, or DPM's previous x0
    t = torch.tensor([40, 700])
    weights = [torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(2)]
    ref = _grads(lambda *a: fn64(*a, t, CODES[pred], clip), _leaves(x, m, third, dtype=torch.float64), weights)
    for backend in backends_for(torch.device("cpu"), op):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            got = _grads(lambda *a, b=backend: fn(*a, t, b, pred, clip), _leaves(x, m, third), weights)
        _no_autograd_warning(record)
        for name, a, b in zip(("sample", "model_output", "third input"), got, ref):
            assert a is not None, (backend, name)
            err = ((a.double() - b).abs().max() / b.abs().max().clamp(min=1)).item()
            assert err < 1e-5, (backend, name, err)


@pytest.mark.parametrize("op", list(OPS))
def test_steps_without_grad_keep_the_fused_kernel(op):
    """Only a step autograd records takes the PyTorch path: inputs without grad, or torch.no_grad(), run the
    backend's own kernel (the fast path every sampler takes)."""
    from fastddpm.ops.prepared import cached_step

    fn = OPS[op][0]
    x, m, third = (torch.randn(SHAPE) for _ in range(3))
    t = torch.tensor([40, 700])

    def refuse(*a, **k):
        raise AssertionError("the PyTorch path ran")

    cached = cached_step(op, SCHED, torch.device("cpu"), torch.float32, "cpu")  # the step the public op runs
    saved, cached._torch_fn = cached._torch_fn, refuse
    try:
        fn(x, m, third, t, "cpu", "epsilon", False)
        with torch.no_grad():
            fn(*_leaves(x, m, third), t, "cpu", "epsilon", False)
        with pytest.raises(AssertionError, match="the PyTorch path ran"):
            fn(*_leaves(x, m, third), t, "cpu", "epsilon", False)
    finally:
        cached._torch_fn = saved


@pytest.mark.parametrize("kind", ["ddpm", "ddpm thresholding", "ddim", "ddim eta"])
@pytest.mark.parametrize("backend", ["auto", "cpu"])
def test_scheduler_step_gradients_match_diffusers(kind, backend):
    """Guidance through DDPMScheduler/DDIMScheduler.step: the gradients with respect to the model output and the
    sample are diffusers' (they were None on the C++ backend)."""
    config = dict(num_train_timesteps=100, thresholding=kind.endswith("thresholding"), clip_sample=kind == "ddim")
    if kind.startswith("ddpm"):
        pair = (diffusers.DDPMScheduler(**config), fastddpm.DDPMScheduler(**config, backend=backend))
    else:
        pair = (diffusers.DDIMScheduler(**config), fastddpm.DDIMScheduler(**config, backend=backend))
    kw = {"eta": 1.0} if kind == "ddim eta" else {}
    g = torch.Generator().manual_seed(stable_seed(kind))
    m, x, w = (torch.randn(SHAPE, generator=g) for _ in range(3))
    out = []
    for s in pair:
        s.set_timesteps(10)
        mm, xx = _leaves(m, x)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            step = s.step(mm, 50, xx, generator=torch.Generator().manual_seed(3), **kw)
            (step.prev_sample * w).sum().backward()
        _no_autograd_warning(record)
        out.append((mm.grad, xx.grad))
    (dm, dx), (fm, fx) = out
    assert fm is not None and fx is not None
    torch.testing.assert_close(fm, dm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fx, dx, rtol=1e-5, atol=1e-5)
