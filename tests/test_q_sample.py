"""q_sample on every backend against the float64 reference."""

import pytest
import torch
from _utils import HAS_CUDA, assert_backends_tested, assert_close_ref, backends_for, devices_to_test, stable_seed

from fastddpm import NoiseSchedule, ops
from fastddpm.ops import reference

SHAPES = [(1, 1, 1, 3), (3, 5, 7, 11), (1, 3, 32, 32), (2, 63, 21, 13), (4, 17), (2, 3, 4, 5, 6)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SCHED = NoiseSchedule()


def _cases():
    for dev in devices_to_test():
        for b in backends_for(dev, "q_sample"):
            yield dev, b


@pytest.mark.parametrize("device,backend", list(_cases()))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target", [None, "eps", "x0", "v"])
def test_q_sample_matches_reference(device, backend, shape, dtype, target):
    g = torch.Generator().manual_seed(stable_seed(shape, dtype, target))
    x0 = torch.randn(shape, generator=g).to(device, dtype)
    eps = torch.randn(shape, generator=g).to(device, dtype)
    t = torch.randint(0, 1000, (shape[0],), generator=g).to(device)
    out = ops.q_sample(x0, t, eps, SCHED, target=target, backend=backend)
    xt = out if target is None else out[0]
    sab64 = SCHED.table("sqrt_alphas_cumprod", device, torch.float64)
    s1m64 = SCHED.table("sqrt_one_minus_alphas_cumprod", device, torch.float64)
    ref_xt, ref_v = reference.q_sample(x0.double(), eps.double(), t, sab64, s1m64, True)
    # half eager: torch's own computation in that dtype
    a = SCHED.sqrt_alphas_cumprod.to(device)[t].to(dtype).view(-1, *([1] * (x0.dim() - 1)))
    s = SCHED.sqrt_one_minus_alphas_cumprod.to(device)[t].to(dtype).view(-1, *([1] * (x0.dim() - 1)))
    # fp32 tables are the float64 tables rounded once: that rounding (<= 6e-8 relative) is part of the bound
    assert xt.dtype == dtype and xt.shape == x0.shape
    assert_close_ref(xt, ref_xt, dtype, eager=a * x0 + s * eps, rtol=1e-6, what="x_t")
    if target == "v":
        assert_close_ref(out[1], ref_v, dtype, eager=a * eps - s * x0, rtol=1e-6, what="v")
    elif target == "eps":
        assert out[1] is eps
    elif target == "x0":
        assert out[1] is x0


@pytest.mark.parametrize("backend", backends_for(torch.device("cpu"), "q_sample"))
@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
def test_q_sample_strides(backend, layout):
    x0 = torch.randn(3, 8, 9, 10)
    eps = torch.randn(3, 8, 9, 10)
    if layout == "channels_last":
        x0, eps = x0.to(memory_format=torch.channels_last), eps.to(memory_format=torch.channels_last)
    elif layout == "transposed":
        x0, eps = x0.transpose(2, 3), eps.transpose(2, 3)
    else:
        x0, eps = torch.randn(3, 8, 9, 20)[..., ::2], torch.randn(3, 8, 9, 20)[..., ::2]
    t = torch.tensor([0, 500, 999])
    xt, v = ops.q_sample(x0, t, eps, SCHED, target="v", backend=backend)
    ref_xt, ref_v = ops.q_sample(x0.contiguous().double(), t, eps.contiguous().double(), SCHED, target="v")
    assert_close_ref(xt, ref_xt, torch.float32, what=layout)
    assert_close_ref(v, ref_v, torch.float32, what=layout)
    if layout == "channels_last":
        assert xt.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", backends_for(torch.device("cpu"), "q_sample"))
def test_q_sample_gradients_are_the_coefficients(backend):
    # every backend (the Triton op had no autograd formula: backward through it raised)
    x0 = torch.randn(2, 3, 4, 4, requires_grad=True)
    eps = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.tensor([10, 900])
    xt, v = ops.q_sample(x0, t, eps, SCHED, target="v", backend=backend)
    (xt.sum() + 2 * v.sum()).backward()
    a = SCHED.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
    s = SCHED.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(x0.grad, (a - 2 * s).expand_as(x0))
    torch.testing.assert_close(eps.grad, (s + 2 * a).expand_as(eps))


def test_q_sample_opcheck():
    x0, eps = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5)
    t = torch.tensor([3, 7])
    args = (x0, eps, t, SCHED.sqrt_alphas_cumprod, SCHED.sqrt_one_minus_alphas_cumprod, True)
    torch.library.opcheck(torch.ops.fastddpm.q_sample.default, args)


def test_q_sample_compiles_fullgraph():
    def f(x0, t, eps):
        xt, v = ops.q_sample(x0, t, eps, SCHED, target="v", backend="cpu")
        return xt * 2 + v

    x0, eps, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([1, 2])
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x0, t, eps), f(x0, t, eps))


def test_cuda_kernels_compiled_into_extension():
    """Where a CUDA toolkit and a CUDA torch exist, the build must compile the CUDA kernels into _C."""
    import importlib.util
    import os

    from fastddpm import _build_info
    from fastddpm.ops import _library

    setup_py = os.path.join(os.path.dirname(__file__), "..", "setup.py")
    spec = importlib.util.spec_from_file_location("fastddpm_setup", setup_py)
    setup_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup_mod)  # defines helpers only; setup() runs under __main__
    toolkit = setup_mod._find_cuda_home() is not None and torch.version.cuda is not None
    if _build_info.CUDA_REASON == "FASTDDPM_CUDA=0":
        pytest.skip("this build was made with FASTDDPM_CUDA=0")
    if toolkit:
        assert _build_info.WITH_CUDA, f"a CUDA toolkit is here but the build skipped CUDA: {_build_info.CUDA_REASON}"
    if not _build_info.WITH_CUDA:
        pytest.skip(f"this build has no CUDA kernels ({_build_info.CUDA_REASON})")
    for op in ("q_sample", "ddpm_step", "philox_normal_", "ddim_step", "group_norm_silu", "group_norm_silu_fwd",
               "group_norm_silu_bwd"):
        assert _library.has_kernel(op, "CUDA"), f"{op} has no CUDA kernel in fastddpm._C"


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(t=torch.tensor([0, 1000])), ValueError, "t: expected timesteps in"),
        (dict(t=torch.tensor([-1, 3])), ValueError, "t: expected timesteps in"),
        (dict(t=torch.tensor([0.5, 1.0])), TypeError, "t: expected an integer"),
        (dict(t=torch.tensor([1, 2, 3])), ValueError, r"t: expected shape \(2,\)"),
        (dict(noise=torch.randn(2, 3, 4, 5)), ValueError, "noise: expected shape"),
        (dict(noise=torch.randn(2, 3, 4, 4, dtype=torch.float64)), TypeError, "noise: expected dtype"),
        (dict(x0=torch.ones(2, 3, 4, 4, dtype=torch.int64)), TypeError, "x0: expected dtype"),
        (dict(target="score"), ValueError, "target"),
        (dict(backend="fast"), ValueError, "backend"),
        (dict(schedule="linear"), TypeError, "schedule"),
    ],
)
def test_q_sample_bad_input(kwargs, exc, match):
    args = dict(x0=torch.randn(2, 3, 4, 4), t=torch.tensor([1, 2]), noise=torch.randn(2, 3, 4, 4), schedule=SCHED)
    if "x0" in kwargs:
        args["noise"] = torch.ones(2, 3, 4, 4, dtype=torch.int64)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        ops.q_sample(**args)


def test_backend_errors_say_why():
    x0 = torch.randn(1, 3)
    with pytest.raises(ops.BackendNotSupported, match="cuda"):
        ops.q_sample(x0, 0, x0, SCHED, backend="cuda")
    with pytest.raises(ops.BackendNotSupported, match="float64"):
        ops.q_sample(x0.double(), 0, x0.double(), SCHED, backend="cpu")


def test_env_backend_override(monkeypatch):
    monkeypatch.setenv("FASTDDPM_BACKEND", "torch")
    from fastddpm.ops import _dispatch

    assert _dispatch.resolve("q_sample", "auto", torch.device("cpu"), torch.float32) == "torch"


def test_cpp_kernel_rejects_bad_t_without_crashing():
    x0 = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="t: expected timesteps"):
        torch.ops.fastddpm.q_sample(
            x0, x0, torch.tensor([0, 5000]), SCHED.sqrt_alphas_cumprod, SCHED.sqrt_one_minus_alphas_cumprod, False
        )


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_q_sample_cuda_runtime(backend):
    x0 = torch.randn(16, 3, 32, 32, device="cuda")
    eps = torch.randn_like(x0)
    t = torch.randint(0, 1000, (16,), device="cuda")
    xt = ops.q_sample(x0, t, eps, SCHED, backend=backend)
    ref = ops.q_sample(x0.double(), t, eps.double(), SCHED)
    assert_close_ref(xt, ref, torch.float32)


def _cudart_of_extension():
    """The CUDA runtime library fastddpm._C calls (the last error lives in that runtime instance)."""
    import ctypes

    import fastddpm._C as ext

    maps = [ln.split()[-1] for ln in open("/proc/self/maps") if "libcudart" in ln]
    ldd = __import__("subprocess").run(["ldd", ext.__file__], capture_output=True, text=True).stdout
    linked = [p for p in maps if any(p in ln or p.split("/")[-1] in ln for ln in ldd.splitlines())]
    path = (linked or maps or [None])[0]
    if path is None:
        pytest.skip("fastddpm._C links the CUDA runtime statically: cannot plant an error from outside")
    return ctypes.CDLL(path)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_an_earlier_cuda_error_is_not_blamed_on_the_op():
    """A CUDA error left pending by an earlier call (here a failed cudaMalloc, planted through the runtime the
    extension uses) is reported as an earlier operation's, consumed, and the next call runs."""
    import ctypes

    x0 = torch.randn(4, 3, 8, 8, device="cuda")
    t = torch.randint(0, 1000, (4,), device="cuda")
    sab, s1m = SCHED.sqrt_alphas_cumprod.cuda(), SCHED.sqrt_one_minus_alphas_cumprod.cuda()
    args = (x0, x0, t, sab, s1m, False)
    expected = torch.ops.fastddpm.q_sample(*args)[0]  # also warms the allocator: no CUDA call below but ours
    torch.cuda.synchronize()
    cudart = _cudart_of_extension()
    ptr = ctypes.c_void_p()
    assert cudart.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(1 << 62)) != 0  # out of memory: pending
    with pytest.raises(RuntimeError, match=r"already pending before this op launched.*not by q_sample"):
        torch.ops.fastddpm.q_sample(*args)
    assert torch.equal(torch.ops.fastddpm.q_sample(*args)[0], expected)  # consumed, not inherited


@pytest.mark.parametrize("batch", [3, 64, 65, 200])  # both host checks: tolist() up to 64, reductions above
def test_timestep_range_checks_at_every_batch_size(batch):
    sched = SCHED
    x = torch.randn(batch, 1, 2, 2)
    for bad in (1000, -1):
        t = torch.full((batch,), 7)
        t[-1] = bad
        with pytest.raises(ValueError, match=f"t: expected timesteps in \\[0, 1000\\), got {bad}"):
            ops.q_sample(x, t, torch.randn_like(x), sched)
    t = torch.full((batch,), 500)
    ok = ops.q_sample(x, t, torch.randn_like(x), sched)
    assert ok.shape == x.shape
    # prev_t < t and last_t > t for every sample, the last one breaking it
    pt = t - 20
    pt[-1] = 500
    with pytest.raises(ValueError, match="prev_t: expected prev_t < t for every sample"):
        ops.ddpm_step(x, x, t, sched, pt)
    with pytest.raises(ValueError, match="prev_t: expected prev_t < t for every sample"):
        ops.dpmpp_step(x, x, t, sched, pt)
    lt = t + 20
    lt[-1] = 500
    with pytest.raises(ValueError, match="last_t: expected last_t > t for every sample"):
        ops.dpmpp_step(x, x, t, sched, t - 20, x, lt)
    ops.dpmpp_step(x, x, t, sched, t - 20, x, t + 20)  # all valid: no error


def test_backends_tested():
    # The tests here run every backend backends_for() names on each device; a backend that stopped
    # resolving would drop out of them silently.
    assert_backends_tested("q_sample")
