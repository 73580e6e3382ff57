"""ddim_step on every backend against the float64 reference (diffusers' DDIM formulas)."""

import zlib

import pytest
import torch
from _utils import HAS_CUDA, backends_for, devices_to_test

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
    from conftest import TRITON_OK

    try:  # written by setup.py: whether fastddpm._C was built with CUDA kernels
        from fastddpm._build_info import WITH_CUDA
    except ImportError:
        WITH_CUDA = False
    for dev in DEVICES:
        tested = backends_for(dev, "ddim_step")
        assert "torch" in tested
        if TRITON_OK:
            assert "triton" in tested, f"triton imports but is not tested on {dev}: {tested}"
        if dev.type == "cpu":
            assert "cpu" in tested, f"the C++ CPU kernel is not tested: {tested}"
        elif WITH_CUDA:  # built with CUDA kernels: a GPU run must exercise them
            assert "cuda" in tested, f"fastddpm._C was built with CUDA but its kernel is not tested: {tested}"
    assert [d.type for d in DEVICES] == (["cpu", "cuda"] if HAS_CUDA else ["cpu"])


@pytest.mark.parametrize("dev", DEVICES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pred_type", ["epsilon", "sample", "v_prediction"])
def test_ddim_step_matches_reference(shape, dtype, pred_type, dev):
    B = shape[0]
    g = torch.Generator().manual_seed(zlib.crc32(repr((shape, dtype, pred_type)).encode()))
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


def test_ddim_step_fake_tensor():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 3, 4, 4)
        out, pred = torch.ops.fastddpm.ddim_step(x, x, torch.zeros(2, dtype=torch.long),
                                                 torch.zeros(2, dtype=torch.long), torch.empty(1000), 1.0, None,
                                                 0, 0, 0, 0, 0.0, 0.0, False, True)
        assert out.shape == x.shape and pred.shape == x.shape


def test_ddim_step_bad_input():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="model_output"):
        ops.ddim_step(x, torch.randn(2, 3, 4, 5), 10, SCHED)
    with pytest.raises(ValueError, match="eta"):
        ops.ddim_step(x, x, 10, SCHED, eta=-0.1)
    with pytest.raises(ValueError, match="prev_t"):
        ops.ddim_step(x, x, 10, SCHED, prev_t=10)
    with pytest.raises(ValueError, match="final_alpha_cumprod"):
        ops.ddim_step(x, x, 10, SCHED, final_alpha_cumprod=0.0)
    with pytest.raises(ValueError, match="seed"):
        ops.ddim_step(x, x, 10, SCHED, eta=1.0, noise="philox")
    with pytest.raises(ValueError, match="t"):
        ops.ddim_step(x, x, 1000, SCHED)
    with pytest.raises(ValueError, match="prediction_type"):
        ops.ddim_step(x, x, 10, SCHED, prediction_type="x0")
    with pytest.raises(RuntimeError, match="prev_t"):  # the C++ kernel's own check
        torch.ops.fastddpm.ddim_step(x, x, torch.tensor([5, 5]), torch.tensor([5, 4]), SCHED.alphas_cumprod,
                                     1.0, None, 0, 0, 0, 0, 0.0, 0.0, False, False)
