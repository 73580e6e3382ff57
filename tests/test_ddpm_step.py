"""ddpm_step on every backend against the float64 reference, diffusers and Algorithm 2."""

import contextlib

import pytest
import torch
from _utils import HAS_CUDA, assert_backends_tested, backends_for, devices_to_test, half_bound, rel_err, stable_seed

from fastddpm import NoiseSchedule, ops
from fastddpm.ops import reference

SCHED = NoiseSchedule()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1, 1, 3), (3, 5, 7, 11), (2, 3, 32, 32), (5, 13)]


def scaled_err(actual, ref):
    """max |actual - ref| / max(max |ref|, 1): error on the scale of the output.

    Predicted x0 = (x - sqrt(1-abar) eps) / sqrt(abar) cancels and is amplified by up to
    1/sqrt(abar_999) ~ 160, so per-element relative error is ill-conditioned; the error
    relative to the output's own scale is what fp32 rounding bounds.
    """
    a, r = actual.double(), ref.double()
    return ((a - r).abs().max() / r.abs().max().clamp(min=1.0)).item()


# fp32: a few ulp of the operands times the (small) conditioning of the step; measured
# 1-2e-6 on this CPU. Half: twice torch's own eager error in that dtype (DESIGN.md).
FP32_BOUND = 4e-6


def forward_error_ratio(actual, ref, x, m, z, t, prev_t=None, pred=0, what="out"):
    """max |actual - ref| / K, with K the standard forward-error scale of the step:
    the same expression evaluated in float64 on absolute values (sum of |term|s).

    An fp32 evaluation of a short expression has |error| <= c u K with u = 2^-24 and c
    a small count of operations; we allow c = 16, i.e. a ratio of 1e-6.
    """
    ac = SCHED.table("alphas_cumprod", x.device, torch.float64)
    nd = x.dim()
    pt = t - 1 if prev_t is None else prev_t
    ab_t = ac[t].view(-1, *[1] * (nd - 1))
    ab_p = torch.where(pt >= 0, ac[pt.clamp(min=0)], torch.ones((), dtype=torch.float64, device=x.device))
    ab_p = ab_p.view(-1, *[1] * (nd - 1))
    xa, ma = x.double().abs(), m.double().abs()
    if pred == 0:
        k_x0 = (xa + (1 - ab_t).sqrt() * ma) / ab_t.sqrt()
    elif pred == 1:
        k_x0 = ma
    else:
        k_x0 = ab_t.sqrt() * xa + (1 - ab_t).sqrt() * ma
    if what == "pred":
        k = k_x0
    else:
        cb = (ab_p - ab_t) / ab_p
        k = ab_p.sqrt() * cb / (1 - ab_t) * k_x0 + (ab_t / ab_p).sqrt() * (1 - ab_p) / (1 - ab_t) * xa
        if z is not None:
            k = k + cb.sqrt() * z.double().abs()
    k = k + ref.double().abs()
    return ((actual.double() - ref.double()).abs() / k.clamp(min=1e-30)).max().item()


def ref64(x, m, t, prev_t=None, noise=None, pv=None, prediction_type="epsilon", variance_type="fixed_small",
          clip_sample=False, seed=0, offset=0, noise_mode=None):
    """The float64 reference evaluated on the kernels' own inputs, the fp32 abar table included.

    Rounding abar to fp32 moves 1 - abar_t/abar_prev by up to ~1e-4 relative where beta ~ 1e-4;
    that is the schedule's rounding (diffusers has the same), not the kernel's error, so the
    kernel is judged against float64 arithmetic on the same fp32 table.
    """
    from fastddpm.ops._codes import PREDICTION_TYPES, VARIANCE_TYPES

    if isinstance(t, int):
        t = torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device)
    pt = t - 1 if prev_t is None else prev_t
    if noise_mode is None:
        noise_mode = 1 if noise is not None else 0
    out, pred = reference.ddpm_step(
        x.double(), m.double(), t, pt, SCHED.tables(x.device)["alphas_cumprod"].double(),
        None if noise is None else noise.double(), None if pv is None else pv.double(), seed, offset,
        noise_mode, PREDICTION_TYPES[prediction_type], VARIANCE_TYPES[variance_type],
        1.0 if clip_sample else 0.0, True)
    return out, pred


def _cases():
    for dev in devices_to_test():
        for b in backends_for(dev, "ddpm_step"):
            if b != "torch":
                yield dev, b


def _inputs(shape, dtype, device, seed, t_max=1000):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(device, dtype)
    m = torch.randn(shape, generator=g).to(device, dtype)
    z = torch.randn(shape, generator=g).to(device, dtype)
    pv = (torch.rand(shape, generator=g) * 2 - 1).to(device, dtype)
    t = torch.randint(0, t_max, (shape[0],), generator=g)
    t[0] = 0  # t = 0 adds no noise: always cover it
    return x, m, z, pv, t.to(device)


def _eager(x, m, z, ab_t, ab_p, t, pred, var, clip):
    # torch's own step in the input dtype, as diffusers runs it on half tensors: the
    # coefficients are fp32 scalars, the elementwise arithmetic happens in x.dtype.
    bt, bp = 1 - ab_t, 1 - ab_p
    ca = ab_t / ab_p
    cb = 1 - ca
    d = x.dtype
    if pred == 0:
        x0 = (x - (bt**0.5).to(d) * m) / (ab_t**0.5).to(d)
    elif pred == 1:
        x0 = m
    else:
        x0 = (ab_t**0.5).to(d) * x - (bt**0.5).to(d) * m
    if clip > 0:
        x0 = x0.clamp(-clip, clip)
    out = (ab_p**0.5 * cb / bt).to(d) * x0 + (ca**0.5 * bp / bt).to(d) * x
    sig = (bp / bt * cb).clamp(min=1e-20) ** 0.5 if var in (0, 1) else cb**0.5
    mask = (t > 0).view(-1, *[1] * (x.dim() - 1))
    return out + (mask * sig).to(d) * z


@pytest.mark.parametrize("device,backend", list(_cases()))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("clip", [False, True])
def test_ddpm_step_matches_reference(device, backend, shape, dtype, prediction_type, variance_type, clip):
    x, m, z, _, t = _inputs(shape, dtype, device, seed=stable_seed(shape, dtype, prediction_type))
    kw = dict(prediction_type=prediction_type, variance_type=variance_type, clip_sample=clip)
    out, pred = ops.ddpm_step(x, m, t, SCHED, noise=z, return_pred_original=True, backend=backend, **kw)
    ref, ref_pred = ref64(x, m, t, noise=z, **kw)
    assert out.dtype == dtype and torch.isfinite(out).all()
    if dtype == torch.float32:
        p = {"epsilon": 0, "sample": 1, "v_prediction": 2}[prediction_type]
        assert forward_error_ratio(out, ref, x, m, z, t, pred=p) <= 1e-6
        assert forward_error_ratio(pred, ref_pred, x, m, z, t, pred=p, what="pred") <= 1e-6
    else:
        ac = SCHED.alphas_cumprod.to(device)
        nd = x.dim()
        ab_t = ac[t].view(-1, *[1] * (nd - 1))
        pt = t - 1
        ab_p = torch.where(pt >= 0, ac[pt.clamp(min=0)], torch.ones((), device=device))
        ab_p = ab_p.view(-1, *[1] * (nd - 1))
        eager = _eager(x, m, z, ab_t, ab_p, t, {"epsilon": 0, "sample": 1, "v_prediction": 2}[prediction_type],
                       0 if variance_type == "fixed_small" else 2, 1.0 if clip else 0.0)
        bound = half_bound(scaled_err(eager, ref), dtype)
        assert scaled_err(out, ref) <= bound


@pytest.mark.parametrize("device,backend", list(_cases()))
@pytest.mark.parametrize("variance_type", ["fixed_small_log", "learned", "learned_range"])
def test_ddpm_step_other_variances(device, backend, variance_type):
    x, m, z, pv, t = _inputs((3, 4, 5, 6), torch.float32, device, seed=7)
    if variance_type == "learned":
        pv = pv.abs() * 0.02 + 1e-4  # a variance, positive
    kw = dict(variance_type=variance_type)
    if variance_type.startswith("learned"):
        kw["predicted_variance"] = pv
    out = ops.ddpm_step(x, m, t, SCHED, noise=z, backend=backend, **kw)
    ref, _ = ref64(x, m, t, noise=z, pv=kw.get("predicted_variance"), variance_type=variance_type)
    assert forward_error_ratio(out, ref, x, m, z, t) <= 1e-6


def test_reference_matches_diffusers_step():
    diffusers = pytest.importorskip("diffusers")
    for var in ["fixed_small", "fixed_small_log", "fixed_large"]:
        for pred in ["epsilon", "sample", "v_prediction"]:
            sch = diffusers.DDPMScheduler(variance_type=var, prediction_type=pred, clip_sample=True)
            x = torch.randn(2, 3, 8, 8)
            m = torch.randn(2, 3, 8, 8)
            for t in [999, 500, 1, 0]:
                g1, g2 = torch.Generator().manual_seed(t), torch.Generator().manual_seed(t)
                want = sch.step(m, t, x, generator=g1).prev_sample
                got = ops.ddpm_step(x, m, t, SCHED, generator=g2, prediction_type=pred, variance_type=var,
                                    clip_sample=True, backend="cpu")
                truth = ops.ddpm_step(x.double(), m.double(), t, SCHED, generator=torch.Generator().manual_seed(t),
                                      prediction_type=pred, variance_type=var, clip_sample=True, backend="torch")
                # diffusers computes its tables and coefficients in fp32 with cancellation; we must be
                # no further from float64 truth than twice diffusers is, and close to diffusers itself.
                assert scaled_err(got, truth) <= 2 * scaled_err(want, truth) + 4e-6
                assert scaled_err(got, want) < 1e-3, (var, pred, t)


def test_algorithm2_form_agrees():
    """With epsilon prediction and no clipping the step is Ho et al.'s Algorithm 2, line 4."""
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    eps = torch.randn_like(x)
    z = torch.randn_like(x)
    t = torch.tensor([1, 10, 500, 999])
    b = SCHED.table("betas", dtype=torch.float64)[t].view(-1, 1, 1, 1)
    ab = SCHED.table("alphas_cumprod", dtype=torch.float64)[t].view(-1, 1, 1, 1)
    abp = SCHED.table("alphas_cumprod_prev", dtype=torch.float64)[t].view(-1, 1, 1, 1)
    sigma = ((1 - abp) / (1 - ab) * b).sqrt()
    alg2 = 1 / (1 - b).sqrt() * (x - b / (1 - ab).sqrt() * eps) + sigma * z
    got = ops.ddpm_step(x, eps, t, SCHED, noise=z, backend="torch")
    torch.testing.assert_close(got, alg2, rtol=1e-10, atol=1e-10)
    for backend in backends_for(torch.device("cpu"), "ddpm_step"):
        if backend == "torch":
            continue
        got32 = ops.ddpm_step(x.float(), eps.float(), t, SCHED, noise=z.float(), backend=backend)
        assert scaled_err(got32, alg2) < 2e-5  # fp32 tables: abar rounded to fp32 once


def test_respaced_prev_t():
    x, m, z, _, _ = _inputs((3, 2, 4, 4), torch.float32, torch.device("cpu"), 3)
    t = torch.tensor([999, 500, 20])
    prev_t = torch.tensor([979, 480, -1])
    for backend in backends_for(torch.device("cpu"), "ddpm_step"):
        out = ops.ddpm_step(x, m, t, SCHED, prev_t=prev_t, noise=z, backend=backend)
        ref, _ = ref64(x, m, t, prev_t=prev_t, noise=z)
        assert forward_error_ratio(out, ref, x, m, z, t, prev_t=prev_t) <= 1e-6, backend


@pytest.mark.parametrize("device,backend", list(_cases()))
def test_any_negative_prev_t_is_the_end_as_diffusers(device, backend):
    # diffusers reads every prev_t < 0 as "before the first step" (DDPMScheduler.step: alphas_cumprod[prev_t]
    # if prev_t >= 0 else one); with 50 of 1000 steps DDIM's t = 0 steps to prev_t = t - 20 = -20, and a
    # caller's own table may step from t > 0 to below 0.
    from diffusers import DDPMScheduler as DiffusersDDPM

    x, m, z, _, _ = _inputs((3, 2, 5, 4), torch.float32, device, 7)
    t = torch.tensor([0, 15, 40], device=device)
    prev_t = torch.tensor([-20, -3, -1000], device=device)
    out, x0 = ops.ddpm_step(x, m, t, SCHED, prev_t, noise=z, backend=backend, return_pred_original=True)
    # float64, written out with abar_prev = 1: beta = 1 - abar_t, mean = x0 (eq. 7 with abar_prev = 1),
    # sigma^2 = 0 (the posterior variance carries 1 - abar_prev) and no noise at t = 0.
    ab = SCHED.table("alphas_cumprod", dtype=torch.float64)[t.cpu()].view(-1, 1, 1, 1).to(device)
    x0_64 = (x.double() - (1 - ab).sqrt() * m.double()) / ab.sqrt()
    assert scaled_err(x0, x0_64) <= FP32_BOUND
    assert scaled_err(out, x0_64) <= FP32_BOUND
    for i in range(3):  # the same numbers as prev_t = -1, bit for bit, on each backend
        one = ops.ddpm_step(x[i:i + 1], m[i:i + 1], int(t[i]), SCHED, -1, noise=z[i:i + 1], backend=backend)
        assert torch.equal(out[i:i + 1], one), (backend, i)
    # diffusers' own last step of a 50-step schedule (its prev_t there is negative: abar_prev = 1)
    d = DiffusersDDPM(num_train_timesteps=1000, clip_sample=False)
    d.set_timesteps(50)
    assert int(d.timesteps[-1]) == 0 and int(d.previous_timestep(0)) < 0
    want = d.step(m.cpu()[:1], 0, x.cpu()[:1]).prev_sample
    got = ops.ddpm_step(x[:1], m[:1], 0, SCHED, -20, noise=z[:1], backend=backend)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)


def test_philox_streams_identical_across_backends():
    from fastddpm.triton_kernels.ddpm_step import philox_bits_triton  # noqa: F401  (interpreter or GPU)

    ref = reference.philox_bits(1000, 12345, 2**32 - 10)  # crosses the 32-bit counter word
    c = torch.empty(1000, 4, dtype=torch.int32)
    torch.ops.fastddpm.philox_bits_(c, 12345, 2**32 - 10)
    assert torch.equal(c.long() & 0xFFFFFFFF, ref)
    from _utils import interpreted

    if interpreted() or HAS_CUDA:
        tr = philox_bits_triton(1000, 12345, 2**32 - 10, "cuda" if HAS_CUDA else "cpu").cpu()
        assert torch.equal(tr.long() & 0xFFFFFFFF, ref)


@pytest.mark.parametrize("device,backend", list(_cases()))
def test_philox_noise_same_on_every_backend(device, backend):
    shape = (3, 3, 9, 7)
    ref = reference.philox_normal(shape, 42, 1000, device)  # float64 Box-Muller
    got = ops.philox_randn(shape, 42, 1000, device=device, backend=backend)
    assert rel_err(got, ref) < 1e-6
    # and it is what ddpm_step adds: step(noise="philox") == step(noise=that tensor)
    x, m, _, _, t = _inputs(shape, torch.float32, device, 5)
    a = ops.ddpm_step(x, m, t, SCHED, noise="philox", seed=42, offset=1000, backend=backend)
    b = ops.ddpm_step(x, m, t, SCHED, noise=got, backend=backend)
    assert scaled_err(a, b) < 1e-6


@pytest.mark.parametrize("device,backend", list(_cases()) + [(d, "torch") for d in devices_to_test()])
def test_tensor_offset_is_bitwise_the_int_offset(device, backend):
    # A 0-d int64 offset on the sample's device, read inside the kernel (what a CUDA graph replays), gives
    # bit for bit the numbers of the same int, including past the 32-bit counter word.
    x, m, _, pv, t = _inputs((3, 2, 7, 5), torch.float32, device, 11)
    for off in (0, 1000, 2**32 - 17, 2**40 + 3):
        for vt, kw in (("fixed_small", {}), ("learned_range", dict(predicted_variance=pv))):
            a = ops.ddpm_step(x, m, t, SCHED, noise="philox", seed=77, offset=off, variance_type=vt,
                              backend=backend, **kw)
            ot = torch.tensor(off, device=device)
            b = ops.ddpm_step(x, m, t, SCHED, noise="philox", seed=77, offset=ot, variance_type=vt,
                              backend=backend, **kw)
            assert torch.equal(a, b), (backend, off, vt)
            ot.add_(x.numel())  # the value at call time is read, not the one at the first call
            c = ops.ddpm_step(x, m, t, SCHED, noise="philox", seed=77, offset=ot, variance_type=vt,
                              backend=backend, **kw)
            want = ops.ddpm_step(x, m, t, SCHED, noise="philox", seed=77, offset=off + x.numel(),
                                 variance_type=vt, backend=backend, **kw)
            assert torch.equal(c, want) and not torch.equal(c, a), (backend, off, vt)


def test_offset_past_int64_is_named():
    """An int offset of 2**63 or more used to reach the schema as "Expected a value of type 'int' for argument
    'offset' but instead found type 'int'"."""
    x = torch.randn(2, 3)
    for off in (2**63, 2**64):
        with pytest.raises(ValueError, match=r"offset: expected an integer in \[0, 2\*\*63\)"):
            ops.philox_randn((8,), 7, off)
        with pytest.raises(ValueError, match=r"offset: expected an integer in \[0, 2\*\*63\)"):
            ops.ddpm_step(x, x, 5, NoiseSchedule(), noise="philox", seed=0, offset=off)


def test_tensor_offset_bad_input_opcheck_and_compile():
    x, m = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    bad = [
        (torch.tensor(5.0), TypeError, "offset: expected an int or a 0-d int64 tensor"),
        (torch.tensor([5]), TypeError, "offset: expected an int or a 0-d int64 tensor"),
        (torch.tensor(-1), ValueError, "offset: expected a non-negative"),
        (torch.tensor(5, device="meta"), ValueError, "offset: expected a tensor on cpu"),
        (-3, ValueError, r"offset: expected an integer in \[0, 2\*\*63\) or a 0-d int64 tensor, got -3"),
    ]
    for off, exc, match in bad:
        with pytest.raises(exc, match=match):
            ops.ddpm_step(x, m, 10, SCHED, noise="philox", seed=1, offset=off)
    t, pt = torch.tensor([5, 0]), torch.tensor([4, -1])
    op = torch.ops.fastddpm.ddpm_step.default
    with pytest.raises((ValueError, RuntimeError), match="offset_tensor: expected a non-negative"):
        op(x, m, t, pt, SCHED.alphas_cumprod, None, None, 1, 0, 2, 0, 0, 0.0, False, torch.tensor(-2))
    with pytest.raises((TypeError, RuntimeError), match="offset_tensor: expected a 0-d int64"):
        op(x, m, t, pt, SCHED.alphas_cumprod, None, None, 1, 0, 2, 0, 0, 0.0, False, torch.tensor([2]))
    # the kernel adds the int and the tensor: offset 3 + tensor 4 is offset 7
    a, _ = op(x, m, t, pt, SCHED.alphas_cumprod, None, None, 1, 3, 2, 0, 0, 0.0, False, torch.tensor(4))
    assert torch.equal(a, ops.ddpm_step(x, m, t, SCHED, pt, noise="philox", seed=1, offset=7, backend="cpu"))
    torch.library.opcheck(op, (x, m, t, pt, SCHED.alphas_cumprod, None, None, 1, 3, 2, 0, 0, 1.0, True,
                               torch.tensor(12)))
    torch.library.opcheck(op, (x, m, t, pt, SCHED.alphas_cumprod, None, None, 1, 3, 2, 0, 2, 1.0, True,
                               torch.tensor(12), True))  # diffusers_beta
    randn = torch.ops.fastddpm.ddpm_step_randn.default
    a, _ = randn(x, m, t, pt, SCHED.alphas_cumprod, torch.Generator().manual_seed(3), 0, 2, 0.0, False, True)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    b, _ = op(x, m, t, pt, SCHED.alphas_cumprod, z, None, 0, 0, 1, 0, 2, 0.0, False, None, True)
    assert torch.equal(a, b)  # ddpm_step_randn passes diffusers_beta on
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fx = torch.empty(2, 3, 4, 4)
        ft = torch.zeros(2, dtype=torch.long)
        out, _ = randn(fx, fx, ft, ft, torch.empty(1000), None, 0, 0, 0.0, False, True)
        assert out.shape == fx.shape

    def f(x, m, t, off):
        return ops.ddpm_step(x, m, t, SCHED, noise="philox", seed=1, offset=off, backend="cpu") * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    off = torch.tensor(40)
    torch.testing.assert_close(compiled(x, m, t, off), f(x, m, t, off), rtol=0, atol=0)
    off.fill_(41)  # the compiled graph reads the new value
    torch.testing.assert_close(compiled(x, m, t, off), f(x, m, t, 41), rtol=0, atol=0)


def test_ddpm_step_triton_launches_under_the_tensors_device(monkeypatch):
    # Triton launches on the current CUDA device: every launch of this file's kernels must happen inside
    # launch_device of the op's tensors (tests/test_launch.py records it; a cuda:1 run is its GPU check).
    from _utils import interpreted

    if not (interpreted() or HAS_CUDA):
        pytest.skip("triton runs neither on a GPU nor through its interpreter here")
    import fastddpm.triton_kernels.ddpm_step as mod
    from test_launch import _guarded_launches

    dev = torch.device("cuda" if HAS_CUDA else "cpu")
    state = _guarded_launches(monkeypatch, mod)
    x, m, z, _, t = _inputs((2, 3, 5, 4), torch.float32, dev, 2)
    out = ops.ddpm_step(x, m, t, SCHED, noise="philox", seed=3, offset=torch.tensor(9, device=dev), backend="triton")
    assert scaled_err(out, ops.ddpm_step(x, m, t, SCHED, noise="philox", seed=3, offset=9, backend="torch")) < 1e-5
    assert state["launches"] == 1 and state["devices"] == [dev]
    # the Philox helpers launch their kernels directly
    entered = []
    inside = []
    real = mod.launch_device

    @contextlib.contextmanager
    def recording(t):
        entered.append(t.device)
        inside.append(True)
        try:
            with real(t):
                yield
        finally:
            inside.pop()

    class Checked:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            assert inside, f"{self.kernel} launched outside launch_device"
            return self.kernel[grid]

    monkeypatch.setattr(mod, "launch_device", recording)
    monkeypatch.setattr(mod, "_philox_normal_kernel", Checked(mod._philox_normal_kernel))
    monkeypatch.setattr(mod, "_philox_bits_kernel", Checked(mod._philox_bits_kernel))
    mod.philox_normal_triton((5, 7), 1, 2, dev)
    mod.philox_bits_triton(10, 1, 2, dev)
    assert entered == [dev, dev]


@pytest.mark.parametrize("device,backend", list(_cases()) + [("cpu", "torch")])
def test_diffusers_beta_returns_diffusers_numbers(device, backend):
    # diffusers evaluates beta_t = 1 - abar_t / abar_prev in fp32; where beta_t ~ 1e-4 that cancellation is off
    # by up to ~5e-4 (relative), and the exact form (abar_prev - abar_t) / abar_prev gives other numbers (the
    # drop-in's full-loop sum 387.9676 against diffusers' 387.9466). diffusers_beta=True evaluates diffusers'
    # form, for the drop-in; the default stays the more accurate one (checked against float64 here too), on the
    # torch backend as well (it took diffusers' form always: 5.5e-5 off float64 at t = 1 in float32).
    from diffusers import DDPMScheduler as DiffusersDDPM

    from fastddpm.samplers._common import DiffusersTables

    d = DiffusersDDPM(num_train_timesteps=1000, clip_sample=False)
    tables = DiffusersTables(d.betas)
    x, m, z, _, _ = _inputs((4, 3, 6, 5), torch.float32, device, 21)
    for t in (1, 2, 3, 7):
        ac = d.alphas_cumprod
        ab_t, ab_p = ac[t], ac[t - 1]
        cur_beta = 1 - ab_t / ab_p  # diffusers' own fp32 expressions, as in DDPMScheduler.step
        c0 = ab_p**0.5 * cur_beta / (1 - ab_t)
        c1 = (ab_t / ab_p) ** 0.5 * (1 - ab_p) / (1 - ab_t)
        x0 = (x.cpu() - (1 - ab_t) ** 0.5 * m.cpu()) / ab_t**0.5
        sd = ((1 - ab_p) / (1 - ab_t) * cur_beta).clamp(min=1e-20) ** 0.5
        want = c0 * x0 + c1 * x.cpu() + sd * z.cpu()
        got = ops.ddpm_step(x, m, t, tables, noise=z, backend=backend, diffusers_beta=True).cpu()
        exact = ops.ddpm_step(x, m, t, tables, noise=z, backend=backend).cpu()
        e_d, e_x = (got - want).abs().max().item(), (exact - want).abs().max().item()
        # a few ulp of |x_prev| ~ 2-4 (the kernels fuse multiply-adds, diffusers rounds each product)
        assert e_d <= 1e-6 and e_x > 10 * max(e_d, 1e-8), (backend, t, e_d, e_x)
        ref64, _ = reference.ddpm_step(x.double().cpu(), m.double().cpu(), torch.full((4,), t),
                                       torch.full((4,), t - 1), tables.alphas_cumprod.double(), z.double().cpu(),
                                       None, 0, 0, 1, 0, 0, 0.0, False)
        assert (exact - ref64).abs().max() < (got - ref64).abs().max(), (backend, t)  # the default is closer
        if t != 1:
            continue
        # DDIM's sigma carries the same difference (largest at t = 1, where beta_t is smallest)
        a = ops.ddim_step(x, m, t, tables, t - 1, eta=1.0, noise=z, backend=backend, diffusers_beta=True).cpu()
        b = ops.ddim_step(x, m, t, tables, t - 1, eta=1.0, noise=z, backend=backend).cpu()
        var = (1 - ab_p) / (1 - ab_t) * (1 - ab_t / ab_p)
        want_ddim = ab_p**0.5 * x0 + (1 - ab_p - var) ** 0.5 * m.cpu() + var**0.5 * z.cpu()
        assert (a - want_ddim).abs().mean() < (b - want_ddim).abs().mean(), (backend, t)


def test_philox_normal_statistics():
    z = ops.philox_randn((1 << 18,), seed=9, backend="cpu").double()
    assert abs(z.mean().item()) < 5 / 512 and abs(z.var().item() - 1) < 5 * (2 / (1 << 18)) ** 0.5


def test_generator_noise_matches_torch_randn():
    x, m = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    a = ops.ddpm_step(x, m, 500, SCHED, generator=torch.Generator().manual_seed(1), backend="cpu")
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    b = ops.ddpm_step(x, m, 500, SCHED, noise=z, backend="cpu")
    assert torch.equal(a, b)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "shape, dtype, layout",
    [
        ((16, 3, 32, 32), torch.float32, "nchw"),  # the overlapped path (draw on one thread, mean on the other)
        ((2, 3, 5, 7), torch.float32, "nchw"),  # below the overlap threshold
        ((4, 8, 16, 16), torch.float32, "channels_last"),  # non-contiguous: drawn first, then the one-pass step
        ((4, 8, 16, 16), torch.float16, "nchw"),
    ],
)
def test_ddpm_step_randn_is_torch_randn(threads, shape, dtype, layout):
    # ddpm_step_randn draws z with torch's own normal_: the same numbers as the noise-tensor step with
    # z = torch.randn(shape, generator=g, dtype=dtype), bit for bit, and the generator ends in the same state.
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, m = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
        if layout == "channels_last":
            x, m = x.to(memory_format=torch.channels_last), m.to(memory_format=torch.channels_last)
        t = torch.randint(1, 1000, (shape[0],))
        t[0] = 0  # no noise added to sample 0, although z is drawn for the whole tensor (as diffusers)
        pt = t - 1
        ac = SCHED.tables("cpu")["alphas_cumprod"]
        for pred_type, var_type, clip in [(0, 0, 1.0), (1, 2, 0.0), (2, 0, 2.0), (0, 1, 0.0)]:
            g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
            a, ap = torch.ops.fastddpm.ddpm_step_randn(x, m, t, pt, ac, g1, pred_type, var_type, clip, True)
            z = torch.randn(shape, generator=g2, dtype=dtype)
            b, bp = torch.ops.fastddpm.ddpm_step(x, m, t, pt, ac, z, None, 0, 0, 1, pred_type, var_type, clip, True)
            assert torch.equal(a, b) and torch.equal(ap, bp), (pred_type, var_type)
            assert torch.equal(g1.get_state(), g2.get_state())
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            assert a.is_contiguous(memory_format=fmt)
        # the public function takes this path for generator noise on the cpu backend
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        got = ops.ddpm_step(x, m, t, SCHED, prev_t=pt, generator=g1, clip_sample=True, backend="cpu")
        want = ops.ddpm_step(x, m, t, SCHED, prev_t=pt, noise=torch.randn(shape, generator=g2, dtype=dtype),
                             clip_sample=True, backend="cpu")
        assert torch.equal(got, want)
    finally:
        torch.set_num_threads(prev_threads)


def test_ddpm_step_randn_bad_input_and_fake():
    x = torch.randn(2, 3, 4, 4)
    t, pt = torch.tensor([5, 3]), torch.tensor([4, 2])
    ac = SCHED.tables("cpu")["alphas_cumprod"]
    with pytest.raises(RuntimeError, match="variance_type"):
        torch.ops.fastddpm.ddpm_step_randn(x, x, t, pt, ac, None, 0, 4, 0.0, True)
    big = torch.randn(8, 3, 32, 32)  # large enough for the overlapped path, whose checks are its own
    with pytest.raises(RuntimeError, match="prev_t"):
        torch.ops.fastddpm.ddpm_step_randn(big, big, t.repeat(4), t.repeat(4), ac, None, 0, 0, 0.0, True)
    with pytest.raises(RuntimeError, match="model_output: expected shape"):
        torch.ops.fastddpm.ddpm_step_randn(big, big[:4], t.repeat(4), pt.repeat(4), ac, None, 0, 0, 0.0, True)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        out, pred = torch.ops.fastddpm.ddpm_step_randn(fx, fx, mode.from_tensor(t), mode.from_tensor(pt),
                                                       mode.from_tensor(ac), None, 0, 0, 1.0, False)
        assert out.shape == x.shape and pred.numel() == 0


@pytest.mark.parametrize("backend", [b for b in backends_for(torch.device("cpu"), "ddpm_step") if b != "torch"])
@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
@pytest.mark.parametrize("noise", ["tensor", "philox"])
def test_ddpm_step_strides(backend, layout, noise):
    x, m, z, _, t = _inputs((3, 4, 6, 5), torch.float32, torch.device("cpu"), 11)
    conv = (lambda u: u.to(memory_format=torch.channels_last)) if layout == "channels_last" else (
        lambda u: u.transpose(2, 3).contiguous().transpose(2, 3))
    xs, ms, zs = conv(x), conv(m), conv(z)
    kw = dict(noise=zs) if noise == "tensor" else dict(noise="philox", seed=3)
    out = ops.ddpm_step(xs, ms, t, SCHED, backend=backend, **kw)
    if noise == "tensor":
        ref, _ = ref64(x, m, t, noise=z)
    else:
        z = reference.philox_normal(x.shape, 3, 0)
        ref, _ = ref64(x, m, t, noise=z)
    assert forward_error_ratio(out, ref, x, m, z, t) <= 1e-6
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


def test_int_timesteps_are_cached_and_left_unchanged():
    from fastddpm.ops import _checks

    a = _checks.int_timesteps(7, 3, torch.device("cpu"))
    assert a is _checks.int_timesteps(7, 3, torch.device("cpu"))
    x, m, z, _, _ = _inputs((3, 2, 4, 4), torch.float32, torch.device("cpu"), 4)
    for backend in backends_for(torch.device("cpu"), "ddpm_step"):
        got = ops.ddpm_step(x, m, 7, SCHED, noise=z, backend=backend)
        want = ops.ddpm_step(x, m, torch.full((3,), 7), SCHED, prev_t=torch.full((3,), 6), noise=z, backend=backend)
        assert torch.equal(got, want), backend
        assert torch.equal(a, torch.full((3,), 7)), backend  # no backend writes into t
        tt, pt = _checks._INT_STEPS[(7, 6, 3, torch.device("cpu"))]  # what the int call stepped with
        assert torch.equal(tt, torch.full((3,), 7)) and torch.equal(pt, torch.full((3,), 6)), backend


def test_ddpm_step_opcheck_and_compile():
    x, m, z = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t, pt = torch.tensor([5, 0]), torch.tensor([4, -1])
    args = (x, m, t, pt, SCHED.alphas_cumprod, z, None, 0, 0, 1, 0, 0, 1.0, True)
    torch.library.opcheck(torch.ops.fastddpm.ddpm_step.default, args)

    def f(x, m, t):
        return ops.ddpm_step(x, m, t, SCHED, noise="philox", seed=1, backend="cpu") * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, m, t), f(x, m, t))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(t=1000), ValueError, "t: expected a timestep in"),
        (dict(t=torch.tensor([3.0, 1.0])), TypeError, "t: expected an integer"),
        (dict(prev_t=torch.tensor([5, 5]), t=torch.tensor([5, 6])), ValueError, "prev_t"),
        (dict(prev_t=10, t=10), ValueError, "prev_t: expected prev_t < t"),
        (dict(prev_t=1000, t=10), ValueError, "prev_t: expected a timestep in"),
        (dict(prev_t=torch.tensor([-5, 1000]), t=10), ValueError, "prev_t: expected timesteps in"),
        (dict(model_output=torch.randn(2, 3, 4)), ValueError, "model_output: expected shape"),
        (dict(noise=torch.randn(1, 3, 4, 4)), ValueError, "noise: expected shape"),
        (dict(noise="gaussian"), ValueError, "noise"),
        (dict(noise="philox"), ValueError, "seed"),
        # the Philox stream with other noise would be ignored: a seed given to noise=None does not seed it
        (dict(seed=3), ValueError, "seed: only used with noise='philox', got seed=3 with noise=None"),
        (dict(noise="none", seed=3), ValueError, "seed: only used with noise='philox'"),
        (dict(noise=torch.randn(2, 3, 4, 4), offset=5), ValueError, "offset: only used with noise='philox'"),
        (dict(offset=torch.tensor(5)), ValueError, "offset: only used with noise='philox'"),
        (dict(prediction_type="eps"), ValueError, "prediction_type"),
        (dict(variance_type="fixed_large_log"), ValueError, "variance_type"),
        (dict(variance_type="learned"), ValueError, "predicted_variance"),
        (dict(clip_sample=True, clip_sample_range=0.0), ValueError, "clip_sample_range"),
    ],
)
def test_ddpm_step_bad_input(kwargs, exc, match):
    args = dict(sample=torch.randn(2, 3, 4, 4), model_output=torch.randn(2, 3, 4, 4), t=10, schedule=SCHED)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        ops.ddpm_step(**args)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_steps_on_the_second_device(backend):
    # Tensors on cuda:1 while cuda:0 is current: the kernels must run on the tensors' device (a Triton launch on
    # the current device would get device-1 pointers), with the Philox offset read from a cuda:1 tensor.
    dev = torch.device("cuda", 1)
    torch.cuda.set_device(0)
    x, m, _, _, t = _inputs((3, 2, 8, 8), torch.float32, dev, 5)
    off = torch.tensor(123, device=dev)
    a = ops.ddpm_step(x, m, t, SCHED, noise="philox", seed=2, offset=off, backend=backend)
    b = ops.ddpm_step(x.cpu(), m.cpu(), t.cpu(), SCHED, noise="philox", seed=2, offset=123, backend="cpu")
    assert a.device == dev and scaled_err(a.cpu(), b) < 1e-5
    c = ops.ddim_step(x, m, t, SCHED, eta=0.5, noise="philox", seed=2, offset=off, backend=backend)
    d = ops.ddim_step(x.cpu(), m.cpu(), t.cpu(), SCHED, eta=0.5, noise="philox", seed=2, offset=123, backend="cpu")
    assert c.device == dev and (c.cpu() - d).abs().max().item() < 1e-5
    assert torch.cuda.current_device() == 0


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ddpm_step_cuda_runtime(backend, dtype):
    x, m, z, _, t = _inputs((16, 3, 32, 32), dtype, torch.device("cuda"), 1)
    out = ops.ddpm_step(x, m, t, SCHED, noise=z, backend=backend)
    ref = ops.ddpm_step(x.double(), m.double(), t, SCHED, noise=z.double(), backend="torch")
    bound = FP32_BOUND if dtype == torch.float32 else 1e-2
    assert scaled_err(out, ref) <= bound
    a = ops.ddpm_step(x, m, t, SCHED, noise="philox", seed=5, backend=backend).cpu()
    b = ops.ddpm_step(x.cpu(), m.cpu(), t.cpu(), SCHED, noise="philox", seed=5, backend="cpu")
    assert scaled_err(a, b) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_backends_tested():
    # The tests here run every backend backends_for() names on each device; a backend that stopped
    # resolving would drop out of them silently.
    assert_backends_tested("ddpm_step")
