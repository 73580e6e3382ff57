"""ddim_step on every backend against the float64 reference (diffusers' DDIM formulas)."""

import pytest
import torch
from _utils import HAS_CUDA, assert_backends_tested, backends_for, devices_to_test, stable_seed

import fastddpm
from fastddpm import NoiseSchedule, ops
from fastddpm.ops import reference

SCHED = NoiseSchedule()
SHAPES = [(1, 1, 1, 3), (3, 5, 7, 11), (2, 3, 16, 16), (5, 13)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def forward_scale(x, m, t, prev_t, eta, pred_type, final=1.0):
    """The forward-error scale of the DDIM step: the update evaluated in float64 on absolute values
    (sum of |term|s). An fp32 evaluation of a short expression has |error| <= c u K, u = 2^-24."""
    ac = SCHED.table("alphas_cumprod", x.device, torch.float64)
    sh = (-1, *[1] * (x.dim() - 1))
    ab = ac[t].view(sh)
    ap = torch.where(prev_t >= 0, ac[prev_t.clamp(min=0)], torch.tensor(final, dtype=torch.float64)).view(sh)
    xa, ma = x.double().abs(), m.double().abs()
    if pred_type == "epsilon":
        k_x0, k_eps = (xa + (1 - ab).sqrt() * ma) / ab.sqrt(), ma
    elif pred_type == "sample":
        k_x0, k_eps = ma, (xa + ab.sqrt() * ma) / (1 - ab).sqrt()
    else:
        k_x0, k_eps = ab.sqrt() * xa + (1 - ab).sqrt() * ma, ab.sqrt() * ma + (1 - ab).sqrt() * xa
    return k_x0, ap.sqrt() * k_x0 + (1 - ap).sqrt() * k_eps


def err_ratio(actual, ref, k):
    return ((actual.double() - ref.double()).abs() / (k + ref.double().abs()).clamp(min=1e-30)).max().item()


DEVICES = devices_to_test()


def test_backends_tested():
    # Each test below runs every backend backends_for() names on each device; a backend that stopped
    # resolving would drop out of them silently.
    assert_backends_tested("ddim_step")


@pytest.mark.parametrize("dev", DEVICES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pred_type", ["epsilon", "sample", "v_prediction"])
def test_ddim_step_matches_reference(shape, dtype, pred_type, dev):
    B = shape[0]
    g = torch.Generator().manual_seed(stable_seed(shape, dtype, pred_type))
    x = torch.randn(shape, generator=g).to(dev, dtype)
    m = torch.randn(shape, generator=g).to(dev, dtype)
    z = torch.randn(shape, generator=g).to(dev, dtype)
    t = torch.randint(1, 1000, (B,), generator=g)
    t[0] = 999
    prev_t = (t - torch.randint(1, 60, (B,), generator=g)).clamp(min=-1)
    prev_t[-1] = -1
    t, prev_t = t.to(dev), prev_t.to(dev)
    # final_alpha_cumprod = abar_0, as DDIMScheduler(set_alpha_to_one=False) passes it (a float32 value)
    f32 = float(SCHED.alphas_cumprod[0])
    for eta, clip, uc, final in [(0.0, False, False, 1.0), (1.0, True, True, 1.0), (0.4, True, False, f32)]:
        kw = dict(eta=eta, clip_sample=clip, prediction_type=pred_type, use_clipped_model_output=uc,
                  final_alpha_cumprod=final, return_pred_original=True)
        ref, ref_x0 = ops.ddim_step(x.double(), m.double(), t, SCHED, prev_t, noise=z.double(),
                                    backend="torch", **kw)
        eager, eager_x0 = ops.ddim_step(x, m, t, SCHED, prev_t, noise=z, backend="torch", **kw)
        k_x0, k = forward_scale(x, m, t, prev_t, eta, pred_type, final)
        if eta > 0:
            k = k + z.double().abs()
        for b in backends_for(dev, "ddim_step"):
            out, x0 = ops.ddim_step(x, m, t, SCHED, prev_t, noise=z, backend=b, **kw)
            assert out.dtype == dtype and out.shape == x.shape and torch.isfinite(out).all()
            if dtype == torch.float32:
                # c u K with c = 16 (DESIGN.md elementwise: a few ulp of the operands)
                assert err_ratio(out, ref, k) < 1e-6, (b, eta)
                assert err_ratio(x0, ref_x0, k_x0) < 1e-6, (b, eta)
            else:  # twice the error of torch's eager computation in that dtype, plus one ulp
                eps = torch.finfo(dtype).eps
                assert err_ratio(out, ref, k) <= 2 * err_ratio(eager, ref, k) + eps, (b, eta)
                assert err_ratio(x0, ref_x0, k_x0) <= 2 * err_ratio(eager_x0, ref_x0, k_x0) + eps, (b, eta)


@pytest.mark.parametrize("dev", DEVICES, ids=str)
@pytest.mark.parametrize("backend", ["cpu", "cuda", "triton", "torch"])
def test_ddim_step_philox_same_on_every_backend(backend, dev):
    if backend not in backends_for(dev, "ddim_step"):
        pytest.skip(f"{backend} does not serve {dev} here")
    shape = (2, 3, 9, 5)
    x, m = torch.randn(shape, device=dev), torch.randn(shape, device=dev)
    t, pt = torch.tensor([700, 30], device=dev), torch.tensor([650, -1], device=dev)
    a = ops.ddim_step(x, m, t, SCHED, pt, eta=0.8, noise="philox", seed=11, offset=77, backend=backend)
    # float64 Box-Muller on the kernels' uniforms (a counter-based stream: the same on every device)
    z = reference.philox_normal(shape, 11, 77).to(dev)
    ref = ops.ddim_step(x.double(), m.double(), t, SCHED, pt, eta=0.8, noise=z, backend="torch")
    assert (a.double() - ref).abs().max().item() < 1e-5
    if backend != "torch":
        assert not torch.equal(a, ops.ddim_step(x, m, t, SCHED, pt, eta=0.8, noise="philox", seed=12,
                                                offset=77, backend=backend))


@pytest.mark.parametrize("dev", DEVICES, ids=str)
def test_ddim_step_layouts_and_noise_modes(dev):
    x = torch.randn(2, 4, 6, 5, device=dev).to(memory_format=torch.channels_last)
    m = torch.randn(2, 4, 6, 5, device=dev).to(memory_format=torch.channels_last)
    z = torch.randn(2, 4, 6, 5, device=dev)
    t = torch.tensor([400, 3], device=dev)
    for b in backends_for(dev, "ddim_step"):
        out = ops.ddim_step(x, m, t, SCHED, eta=0.5, noise=z, backend=b)
        ref = ops.ddim_step(x.contiguous(), m.contiguous(), t, SCHED, eta=0.5, noise=z, backend="torch")
        assert (out - ref).abs().max().item() < 1e-5
        assert out.is_contiguous(memory_format=torch.channels_last)
        # eta = 0 ignores the noise; noise="none" gives the deterministic part
        a = ops.ddim_step(x, m, t, SCHED, eta=0.0, noise=z, backend=b)
        c = ops.ddim_step(x, m, t, SCHED, eta=0.0, noise="none", backend=b)
        assert torch.equal(a, c)
    # noise=None with eta = 0 draws nothing from the generator (as diffusers)
    g = torch.Generator(device=dev).manual_seed(0)
    ops.ddim_step(x, m, t, SCHED, eta=0.0, generator=g)
    assert torch.equal(g.get_state(), torch.Generator(device=dev).manual_seed(0).get_state())


@pytest.mark.parametrize("dev", DEVICES, ids=str)
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_ddim_any_negative_prev_t_is_the_final_alpha_as_diffusers(dev, set_alpha_to_one):
    # diffusers' DDIM reads every prev_t < 0 as the final alpha (1, or abar_0 with set_alpha_to_one=False):
    # with 50 of 1000 steps the last step goes from t = 0 to prev_t = -20.
    from diffusers import DDIMScheduler as DiffusersDDIM

    d = DiffusersDDIM(num_train_timesteps=1000, set_alpha_to_one=set_alpha_to_one, clip_sample=False)
    d.set_timesteps(50)
    assert int(d.timesteps[-1]) == 0
    final = float(d.final_alpha_cumprod)
    g = torch.Generator().manual_seed(31 + set_alpha_to_one)
    x, m, z = (torch.randn(3, 2, 5, 4, generator=g) for _ in range(3))
    t, pt = torch.tensor([0, 15, 40]), torch.tensor([-20, -3, -1000])
    kw = dict(eta=0.6, final_alpha_cumprod=final)
    ref = ops.ddim_step(x.double(), m.double(), t, SCHED, pt, noise=z.double(), backend="torch", **kw)
    # float64 eq. 12 written out at abar_prev = final (on the float32 table the kernels read; near t = 0 its
    # rounding alone moves 1 - abar_t by 3e-4 relative)
    ab = SCHED.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    x0 = (x.double() - (1 - ab).sqrt() * m.double()) / ab.sqrt()
    std = 0.6 * ((1 - final) / (1 - ab) * (1 - ab / final)).clamp(min=0).sqrt()  # 0 at t = 0 (see reference)
    want64 = final**0.5 * x0 + (1 - final - std**2).sqrt() * m.double() + std * z.double()
    ab64 = SCHED.table("alphas_cumprod", dtype=torch.float64)[t].view(-1, 1, 1, 1)
    x0_64 = (x.double() - (1 - ab64).sqrt() * m.double()) / ab64.sqrt()
    std64 = 0.6 * ((1 - final) / (1 - ab64) * (1 - ab64 / final)).clamp(min=0).sqrt()
    ref64 = final**0.5 * x0_64 + (1 - final - std64**2).sqrt() * m.double() + std64 * z.double()
    torch.testing.assert_close(ref, ref64, rtol=1e-12, atol=1e-12)  # the reference on the float64 table
    x, m, z, t, pt = (u.to(dev) for u in (x, m, z, t, pt))
    want = d.step(m.cpu()[:1], 0, x.cpu()[:1], eta=0.6, variance_noise=z.cpu()[:1]).prev_sample
    for b in backends_for(dev, "ddim_step"):
        out = ops.ddim_step(x, m, t, SCHED, pt, noise=z, backend=b, **kw)
        k = forward_scale(x, m, t, pt, 0.6, "epsilon", final)[1] + z.double().abs()
        assert err_ratio(out, want64.to(dev), k) < 1e-6, b
        for i in range(3):  # bit for bit the prev_t = -1 result on each backend
            one = ops.ddim_step(x[i:i + 1], m[i:i + 1], int(t[i]), SCHED, -1, noise=z[i:i + 1], backend=b, **kw)
            assert torch.equal(out[i:i + 1], one), (b, i)
        got = ops.ddim_step(x[:1], m[:1], 0, SCHED, -20, noise=z[:1], backend=b, **kw)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)


def ddim_eq12_clipped_eps(x, m, ab_t, ab_prev, eta, z, pred_type, clip):
    """Song et al. 2021 eq. 12 in float64 with consistent clipping, written from the paper: x0 from the
    model's output, clipped to [-clip, clip]; eps recomputed from the clipped x0 so that x_t =
    sqrt(abar_t) x0 + sqrt(1 - abar_t) eps still holds; then
    x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z."""
    x, m = x.double(), m.double()
    a, s = ab_t.sqrt(), (1 - ab_t).sqrt()
    x0 = {"epsilon": (x - s * m) / a, "sample": m, "v_prediction": a * x - s * m}[pred_type]
    x0 = x0.clamp(-clip, clip)
    eps = (x - a * x0) / s
    sigma = eta * ((1 - ab_prev) / (1 - ab_t)).sqrt() * (1 - ab_t / ab_prev).clamp(min=0).sqrt()
    return ab_prev.sqrt() * x0 + (1 - ab_prev - sigma**2).sqrt() * eps + sigma * z.double(), x0, (a, s)


@pytest.mark.parametrize("dev", DEVICES, ids=str)
@pytest.mark.parametrize("pred_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_consistent_clip_matches_float64_eq12(dev, pred_type, eta):
    # use_clipped_model_output=True (issue 17, fastddpm.sample's default): the direction to x_t uses the
    # eps of the clipped x0, on every backend, against the float64 eq. 12 above.
    B = 6
    g = torch.Generator().manual_seed(stable_seed(pred_type, eta))
    x = torch.randn(B, 3, 7, 5, generator=g) * 1.5
    m = torch.randn(B, 3, 7, 5, generator=g) * 1.5
    z = torch.randn(B, 3, 7, 5, generator=g)
    t = torch.tensor([999, 700, 300, 60, 5, 1])
    pt = torch.tensor([950, 640, 250, 10, -1, -20])
    f32 = float(SCHED.alphas_cumprod[0])
    # the float32 table the kernels read, in float64: near t = 0, 1 - abar_t is 1e-4, and the table's
    # rounding (3e-8) alone moves it by 3e-4 relative; this test is about the kernels' arithmetic
    ac = SCHED.alphas_cumprod.double()
    ab_t = ac[t].view(-1, 1, 1, 1)
    ab_prev = torch.where(pt >= 0, ac[pt.clamp(min=0)], torch.tensor(f32, dtype=torch.float64)).view(-1, 1, 1, 1)
    want, want_x0, (a, s) = ddim_eq12_clipped_eps(x, m, ab_t, ab_prev, eta, z, pred_type, 1.0)
    raw_x0 = {"epsilon": (x.double() - s * m.double()) / a, "sample": m.double(),
              "v_prediction": a * x.double() - s * m.double()}[pred_type]
    assert (raw_x0.abs() > 1).double().mean() > 0.1  # the clip is active on many elements
    # fp32 forward-error scale of the kernel's expression: K = sqrt(abar_prev) K_x0 + c_eps K_eps + sigma |z|,
    # K_x0 the scale of x0's own evaluation (before the clip) and K_eps = (|x| + sqrt(abar_t) K_x0) /
    # sqrt(1 - abar_t): eps = (x - sqrt(abar_t) x0) / sqrt(1 - abar_t) cancels where x0 is not clipped
    k_x0 = forward_scale(x, m, t, pt, eta, pred_type, f32)[0]
    k_eps = (x.double().abs() + a * k_x0) / s
    k = ab_prev.sqrt() * k_x0 + (1 - ab_prev).sqrt() * k_eps + z.double().abs()
    # the torch backend is the float64 reference: on float64 inputs (and table) against eq. 12 on that table
    ac64 = SCHED.table("alphas_cumprod", dtype=torch.float64)
    ap64 = torch.where(pt >= 0, ac64[pt.clamp(min=0)], torch.tensor(f32, dtype=torch.float64)).view(-1, 1, 1, 1)
    want64 = ddim_eq12_clipped_eps(x, m, ac64[t].view(-1, 1, 1, 1), ap64, eta, z, pred_type, 1.0)[0]
    ref = ops.ddim_step(x.double(), m.double(), t, SCHED, pt, eta=eta, noise=z.double(), prediction_type=pred_type,
                        clip_sample=True, final_alpha_cumprod=f32, use_clipped_model_output=True, backend="torch")
    torch.testing.assert_close(ref, want64, rtol=1e-10, atol=1e-10)
    x, m, z, t, pt = (u.to(dev) for u in (x, m, z, t, pt))
    kw = dict(eta=eta, noise=z, prediction_type=pred_type, clip_sample=True, final_alpha_cumprod=f32,
              return_pred_original=True)
    kernels = [b for b in backends_for(dev, "ddim_step") if b != "torch"]
    assert kernels
    for b in kernels:
        out, x0 = ops.ddim_step(x, m, t, SCHED, pt, use_clipped_model_output=True, backend=b, **kw)
        assert err_ratio(out.cpu(), want, k) < 1e-6, (b, err_ratio(out.cpu(), want, k))
        assert torch.equal(x0.cpu().double(), want_x0.float().double()) or err_ratio(x0.cpu(), want_x0, k_x0) < 1e-6
        # and the model's eps with the clipped x0 (diffusers' default) is a different step: the check can fail
        other, _ = ops.ddim_step(x, m, t, SCHED, pt, use_clipped_model_output=False, backend=b, **kw)
        assert err_ratio(other.cpu(), want, k) > 1e-3, b


@pytest.mark.parametrize("dev", DEVICES, ids=str)
def test_ddim_tensor_offset_is_bitwise_the_int_offset(dev):
    # A 0-d int64 offset on the sample's device is read inside the kernel (what a CUDA graph replays) and
    # gives bit for bit the numbers of the same int, on every backend.
    x, m = torch.randn(3, 2, 7, 5, device=dev), torch.randn(3, 2, 7, 5, device=dev)
    t, pt = torch.tensor([900, 400, 7], device=dev), torch.tensor([880, 380, -13], device=dev)
    for b in backends_for(dev, "ddim_step"):
        for off in (0, 555, 2**32 - 9, 2**41 + 1):
            a = ops.ddim_step(x, m, t, SCHED, pt, eta=0.9, noise="philox", seed=4, offset=off, backend=b)
            ot = torch.tensor(off, device=dev)
            assert torch.equal(a, ops.ddim_step(x, m, t, SCHED, pt, eta=0.9, noise="philox", seed=4, offset=ot,
                                                backend=b)), (b, off)
            ot.add_(1)
            c = ops.ddim_step(x, m, t, SCHED, pt, eta=0.9, noise="philox", seed=4, offset=ot, backend=b)
            assert torch.equal(c, ops.ddim_step(x, m, t, SCHED, pt, eta=0.9, noise="philox", seed=4,
                                                offset=off + 1, backend=b)) and not torch.equal(a, c), (b, off)
    with pytest.raises(TypeError, match="offset"):
        ops.ddim_step(x, m, t, SCHED, pt, eta=0.9, noise="philox", seed=4, offset=torch.tensor([1], device=dev))


def test_ddim_step_opcheck_with_tensor_offset():
    x, m = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t, pt = torch.tensor([5, 3]), torch.tensor([4, -7])
    op = torch.ops.fastddpm.ddim_step.default
    torch.library.opcheck(op, (x, m, t, pt, SCHED.alphas_cumprod, 1.0, None, 1, 3, 2, 0, 0.5, 1.0, True, True,
                               torch.tensor(12)))
    a, _ = op(x, m, t, pt, SCHED.alphas_cumprod, 1.0, None, 1, 3, 2, 0, 0.5, 0.0, False, False, torch.tensor(4))
    assert torch.equal(a, ops.ddim_step(x, m, t, SCHED, pt, eta=0.5, noise="philox", seed=1, offset=7,
                                        backend="cpu"))

    def f(x, m, off):
        return ops.ddim_step(x, m, t, SCHED, pt, eta=0.5, noise="philox", seed=1, offset=off, backend="cpu") + 1

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    off = torch.tensor(30)
    assert torch.equal(compiled(x, m, off), f(x, m, off))
    off.fill_(31)
    assert torch.equal(compiled(x, m, off), f(x, m, torch.tensor(31)))


def test_ddim_step_triton_launches_under_the_tensors_device(monkeypatch):
    from _utils import interpreted

    if not (interpreted() or HAS_CUDA):
        pytest.skip("triton runs neither on a GPU nor through its interpreter here")
    import fastddpm.triton_kernels.ddim_step as mod
    from test_launch import _guarded_launches

    dev = torch.device("cuda" if HAS_CUDA else "cpu")
    state = _guarded_launches(monkeypatch, mod)
    x, m = torch.randn(2, 3, 5, 4, device=dev), torch.randn(2, 3, 5, 4, device=dev)
    t = torch.tensor([500, 2], device=dev)
    out = ops.ddim_step(x, m, t, SCHED, eta=0.3, noise="philox", seed=3, offset=torch.tensor(9, device=dev),
                        backend="triton")
    ref = ops.ddim_step(x, m, t, SCHED, eta=0.3, noise="philox", seed=3, offset=9, backend="torch")
    assert (out - ref).abs().max().item() < 1e-5
    assert state["launches"] == 1 and state["devices"] == [dev]


def test_ddim_step_fake_tensor():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 3, 4, 4)
        out, pred = torch.ops.fastddpm.ddim_step(x, x, torch.zeros(2, dtype=torch.long),
                                                 torch.zeros(2, dtype=torch.long), torch.empty(1000), 1.0, None,
                                                 0, 0, 0, 0, 0.0, 0.0, False, True)
        assert out.shape == x.shape and pred.shape == x.shape
        out, pred = torch.ops.fastddpm.ddim_step(x, x, torch.zeros(2, dtype=torch.long),
                                                 torch.zeros(2, dtype=torch.long), torch.empty(1000), 1.0, None,
                                                 0, 0, 2, 0, 1.0, 0.0, False, False, torch.zeros((), dtype=torch.long))
        assert out.shape == x.shape and pred.shape == (0,)


def test_ddim_step_bad_input():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="model_output"):
        ops.ddim_step(x, torch.randn(2, 3, 4, 5), 10, SCHED)
    with pytest.raises(ValueError, match="eta"):
        ops.ddim_step(x, x, 10, SCHED, eta=-0.1)
    for eta in (float("inf"), float("nan")):  # an infinite eta made every value inf (NaN images)
        with pytest.raises(ValueError, match="eta: expected a finite non-negative number"):
            ops.ddim_step(x, x, 10, SCHED, eta=eta, noise=x)
        sch = fastddpm.DDIMScheduler()
        sch.set_timesteps(10)
        with pytest.raises(ValueError, match="eta: expected a finite"):
            sch.step(x, 100, x, eta=eta)
        with pytest.raises(ValueError, match="eta: expected a finite"):
            fastddpm.sample(lambda x, t: x, (1, 1, 2, 2), sampler="ddim", steps=2, eta=eta, progress=False)
    with pytest.raises(TypeError, match="eta: expected a non-negative number, got '1'"):
        ops.ddim_step(x, x, 10, SCHED, eta="1")
    with pytest.raises(ValueError, match="prev_t"):
        ops.ddim_step(x, x, 10, SCHED, prev_t=10)
    with pytest.raises(ValueError, match="final_alpha_cumprod"):
        ops.ddim_step(x, x, 10, SCHED, final_alpha_cumprod=0.0)
    with pytest.raises(ValueError, match="seed"):
        ops.ddim_step(x, x, 10, SCHED, eta=1.0, noise="philox")
    # a seed or offset with other noise than "philox" would be ignored (noise=None draws from a generator)
    with pytest.raises(ValueError, match="seed: only used with noise='philox', got seed=4 with noise=None"):
        ops.ddim_step(x, x, 10, SCHED, eta=1.0, seed=4)
    with pytest.raises(ValueError, match="offset: only used with noise='philox', got an offset with noise=a tensor"):
        ops.ddim_step(x, x, 10, SCHED, eta=1.0, noise=x, offset=2)
    with pytest.raises(ValueError, match="t"):
        ops.ddim_step(x, x, 1000, SCHED)
    with pytest.raises(ValueError, match="prediction_type"):
        ops.ddim_step(x, x, 10, SCHED, prediction_type="x0")
    with pytest.raises(RuntimeError, match="prev_t"):  # the C++ kernel's own check
        torch.ops.fastddpm.ddim_step(x, x, torch.tensor([5, 5]), torch.tensor([5, 4]), SCHED.alphas_cumprod,
                                     1.0, None, 0, 0, 0, 0, 0.0, 0.0, False, False)
