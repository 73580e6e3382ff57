"""Where and how the GPU kernels launch: on the tensors' device, within CUDA's grid limits, with 64-bit
offsets, and with timestep tensors a captured CUDA graph can keep.

Most of this runs without a GPU: the Triton launch sites through Triton's CPU interpreter with the
launcher's device context and grid recorded, the timestep cache with the capture check mocked. The
tests marked cuda repeat the device placement on real devices (two or more for the multi-device one).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from _utils import interpreted, rel_err
from fastddpm.triton_kernels._common import launch_device

from fastddpm import NoiseSchedule, ops
from fastddpm.ops import _checks, _dispatch, reference

TRITON = _dispatch.triton_status()[0] and (torch.cuda.is_available() or interpreted())
needs_triton = pytest.mark.skipif(not TRITON, reason="triton is not importable, or no GPU and no interpreter")
CUDA_GRID_Y = 65535  # CUDA's limit on grid axes 1 and 2
CUDA_GRID_X = 2**31 - 1


# ---------------------------------------------------------------------------------------------------------
# launch_device: the context every Triton launch site enters
# ---------------------------------------------------------------------------------------------------------
class _RecordingDevice:
    """Stands in for torch.cuda.device: records the device entered."""

    entered: list = []

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        _RecordingDevice.entered.append(self.device)

    def __exit__(self, *exc):
        return False


def test_launch_device_enters_the_tensors_device(monkeypatch):
    _RecordingDevice.entered = []
    monkeypatch.setattr(torch.cuda, "device", _RecordingDevice)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    on_cuda1 = types.SimpleNamespace(device=torch.device("cuda", 1))  # only .device is read
    with launch_device(on_cuda1):
        pass
    assert _RecordingDevice.entered == [torch.device("cuda", 1)]
    # CPU tensors (Triton's interpreter) need no device context
    with launch_device(torch.zeros(1)):
        pass
    assert len(_RecordingDevice.entered) == 1
    # fake CUDA tensors where CUDA was never initialised (tracing on a GPU-less host): entering would
    # initialise CUDA and fail
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    with launch_device(on_cuda1):
        pass
    assert len(_RecordingDevice.entered) == 1


def _guarded_launches(monkeypatch, module):
    """Replace ``module``'s launch_device and wrap_triton, and those of triton_kernels._common (whose
    Layout.launch runs the elementwise kernels): every launch must happen inside launch_device of a tensor of
    the op, and still runs (the result is checked by the caller)."""
    from fastddpm.triton_kernels import _common

    state = {"depth": 0, "devices": [], "launches": 0}
    real_wrap = _common.wrap_triton

    @contextlib.contextmanager
    def recording_launch_device(t):
        state["devices"].append(t.device)
        state["depth"] += 1
        try:
            yield
        finally:
            state["depth"] -= 1

    def checked_wrap(kernel):
        launcher = real_wrap(kernel)

        class _Grid:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    assert state["depth"] > 0, f"{kernel} launched outside launch_device"
                    state["launches"] += 1
                    return launcher[grid](*args, **kwargs)

                return launch

        return _Grid()

    for m in {module, _common}:
        for name, fake in (("launch_device", recording_launch_device), ("wrap_triton", checked_wrap)):
            if hasattr(m, name):
                monkeypatch.setattr(m, name, fake)
    return state


@needs_triton
def test_q_sample_launches_under_the_tensors_device(monkeypatch):
    import fastddpm.triton_kernels.q_sample as mod

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    state = _guarded_launches(monkeypatch, mod)
    s = NoiseSchedule(device=dev)
    x0, eps = torch.randn(2, 3, 4, 4, device=dev), torch.randn(2, 3, 4, 4, device=dev)
    t = torch.tensor([3, 900], device=dev)
    xt, v = ops.q_sample(x0, t, eps, s, target="v", backend="triton")
    r_xt, r_v = reference.q_sample(x0.double(), eps.double(), t, s.sqrt_alphas_cumprod.double().to(dev),
                                   s.sqrt_one_minus_alphas_cumprod.double().to(dev), True)
    assert rel_err(xt, r_xt) < 1e-6 and rel_err(v, r_v) < 1e-6
    assert state["launches"] == 1 and state["devices"] == [dev]


@needs_triton
def test_attention_launches_under_the_tensors_device(monkeypatch):
    import fastddpm.triton_kernels.attention as mod

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    state = _guarded_launches(monkeypatch, mod)
    q, k, v = (torch.randn(2, 3, 9, 16, device=dev, requires_grad=True) for _ in range(3))
    out = ops.attention(q, k, v, backend="triton")
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), go)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = reference.attention(q64, k64, v64)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), go.double())
    assert rel_err(out, ref) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-5
    assert state["launches"] == 4  # forward; delta, dK/dV and dQ
    assert state["devices"] and all(d == dev for d in state["devices"])


@needs_triton
def test_group_norm_silu_launches_under_the_tensors_device(monkeypatch):
    import fastddpm.triton_kernels.group_norm_silu as mod

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    state = _guarded_launches(monkeypatch, mod)
    x = (torch.randn(1, 8, 5, 5, device=dev) * 2 + 1).requires_grad_()
    w, b = torch.randn(8, device=dev, requires_grad=True), torch.randn(8, device=dev, requires_grad=True)
    y = ops.group_norm_silu(x, 4, w, b, backend="triton")
    go = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w, b), go)
    x64, w64, b64 = (a.detach().double().requires_grad_() for a in (x, w, b))
    ref = F.silu(F.group_norm(x64, 4, w64, b64))
    ref_grads = torch.autograd.grad(ref, (x64, w64, b64), go.double())
    assert rel_err(y, ref) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-5
    assert state["launches"] == 5  # partial sums, statistics, apply; backward partial sums, apply
    assert state["devices"] and all(d == dev for d in state["devices"])


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_triton_kernels_on_the_second_device():
    """Tensors on cuda:1 while cuda:0 is current: each Triton op's result equals the CPU reference."""
    dev = torch.device("cuda", 1)
    torch.cuda.set_device(0)
    s = NoiseSchedule(device=dev)
    x0, eps = torch.randn(2, 3, 8, 8, device=dev), torch.randn(2, 3, 8, 8, device=dev)
    t = torch.tensor([5, 700], device=dev)
    xt = ops.q_sample(x0, t, eps, s, backend="triton")
    r = reference.q_sample(x0.cpu().double(), eps.cpu().double(), t.cpu(), s.sqrt_alphas_cumprod.cpu().double(),
                           s.sqrt_one_minus_alphas_cumprod.cpu().double(), False)[0]
    assert xt.device == dev and rel_err(xt.cpu(), r) < 1e-6
    q, k, v = (torch.randn(2, 2, 33, 32, device=dev, requires_grad=True) for _ in range(3))
    o = ops.attention(q, k, v, backend="triton")
    dq, dk, dv = torch.autograd.grad(o.sum(), (q, k, v))
    q64, k64, v64 = (a.detach().cpu().double().requires_grad_() for a in (q, k, v))
    ro = reference.attention(q64, k64, v64)
    rg = torch.autograd.grad(ro.sum(), (q64, k64, v64))
    assert rel_err(o.cpu(), ro) < 1e-5
    for g, r in zip((dq, dk, dv), rg):
        assert rel_err(g.cpu(), r) < 1e-5
    x = torch.randn(2, 32, 8, 8, device=dev, requires_grad=True)
    y = ops.group_norm_silu(x, 8, backend="triton")
    (dx,) = torch.autograd.grad(y.sum(), (x,))
    x64 = x.detach().cpu().double().requires_grad_()
    ry = F.silu(F.group_norm(x64, 8))
    (rdx,) = torch.autograd.grad(ry.sum(), (x64,))
    assert rel_err(y.cpu(), ry) < 1e-5 and rel_err(dx.cpu(), rdx) < 1e-5
    assert torch.cuda.current_device() == 0


# ---------------------------------------------------------------------------------------------------------
# Grids within CUDA's limits
# ---------------------------------------------------------------------------------------------------------
def _recording_grids(monkeypatch, module):
    """Replace ``module``'s wrap_triton by one that records each launch's grid and launches nothing."""
    grids = []

    class _Grid:
        def __getitem__(self, grid):
            grids.append(tuple(grid))
            return lambda *a, **k: None

    monkeypatch.setattr(module, "wrap_triton", lambda kernel: _Grid())
    return grids


def _within_cuda_limits(grid) -> bool:
    g = tuple(grid) + (1,) * (3 - len(grid))
    return 0 < g[0] <= CUDA_GRID_X and 0 < g[1] <= CUDA_GRID_Y and 0 < g[2] <= CUDA_GRID_Y


@needs_triton
def test_attention_grid_with_more_than_65535_heads(monkeypatch):
    """B * H = 70,000 (batch x heads past axis 1's limit): every grid stays within CUDA's limits. The
    inputs are expanded views and no kernel runs, so this costs a few MB."""
    import fastddpm.triton_kernels.attention as mod

    grids = _recording_grids(monkeypatch, mod)
    B, H, N, d = 35_000, 2, 3, 16
    q = torch.randn(1, 1, N, d).expand(B, H, N, d)
    o, lse = mod.attention_triton_fwd(q, q, q, 0.25)
    mod.attention_triton_bwd(o, q, q, q, o, lse, 0.25)
    assert len(grids) == 4
    for g in grids:
        assert _within_cuda_limits(g), g
        assert g[0] >= B * H  # every (batch, head) has its programs


@needs_triton
def test_group_norm_grid_with_more_than_65535_slices(monkeypatch):
    """A group of 2**28 elements is cut into 65,536 slices (past axis 1's limit): every grid stays within
    CUDA's limits. The tensors are allocated and never touched (no kernel runs): no memory is used."""
    import fastddpm.triton_kernels.group_norm_silu as mod

    x = torch.empty(1, 1, 2**14, 2**14)
    assert mod._geometry(x, 1)[6] > CUDA_GRID_Y  # the slice count this test is about
    grids = _recording_grids(monkeypatch, mod)
    _, mean, rstd = mod.group_norm_silu_triton(x, None, None, 1, 1e-5, True)
    mod.group_norm_silu_triton_bwd(x, x, mean, rstd, None, None, 1, True)
    assert len(grids) == 5
    for g in grids:
        assert _within_cuda_limits(g), g


# ---------------------------------------------------------------------------------------------------------
# 64-bit offsets: element indices past 2**31 in one (batch, head)
# ---------------------------------------------------------------------------------------------------------
def _big_offsets_check() -> None:
    """q, k and v rows 2**30 elements apart (int32 strides whose products with the row index pass 2**31):
    forward and backward against float64. The 8 GiB buffer is reserved, not touched: only the rows used
    are written (a few pages)."""
    stride = 2**30
    N, d = 3, 16
    buf = torch.empty(2 * stride + 3 * d)  # rows at 0, 2**30 and 2**31 elements (+ offsets of k and v)

    def view(offset):
        return buf.as_strided((1, 1, N, d), (0, 0, stride, 1), offset)

    gen = torch.Generator().manual_seed(0)
    q, k, v = view(0), view(d), view(2 * d)
    for x in (q, k, v):
        x.copy_(torch.randn(1, 1, N, d, generator=gen))
    qc, kc, vc = (x.clone() for x in (q, k, v))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = ops.attention(q, k, v, backend="triton")
    go = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad(out, (q, k, v), go)
    q64, k64, v64 = (x.double().requires_grad_() for x in (qc, kc, vc))
    ref = reference.attention(q64, k64, v64)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), go.double())
    assert rel_err(out, ref) < 1e-5, rel_err(out, ref)
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-5, rel_err(g, r)


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's variant (a GPU host runs the GPU tests)")
def test_attention_offsets_past_2_to_the_31():
    """_big_offsets_check in a child process: with 32-bit offsets the kernels read outside the buffer, which
    can crash the process instead of failing an assertion."""
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", "import test_launch; test_launch._big_offsets_check()"], cwd=tests,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-2000:]}"


@needs_triton
def test_attention_indexes_in_int64_exactly_past_2_to_the_31():
    """The kernels index rows and columns in int32 (64-bit address arithmetic on every tile element costs
    registers, benchmarks/README.md "Triton tiles") unless an element offset inside one (batch, head) slice
    reaches 2**31 (_big_offsets_check runs that case through the kernels)."""
    from fastddpm.triton_kernels.attention import _wide

    def t(N, d, sn, sd=1):  # (B, H, N, d) with row stride sn: shapes and strides only, no storage
        return torch.empty_strided((2, 3, N, d), (2**40, 2**41, sn, sd), device="meta")

    assert not _wide(t(1024, 512, 512))  # batch and head strides do not count: their offsets are int64
    assert not _wide(t(2, 1, 2**31 - 1)) and _wide(t(2, 1, 2**31))  # largest offset 2**31 - 1, then 2**31
    assert _wide(t(2, 2, 2**31 - 1))  # plus one column
    assert _wide(t(3, 16, 2**30))  # _big_offsets_check's rows
    assert not _wide(t(2**22, 512, 512))  # 2**31 elements per head: the last offset is 2**31 - 1
    assert _wide(t(4, 16, 16), t(2**22 + 1, 512, 512))  # any of the tensors
    assert not _wide(t(1, 16, 2**40))  # one row: no row offset


# ---------------------------------------------------------------------------------------------------------
# The int-timestep cache and CUDA graphs
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def empty_cache(monkeypatch):
    monkeypatch.setattr(_checks, "_INT_TIMESTEPS", {})
    return _checks._INT_TIMESTEPS


def test_device_type_is_each_devices_own(monkeypatch):
    """_checks.device_type (the ops' cached read of torch.device.type) answers each device's own type, for
    devices that exist here or not, and keeps answering it once cached."""
    monkeypatch.setattr(_checks, "_DEVICE_TYPES", {})
    devices = [torch.device("cpu"), torch.device("cuda"), torch.device("cuda", 1), torch.device("meta")]
    for _ in range(2):  # the first pass fills the cache, the second reads it
        assert [_checks.device_type(d) for d in devices] == ["cpu", "cuda", "cuda", "meta"]
    assert not _checks.capturing(torch.device("meta")) and not _checks.capturing(torch.device("cpu"))


def test_capture_is_checked_for_cuda_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert _checks.capturing(torch.device("cuda"))
    assert _checks.capturing(torch.device("cuda", 0))
    assert not _checks.capturing(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert not _checks.capturing(torch.device("cuda"))


def test_capture_gets_a_tensor_of_its_own(monkeypatch, empty_cache):
    """Under capture (mocked here), a cached tensor is never returned (the cache is checked after the
    capture), and the capture's tensor is never cached (so no eviction can free what a graph reads)."""
    dev = torch.device("cpu")
    cached = _checks.int_timesteps(7, 4, dev)
    assert _checks.int_timesteps(7, 4, dev) is cached  # the cache works outside capture
    monkeypatch.setattr(_checks, "capturing", lambda device: True)
    captured = _checks.int_timesteps(7, 4, dev)
    assert captured is not cached and captured.tolist() == [7] * 4
    assert _checks.int_timesteps(8, 4, dev).tolist() == [8] * 4
    assert list(empty_cache.values()) == [cached]  # nothing made under capture was cached
    # eviction (the cache is cleared when full) cannot reach the captured tensors
    monkeypatch.setattr(_checks, "capturing", lambda device: False)
    for i in range(_checks._INT_TIMESTEPS_MAX + 1):
        _checks.int_timesteps(i % 1000, 1 + i // 1000, dev)
    assert all(v is not captured for v in empty_cache.values())
    assert captured.tolist() == [7] * 4


def test_step_op_under_capture_uses_fresh_timesteps(monkeypatch):
    """ops.ddpm_step with int t and prev_t: the (t, prev_t) pair is cached outside capture, and under (mocked)
    capture a fresh pair is made and nothing is cached."""
    monkeypatch.setattr(_checks, "_INT_STEPS", {})
    s = NoiseSchedule()
    x, m = torch.randn(2, 3), torch.randn(2, 3)
    want = ops.ddpm_step(x, m, torch.tensor([5, 5]), s, prev_t=torch.tensor([3, 3]), noise="none", backend="torch")
    assert torch.equal(ops.ddpm_step(x, m, 5, s, prev_t=3, noise="none", backend="torch"), want)
    cached = dict(_checks._INT_STEPS)
    assert list(cached) == [(5, 3, 2, torch.device("cpu"))]
    monkeypatch.setattr(_checks, "capturing", lambda device: True)
    assert torch.equal(ops.ddpm_step(x, m, 6, s, prev_t=3, noise="none", backend="torch"),
                       ops.ddpm_step(x, m, torch.tensor([6, 6]), s, prev_t=torch.tensor([3, 3]), noise="none",
                                     backend="torch"))
    assert _checks._INT_STEPS == cached  # nothing made under capture was cached


def test_public_op_under_capture_uses_fresh_timesteps(monkeypatch, empty_cache):
    """ops.q_sample with an int t under (mocked) capture: the timestep tensor is not the cached one."""
    seen = []
    real_full = torch.full

    def spy_full(*a, **k):
        out = real_full(*a, **k)
        seen.append(out)
        return out

    s = NoiseSchedule()
    x0, eps = torch.randn(2, 3), torch.randn(2, 3)
    ops.q_sample(x0, 5, eps, s, backend="torch")
    assert len(empty_cache) == 1
    monkeypatch.setattr(torch, "full", spy_full)
    monkeypatch.setattr(_checks, "capturing", lambda device: True)
    out = ops.q_sample(x0, 5, eps, s, backend="torch")
    assert len(seen) == 1 and len(empty_cache) == 1 and all(v is not seen[0] for v in empty_cache.values())
    r = reference.q_sample(x0.double(), eps.double(), torch.full((2,), 5), s.sqrt_alphas_cumprod.double(),
                           s.sqrt_one_minus_alphas_cumprod.double(), False)[0]
    assert rel_err(out, r) < 1e-6


# ---------------------------------------------------------------------------------------------------------
# Triton >= 3.4: its tl.randn draws the Philox words the other backends draw
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not _dispatch.triton_status()[0], reason="triton is not importable here")
def test_triton_older_than_3_4_is_refused(monkeypatch):
    import triton

    try:
        for version, ok in (("3.3.1", False), ("2.3.0", False), ("3.4.0", True), ("3.10.0+git1a2b", True)):
            monkeypatch.setattr(triton, "__version__", version)
            _dispatch.triton_status.cache_clear()
            usable, why = _dispatch.triton_status()
            assert usable == ok, version
            assert ok or (version in why and "3.4" in why)
    finally:
        monkeypatch.undo()
        _dispatch.triton_status.cache_clear()
    assert _dispatch.triton_status()[0]
