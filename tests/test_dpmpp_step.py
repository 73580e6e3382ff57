"""dpmpp_step (DPM-Solver++(2M)) on every backend against float64, and the whole sampling loop against
diffusers' DPMSolverMultistepScheduler on the same model and noise."""

import math
import zlib

import pytest
import torch
from _utils import assert_backends_tested, backends_for, devices_to_test

import fastddpm
from fastddpm import NoiseSchedule, ops
from fastddpm.ops import reference
from fastddpm.ops._codes import PREDICTION_TYPES
from fastddpm.samplers.dpmpp import dpmpp_timesteps

SCHED = NoiseSchedule()
SHAPES = [(1, 1, 1, 3), (3, 5, 7, 11), (2, 3, 16, 16), (5, 13)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEVICES = devices_to_test()


def paper_update(x, m, prev_x0, t, prev_t, last_t, pred_type, clip):
    """Lu et al. 2022 (DPM-Solver++, Algorithm 2, midpoint form) in float64, per sample, written in diffusers'
    sigma parametrisation (sigma = sqrt((1 - abar) / abar), alpha_t = 1 / sqrt(sigma^2 + 1), lambda = log alpha
    - log sigma, e^{-h} - 1 directly): a second implementation, independent of the reference's arithmetic."""
    ac = SCHED.table("alphas_cumprod", "cpu", torch.float64)
    out, d0s = [], []
    for b in range(x.shape[0]):
        def a_s(tt):
            sig = math.sqrt((1 - ac[tt].item()) / ac[tt].item())
            al = 1 / math.sqrt(sig * sig + 1)
            return al, sig * al

        al0, sg0 = a_s(int(t[b]))
        xb, mb = x[b].double(), m[b].double()
        d0 = {"epsilon": (xb - sg0 * mb) / al0, "sample": mb, "v_prediction": al0 * xb - sg0 * mb}[pred_type]
        if clip:
            d0 = d0.clamp(-1, 1)
        d0s.append(d0)
        if int(prev_t[b]) < 0:
            out.append(d0)
            continue
        alt, sgt = a_s(int(prev_t[b]))
        lam_t, lam_0 = math.log(alt) - math.log(sgt), math.log(al0) - math.log(sg0)
        h = lam_t - lam_0
        xt = (sgt / sg0) * xb - alt * (math.exp(-h) - 1) * d0
        if prev_x0 is not None:
            al1, sg1 = a_s(int(last_t[b]))
            r0 = (lam_0 - (math.log(al1) - math.log(sg1))) / h
            xt = xt - 0.5 * alt * (math.exp(-h) - 1) * (d0 - prev_x0[b].double()) / r0
        out.append(xt)
    return torch.stack(out), torch.stack(d0s)


def forward_scale(x, m, p, t, prev_t, last_t, pred_type):
    """The forward-error scale of the update: it evaluated in float64 on absolute values (the sum of |term|s).
    An fp32 evaluation of a short expression has |error| <= c u K, u = 2^-24."""
    ac = SCHED.table("alphas_cumprod", x.device, torch.float64)
    sh = (-1, *[1] * (x.dim() - 1))
    ab0 = ac[t].view(sh)
    final = (prev_t < 0).view(sh)
    abt = torch.where(final, ab0 * 0 + 1, ac[prev_t.clamp(min=0)].view(sh))
    xa, ma = x.double().abs(), m.double().abs()
    k_x0 = {"epsilon": (xa + (1 - ab0).sqrt() * ma) / ab0.sqrt(), "sample": ma,
            "v_prediction": ab0.sqrt() * xa + (1 - ab0).sqrt() * ma}[pred_type]

    def lam(ab):
        return 0.5 * (ab.log() - (-ab).log1p())

    h = torch.where(final, ab0 * 0 + 1, lam(torch.where(final, ab0, abt)) - lam(ab0))
    k = abt.sqrt() * -torch.expm1(-h)
    c_x = ((1 - abt) / (1 - ab0)).sqrt()
    if p is None:
        K = c_x * xa + k * k_x0
    else:
        r0 = (lam(ab0) - lam(ac[last_t].view(sh))) / h
        K = c_x * xa + k * (1 + 0.5 / r0) * k_x0 + k * 0.5 / r0 * p.double().abs()
    return k_x0, torch.where(final, k_x0, K)


def ref64(x, m, p, t, pt, lt, pred_type="epsilon", clip=False, return_pred=False):
    """The float64 reference on the float32 table the kernels read (DESIGN.md: schedules are stored as float32
    tables): the kernels' own arithmetic error, without the table's rounding (up to 5e-6 relative in 1 - abar
    near t = 0), which every fp32 implementation, diffusers' included, inherits."""
    ac = SCHED.tables(x.device)["alphas_cumprod"].double()
    out, x0 = reference.dpmpp_step(x.double(), m.double(), None if p is None else p.double(), t, pt, lt, ac,
                                   PREDICTION_TYPES[pred_type], 1.0 if clip else 0.0, True)
    return (out, x0) if return_pred else out


def err_ratio(actual, ref, k):
    return ((actual.double() - ref.double()).abs() / (k + ref.double().abs()).clamp(min=1e-30)).max().item()


def test_backends_tested():
    assert_backends_tested("dpmpp_step")


def _inputs(shape, dtype, dev, seed_key, steps_back=(1, 60)):
    B = shape[0]
    g = torch.Generator().manual_seed(zlib.crc32(repr(seed_key).encode()))
    x, m, p = (torch.randn(shape, generator=g).to(dev, dtype) for _ in range(3))
    t = torch.randint(1, 940, (B,), generator=g)
    t[0] = 939
    prev_t = (t - torch.randint(1, 60, (B,), generator=g)).clamp(min=-1)
    prev_t[-1] = -1
    last_t = t + torch.randint(1, 60, (B,), generator=g)
    return x, m, p, t.to(dev), prev_t.to(dev), last_t.to(dev)


def test_reference_is_the_paper():
    # The float64 reference (the "torch" backend) against an independent float64 transcription of the paper.
    shape = (4, 3, 5, 5)
    for pred_type in ("epsilon", "sample", "v_prediction"):
        for second in (False, True):
            for clip in (False, True):
                x, m, p, t, pt, lt = _inputs(shape, torch.float64, "cpu", ("paper", pred_type, second, clip))
                p = p if second else None
                lt = lt if second else None
                out, d0 = ops.dpmpp_step(x, m, t, SCHED, pt, p, lt, prediction_type=pred_type, clip_sample=clip,
                                         return_pred_original=True, backend="torch")
                ref, ref_d0 = paper_update(x, m, p, t, pt, lt, pred_type, clip)
                assert (out - ref).abs().max().item() < 1e-12 * max(1.0, ref.abs().max().item())
                assert (d0 - ref_d0).abs().max().item() < 1e-12 * max(1.0, ref_d0.abs().max().item())


@pytest.mark.parametrize("dev", DEVICES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pred_type", ["epsilon", "sample", "v_prediction"])
def test_dpmpp_step_matches_reference(shape, dtype, pred_type, dev):
    x, m, p, t, pt, lt = _inputs(shape, dtype, dev, (shape, dtype, pred_type))
    for second, clip in [(False, False), (True, False), (True, True)]:
        pp, ll = (p, lt) if second else (None, None)
        kw = dict(prediction_type=pred_type, clip_sample=clip, return_pred_original=True)
        ref, ref_x0 = ref64(x, m, pp, t, pt, ll, pred_type, clip, return_pred=True)
        eager, eager_x0 = ops.dpmpp_step(x, m, t, SCHED, pt, pp, ll, backend="torch", **kw)
        k_x0, k = forward_scale(x, m, pp, t, pt, ll, pred_type)
        for b in backends_for(dev, "dpmpp_step"):
            out, x0 = ops.dpmpp_step(x, m, t, SCHED, pt, pp, ll, backend=b, **kw)
            assert out.dtype == dtype and out.shape == x.shape and torch.isfinite(out).all(), b
            # the step to sigma = 0 (the last sample) is x0 itself
            assert torch.equal(out[-1], x0[-1]), b
            if dtype == torch.float32:
                # c u K with c = 16: a few ulp of the operands (DESIGN.md, elementwise). The "torch" backend
                # is the reference run in fp32: it writes h as the paper's difference of two lambdas, which
                # loses bits when t and prev_t are close (test_dpmpp_step_small_steps shows it failing 2e-6);
                # measured up to 1.9e-6 on these inputs (AVX-512 CPU), so it is held to 1e-5 for the update.
                bound = 1e-5 if b == "torch" else 1e-6
                assert err_ratio(out, ref, k) < bound, (b, second, clip)
                assert err_ratio(x0, ref_x0, k_x0) < 1e-6, (b, second, clip)
            else:  # twice the error of torch's eager computation in that dtype, plus one ulp
                eps = torch.finfo(dtype).eps
                assert err_ratio(out, ref, k) <= 2 * err_ratio(eager, ref, k) + eps, (b, second, clip)
                assert err_ratio(x0, ref_x0, k_x0) <= 2 * err_ratio(eager_x0, ref_x0, k_x0) + eps, (b, second)


@pytest.mark.parametrize("dev", DEVICES, ids=str)
def test_dpmpp_step_small_steps(dev):
    # 1000 steps: h ~ 1e-3 between neighbouring timesteps, where lambda_t - lambda_s written as a difference of
    # two lambdas loses several bits; the kernels' log1p form must keep fp32 accuracy.
    x, m, p = (torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(i)).to(dev) for i in range(3))
    t = torch.tensor([500, 900, 3], device=dev)
    pt, lt = t - 1, t + 1
    ref = ref64(x, m, p, t, pt, lt)
    k = forward_scale(x, m, p, t, pt, lt, "epsilon")[1]
    for b in backends_for(dev, "dpmpp_step"):
        out = ops.dpmpp_step(x, m, t, SCHED, pt, p, lt, backend=b)
        if b == "torch":  # the reference writes the paper's difference of lambdas: in fp32 it fails the bound
            assert err_ratio(out, ref, k) > 2e-6
        else:
            assert err_ratio(out, ref, k) < 1e-6, b


@pytest.mark.parametrize("dev", DEVICES, ids=str)
def test_dpmpp_step_layouts(dev):
    cl = torch.channels_last
    x, m, p = (torch.randn(2, 4, 6, 5, device=dev).to(memory_format=cl) for _ in range(3))
    t, pt, lt = torch.tensor([400, 30], device=dev), torch.tensor([300, 2], device=dev), torch.tensor([500, 99])
    lt = lt.to(dev)
    ref = ops.dpmpp_step(x.contiguous(), m.contiguous(), t, SCHED, pt, p.contiguous(), lt, backend="torch")
    for b in backends_for(dev, "dpmpp_step"):
        out = ops.dpmpp_step(x, m, t, SCHED, pt, p, lt, backend=b)
        assert (out - ref).abs().max().item() < 1e-5, b
        assert out.is_contiguous(memory_format=cl), b
        # mixed layouts (prev_x0 NCHW) go through a contiguous copy and give the same numbers
        out2 = ops.dpmpp_step(x, m, t, SCHED, pt, p.contiguous(), lt, backend=b)
        assert (out2 - ref).abs().max().item() < 1e-5, b
        # a non-contiguous slice
        xs, ms = torch.randn(2, 4, 6, 10, device=dev)[..., ::2], torch.randn(2, 4, 6, 10, device=dev)[..., ::2]
        r = ops.dpmpp_step(xs.contiguous(), ms.contiguous(), t, SCHED, pt, backend="torch")
        assert (ops.dpmpp_step(xs, ms, t, SCHED, pt, backend=b) - r).abs().max().item() < 1e-5, b


def test_dpmpp_step_fake_tensor():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 3, 4, 4)
        z = torch.zeros(2, dtype=torch.long)
        out, pred = torch.ops.fastddpm.dpmpp_step(x, x, x, z + 5, z, z + 9, torch.empty(1000), 0, 0.0, True)
        assert out.shape == x.shape and pred.shape == x.shape
        out, pred = torch.ops.fastddpm.dpmpp_step(x, x, None, z + 5, z, None, torch.empty(1000), 0, 0.0, False)
        assert out.shape == x.shape and pred.numel() == 0


def test_dpmpp_step_opcheck():
    x, m, p = (torch.randn(2, 3, 4, 4) for _ in range(3))
    t, pt, lt = torch.tensor([500, 20]), torch.tensor([400, -1]), torch.tensor([600, 30])
    ac = SCHED.alphas_cumprod
    torch.library.opcheck(torch.ops.fastddpm.dpmpp_step.default, (x, m, p, t, pt, lt, ac, 0, 1.0, True))
    torch.library.opcheck(torch.ops.fastddpm.dpmpp_step.default, (x, m, None, t, pt, None, ac, 2, 0.0, False))


def test_dpmpp_step_int_timesteps_match_tensors():
    """Int t, prev_t, last_t (a sampler's loop, served from one cached pair of tensors) step exactly as the same
    timesteps given as tensors on every backend, prev_t below -1 included (the end of the chain, read as -1)."""
    x, m, p = (torch.randn(2, 3, 4, 4) for _ in range(3))
    full = lambda v: torch.full((2,), v)  # noqa: E731
    for backend in backends_for(torch.device("cpu"), "dpmpp_step"):
        for t, prev_t in ((500, 480), (10, -20), (7, None)):
            pt = full(max(prev_t, -1)) if prev_t is not None else full(t - 1)
            for second in (False, True):
                kw = dict(prev_x0=p, last_t=t + 20) if second else {}
                kt = dict(prev_x0=p, last_t=full(t + 20)) if second else {}
                got = ops.dpmpp_step(x, m, t, SCHED, prev_t, backend=backend, **kw)
                want = ops.dpmpp_step(x, m, full(t), SCHED, pt, backend=backend, **kt)
                assert torch.equal(got, want), (backend, t, prev_t, second)


def test_dpmpp_step_bad_input():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="model_output"):
        ops.dpmpp_step(x, torch.randn(2, 3, 4, 5), 10, SCHED)
    with pytest.raises(ValueError, match="prev_t"):
        ops.dpmpp_step(x, x, 10, SCHED, prev_t=10)
    with pytest.raises(ValueError, match="last_t"):
        ops.dpmpp_step(x, x, 10, SCHED, 5, prev_x0=x)
    with pytest.raises(ValueError, match="last_t"):
        ops.dpmpp_step(x, x, 10, SCHED, 5, prev_x0=x, last_t=10)
    with pytest.raises(ValueError, match="last_t"):
        ops.dpmpp_step(x, x, 10, SCHED, 5, last_t=20)
    with pytest.raises(ValueError, match="prev_x0"):
        ops.dpmpp_step(x, x, 10, SCHED, 5, prev_x0=x[:1], last_t=20)
    with pytest.raises(ValueError, match="t"):
        ops.dpmpp_step(x, x, 1000, SCHED)
    with pytest.raises(ValueError, match="prediction_type"):
        ops.dpmpp_step(x, x, 10, SCHED, prediction_type="x0")
    with pytest.raises(ValueError, match="clip_sample_range"):
        ops.dpmpp_step(x, x, 10, SCHED, clip_sample=True, clip_sample_range=0.0)
    with pytest.raises(RuntimeError, match="last_t"):  # the C++ kernel's own checks
        torch.ops.fastddpm.dpmpp_step(x, x, x, torch.tensor([5, 5]), torch.tensor([4, 4]), torch.tensor([6, 5]),
                                      SCHED.alphas_cumprod, 0, 0.0, False)
    with pytest.raises(RuntimeError, match="prev_t"):
        torch.ops.fastddpm.dpmpp_step(x, x, None, torch.tensor([5, 5]), torch.tensor([4, 5]), None,
                                      SCHED.alphas_cumprod, 0, 0.0, False)


def test_dpmpp_timesteps_are_diffusers():
    from diffusers import DPMSolverMultistepScheduler

    for steps in (1, 10, 20, 50, 333):
        s = DPMSolverMultistepScheduler()
        s.set_timesteps(steps)
        assert dpmpp_timesteps(1000, steps) == s.timesteps.tolist(), steps
    with pytest.raises(ValueError, match="steps"):
        dpmpp_timesteps(1000, 1000)


@pytest.fixture(scope="module")
def digits():
    from fastddpm import pretrained

    return pretrained.load("digits")


@pytest.mark.parametrize("steps,clip", [(10, False), (20, True)])
def test_sample_dpmpp_matches_diffusers(digits, steps, clip):
    """The whole loop against diffusers' DPMSolverMultistepScheduler with its defaults (dpmsolver++, order 2,
    midpoint, lower_order_final, final sigma 0, linspace spacing) on the shipped model and the same x_T.
    clip_denoised=True is diffusers' thresholding=True with sample_max_value=1 (the quantile s is clamped to
    [1, 1]: a clip of x0 to [-1, 1])."""
    from diffusers import DPMSolverMultistepScheduler

    model, shape = digits.model.eval(), (4, 1, 16, 16)
    sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear", thresholding=clip,
                                        sample_max_value=1.0)
    sched.set_timesteps(steps)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(model(x, t.expand(shape[0])), t, x).prev_sample
    # NCHW, as the diffusers loop above runs the model: on the CPU fastddpm.sample's default is channels_last,
    # whose convolutions round differently (on a 2-core AMD EPYC, 2026-12-08: 2.9e-5 at 10 steps against 5.8e-6
    # in NCHW), which compares the layouts (test_channels_last_same_images), not the solvers.
    ours = fastddpm.sample(model, shape, sampler="dpm++2m", steps=steps, schedule=digits.schedule,
                           generator=torch.Generator().manual_seed(3), clip_denoised=clip, progress=False,
                           channels_last=False)
    # Both are fp32 loops of the same ODE solver: coefficients differ by float32 rounding (diffusers' through
    # log(alpha) - log(sigma), ours through log1p), a few 1e-7 relative per step; measured 1-6e-6 over 10 and 20
    # steps on images of scale 1. 2e-5 leaves a 3x margin and is still 1e4 below a one-step difference.
    assert (ours - x).abs().max().item() < 2e-5
    if clip:  # the check tells apart two runs that differ only in that clip
        other = fastddpm.sample(model, shape, sampler="dpm++2m", steps=steps, schedule=digits.schedule,
                                generator=torch.Generator().manual_seed(3), clip_denoised=False, progress=False)
        assert (other - x).abs().max().item() > 1e-3


def test_sample_dpmpp_api(digits):
    model = digits.model.eval()
    calls = []
    x = fastddpm.sample(model, (2, 1, 16, 16), sampler="dpm++2m", seed=0, schedule=digits.schedule,
                        progress=False, callback=lambda i, t, x: calls.append(t))
    assert calls == dpmpp_timesteps(1000, 20)  # the default is 20 steps
    assert x.shape == (2, 1, 16, 16) and torch.isfinite(x).all()
    # the backend of the fused step does not change the images beyond fp32 rounding
    for b in backends_for(torch.device("cpu"), "dpmpp_step"):
        y = fastddpm.sample(model, (2, 1, 16, 16), sampler="dpm++2m", seed=0, schedule=digits.schedule,
                            progress=False, backend=b)
        assert (x - y).abs().max().item() < 1e-4, b
    with pytest.raises(ValueError, match="cuda_graph"):
        fastddpm.sample(model, (2, 1, 16, 16), sampler="dpm++2m", cuda_graph=True, progress=False)
    with pytest.raises(ValueError, match="variance_type"):
        fastddpm.sample(model, (2, 1, 16, 16), sampler="dpm++2m", variance_type="learned_range", progress=False)
