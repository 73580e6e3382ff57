"""group_norm_silu: every backend against the float64 reference, forward and all three gradients.

Outputs are poisoned: with torch's deterministic mode and fill_uninitialized_memory, every
torch.empty (also at::empty inside the C++ kernels and the Triton wrappers) is NaN-filled, so an
element a kernel forgets to write fails the finiteness check.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _utils import assert_backends_tested, backends_for, half_bound, interpreted, rel_err

import fastddpm
from fastddpm.nn import GroupNormSiLU
from fastddpm.ops import BackendNotSupported, group_norm_silu, reference

CPU = torch.device("cpu")
BACKENDS = backends_for(CPU, "group_norm_silu_fwd")
HAS_C = "cpu" in BACKENDS

# fp32 against float64: DESIGN.md's 1e-5 for reductions. fp16/bf16: twice torch's own error in the
# same dtype, measured against the same float64 reference.
FP32_RTOL = 1e-5

# (shape, num_groups): a single element per group, groups of 1, C == num_groups, odd spatial
# sizes, 1D / 2D / 3D spatial, and U-Net sizes (C++ only: the Triton interpreter is slow).
SMALL = [
    ((1, 32, 1, 1), 32),
    ((2, 16, 5, 5), 16),
    ((3, 12, 7, 3), 1),
    ((2, 6, 13), 3),
    ((1, 8, 3, 5, 4), 2),
    ((2, 64, 9, 7), 32),
    ((1, 4, 16, 16), 2),   # Triton: each group's reduction sliced over 2 programs
    ((1, 2, 24, 24), 1),   # Triton: 5 slices, the last one short
]
# The shapes of SMALL whose Triton reductions are split across programs (test_triton_split_covered).
TRITON_SPLIT = [((1, 4, 16, 16), 2), ((1, 2, 24, 24), 1)]
LARGE = [
    ((1, 128, 32, 32), 32),
    ((2, 256, 16, 16), 32),
    ((16, 256, 4, 4), 32),
    ((1, 96, 63, 21), 8),
    ((16, 128, 32, 32), 32),  # channels_last: one sample per task
    ((1, 64, 96, 96), 2),     # NCHW groups of 294912 elements: split into pieces
]


@pytest.fixture(autouse=True)
def poison_empty():
    old_det = torch.are_deterministic_algorithms_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    # The poisoning this file relies on is in force (an unwritten output element would be NaN).
    assert torch.empty(16).isnan().all() and torch.empty(4, dtype=torch.bfloat16).isnan().all()
    yield
    torch.use_deterministic_algorithms(old_det)
    torch.utils.deterministic.fill_uninitialized_memory = old_fill


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    # (N, *spatial, C) dense for any spatial rank.
    return x.movedim(1, -1).contiguous().movedim(-1, 1)


def _inputs(shape, dtype, channels_last, affine=True, seed=0, shift=False):
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    # An offset and scale per channel: GroupNorm's statistics must not rely on zero-mean input.
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2.0 + 3.0
    x = x.to(dtype)
    if channels_last:
        x = _channels_last(x)
    w = (torch.randn(C, generator=g, dtype=torch.float64) * 0.5 + 1.0) if affine else None
    b = torch.randn(C, generator=g, dtype=torch.float64) if affine else None
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    if not shift:
        return x, w, b, dy
    # Per (sample, channel), of the size of x's spread (as the U-Net's time embedding): it moves
    # the channels of a group apart, so statistics that ignored it would be far off.
    s = torch.randn(shape[0], C, generator=g, dtype=torch.float64) * 2.0
    return x, w, b, dy, s


def _run(fn, x, w, b, dy, param_dtype, s=None):
    xr = x.detach().clone().requires_grad_()
    wr = w.detach().to(param_dtype).clone().requires_grad_() if w is not None else None
    br = b.detach().to(param_dtype).clone().requires_grad_() if b is not None else None
    if s is None:
        y = fn(xr, wr, br)
    else:
        sr = s.detach().to(param_dtype).clone().requires_grad_()
        y = fn(xr, wr, br, sr)
    y.backward(dy.to(y.dtype))
    out = (y.detach(), xr.grad, (wr.grad if wr is not None else None), (br.grad if br is not None else None))
    return out if s is None else out + (sr.grad,)


def _eager(x, G, w, b, silu, s=None):
    # torch's own GroupNorm (+ SiLU) in x's dtype. F.group_norm refuses inputs with one value per
    # channel, such as (1, 32, 1, 1); a doubled batch gives the same per-sample result there.
    if s is not None:
        x = x + s.to(x.dtype).reshape(s.shape + (1,) * (x.dim() - 2))
    n = x.shape[0]
    xx = torch.cat([x, x]) if x[:, 0].numel() == 1 else x
    y = F.group_norm(xx, G, w, b, 1e-5)[:n]
    return F.silu(y) if silu else y


def _check_against_reference(backend, shape, G, dtype, channels_last, silu, affine=True, shift=False,
                             device=CPU):
    x, w, b, dy, *s = _inputs(shape, dtype, channels_last, affine, shift=shift)
    s = s[0] if s else None
    act = "silu" if silu else None
    # The reference runs in float64 on the CPU; the kernel and torch's eager ops on `device`.
    xd, wd, bd, dyd = (t.to(device) if t is not None else None for t in (x, w, b, dy))
    sd = s.to(device) if s is not None else None
    host = lambda res: tuple(r.cpu() if r is not None else None for r in res)  # noqa: E731
    # The U-Net keeps fp32 parameters (autocast style) for fp32 inputs and the input dtype otherwise.
    if s is None:
        ref = _run(lambda xx, ww, bb: reference.group_norm_silu(xx, ww, bb, G, 1e-5, silu)[0],
                   x.double(), w, b, dy, torch.float64)
        out = _run(lambda xx, ww, bb: group_norm_silu(xx, G, ww, bb, activation=act, backend=backend),
                   xd, wd, bd, dyd, dtype)
        eager = _run(lambda xx, ww, bb: _eager(xx, G, ww, bb, silu), xd, wd, bd, dyd, dtype)
    else:
        ref = _run(lambda xx, ww, bb, ss: reference.group_norm_silu(xx, ww, bb, G, 1e-5, silu, ss)[0],
                   x.double(), w, b, dy, torch.float64, s)
        out = _run(lambda xx, ww, bb, ss: group_norm_silu(xx, G, ww, bb, activation=act, backend=backend,
                                                          shift=ss), xd, wd, bd, dyd, dtype, sd)
        eager = _run(lambda xx, ww, bb, ss: _eager(xx, G, ww, bb, silu, ss), xd, wd, bd, dyd, dtype, sd)
    if device != CPU:
        assert out[0].device.type == device.type
        out, eager = host(out), host(eager)
    y = out[0]
    assert y.dtype == dtype and y.shape == x.shape
    if backend != "torch" and channels_last and not x.is_contiguous():  # the reference returns NCHW
        assert y.stride() == x.stride(), "output must keep x's channels_last layout"
    for name, a, r, e in zip(("y", "dx", "dweight", "dbias", "dshift"), out, ref, eager):
        if r is None:
            assert a is None
            continue
        assert torch.isfinite(a).all(), f"{backend} {name}: non-finite values (unwritten output?)"
        err = rel_err(a, r)
        eager_err = rel_err(e, r)
        if dtype == torch.float32:
            # Floor 1e-5; where fp32 itself is ill-conditioned (one element per group makes
            # rstd = 1/sqrt(eps) ~ 316 amplify rounding in dx), torch's own fp32 error is larger and
            # the bound is twice that.
            bound = max(FP32_RTOL, 2 * eager_err)
        else:
            bound = half_bound(eager_err, dtype)
        assert err <= bound, (f"{backend} {name} {shape} {dtype}: error {err:.3g} > {bound:.3g} "
                              f"(eager {eager_err:.3g})")


def _backend_params(large=False):
    out = []
    for b in BACKENDS:
        marks = []
        if b == "triton" and interpreted():
            if large:
                continue
            marks.append(pytest.mark.slow)
        out.append(pytest.param(b, marks=marks))
    return out


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("shape,G", SMALL)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("silu", [True, False])
def test_fp32_small(backend, shape, G, channels_last, silu):
    _check_against_reference(backend, shape, G, torch.float32, channels_last, silu)


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,G", [((2, 16, 5, 5), 4), ((1, 32, 6, 6), 32)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_half_small(backend, dtype, shape, G, channels_last):
    _check_against_reference(backend, shape, G, dtype, channels_last, True)


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("shape,G", [((2, 16, 5, 5), 4), ((1, 8, 3, 5, 4), 2), ((3, 6, 7), 3), ((2, 4), 2)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("silu", [True, False])
def test_shift(backend, shape, G, channels_last, silu):
    # y = act(GroupNorm(x + shift[:, :, None, ...])): forward and all four gradients (x, weight,
    # bias, shift) against the float64 reference of the same expression.
    _check_against_reference(backend, shape, G, torch.float32, channels_last, silu, shift=True)


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_shift_half(backend, dtype):
    _check_against_reference(backend, (2, 16, 5, 5), 4, dtype, False, True, shift=True)
    _check_against_reference(backend, (2, 16, 5, 5), 4, dtype, True, True, shift=True)


@pytest.mark.slow
@pytest.mark.parametrize("backend", _backend_params(large=True))
@pytest.mark.parametrize("shape,G", [((1, 128, 32, 32), 32), ((16, 256, 4, 4), 32), ((4, 64, 40, 40), 32),
                                     ((1, 64, 96, 96), 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_shift_unet_shapes(backend, shape, G, channels_last):
    # Both task plans of the C++ kernel: whole groups / samples per task, and split (a batch of
    # one in channels_last, groups of more than 32768 elements).
    _check_against_reference(backend, shape, G, torch.float32, channels_last, True, shift=True)


def test_triton_split_covered():
    # The Triton kernels slice each group's reduction over several programs (so that a batch of one
    # fills a large GPU) and combine the slices in a second step: SMALL must keep exercising that.
    from conftest import TRITON_OK

    if not TRITON_OK:
        pytest.skip("triton is not importable here")
    assert "triton" in BACKENDS, "triton imports but is not among the backends tested"
    from fastddpm.triton_kernels.group_norm_silu import _geometry

    for shape, G in TRITON_SPLIT:
        assert (shape, G) in SMALL
        split = _geometry(torch.empty(shape), G)[6]
        assert split > 1, f"{shape}: the Triton reduction is no longer split ({split})"
    # The U-Net's batch-1 shapes give a large GPU hundreds of programs, not one per (n, group).
    for shape in [(1, 128, 32, 32), (1, 256, 16, 16)]:
        N, C, HW, D, _, _, split, s_per = _geometry(torch.empty(shape), 32)
        assert N * 32 * split >= 256 and (split - 1) * s_per < HW <= split * s_per


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("shape,G,channels_last", [((1, 1, 184, 184), 1, False),  # C++: NCHW split plan
                                                   ((1, 8, 16, 16), 2, True),       # C++: channels_last split
                                                   ((4, 8, 6, 6), 2, True)])        # C++: fused plans
def test_offset_and_outlier_first_element(backend, shape, G, channels_last):
    # Sums shifted by a value taken from the group lose precision as ((mean - shift) / sigma)^2 grows:
    # a common offset of 30 standard deviations, and each channel's first element 40 standard
    # deviations above the rest (a one-element shift would cost ~1e-4 here), must stay at fp32's 1e-5.
    g = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=g, dtype=torch.float64) + 30.0
    x.view(shape[0], shape[1], -1)[:, :, 0] += 40.0
    x = x.float()
    if channels_last:
        x = _channels_last(x)
    w = torch.randn(shape[1], generator=g) * 0.5 + 1.0
    b = torch.randn(shape[1], generator=g)
    ref = reference.group_norm_silu(x.double(), w.double(), b.double(), G, 1e-5, True)[0]
    y = group_norm_silu(x, G, w, b, backend=backend)
    assert rel_err(y, ref) <= FP32_RTOL, rel_err(y, ref)


@pytest.mark.parametrize("backend", _backend_params())
def test_no_affine(backend):
    _check_against_reference(backend, (2, 12, 5, 3), 3, torch.float32, False, True, affine=False)
    _check_against_reference(backend, (2, 12, 5, 3), 3, torch.float32, True, False, affine=False)


@pytest.mark.slow
@pytest.mark.parametrize("backend", _backend_params(large=True))
@pytest.mark.parametrize("shape,G", LARGE)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unet_shapes(backend, shape, G, channels_last, dtype):
    _check_against_reference(backend, shape, G, dtype, channels_last, True)


# ---------------------------------------------------------------------------
# On a GPU (skipped where none exists): the CUDA C++ and Triton kernels on the device.
# ---------------------------------------------------------------------------
GPU_SHAPES = [((1, 128, 32, 32), 32), ((1, 256, 16, 16), 32), ((16, 256, 4, 4), 32), ((2, 16, 5, 5), 4),
              ((1, 32, 1, 1), 32), ((2, 6, 13), 3), ((1, 8, 3, 5, 4), 2), ((1, 64, 96, 96), 2)]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape,G", GPU_SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_backends_against_reference(backend, shape, G, channels_last, dtype):
    # Forward and the x, weight, bias gradients; the shift's too, in fp32.
    dev = torch.device("cuda")
    _check_against_reference(backend, shape, G, dtype, channels_last, True, device=dev)
    if dtype == torch.float32:
        _check_against_reference(backend, shape, G, dtype, channels_last, False, shift=True, device=dev)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_backends_deterministic(backend, channels_last):
    # No float atomics in the result path: the same call gives the same bits.
    x, w, b, dy = (t.cuda() for t in _inputs((1, 128, 32, 32), torch.float32, channels_last))
    runs = [_run(lambda xx, ww, bb: group_norm_silu(xx, 32, ww, bb, backend=backend), x, w, b, dy, torch.float32)
            for _ in range(2)]
    for a, b_ in zip(*runs):
        assert torch.equal(a, b_)


def _empty_case(backend, shape, G, device):
    """An input without elements (no sample, no channel, or no position): the statistics are those of an
    empty group (mean 0, rstd 1 / sqrt(eps), as the CPU kernel has them), x's gradient is empty and the
    weight and bias gradients are sums over nothing, zeros. The outputs are poisoned (NaN-filled when
    allocated), so a kernel that leaves them unwritten fails."""
    C, eps = shape[1], 1e-5
    x = torch.randn(shape, device=device, requires_grad=True)
    w = torch.randn(C, device=device, requires_grad=True)
    b = torch.randn(C, device=device, requires_grad=True)
    y = group_norm_silu(x, G, w, b, eps=eps, backend=backend)
    assert y.shape == x.shape
    dx, dw, db = torch.autograd.grad(y, (x, w, b), torch.randn_like(y))
    assert dx.shape == x.shape
    assert torch.equal(dw.cpu(), torch.zeros(C)) and torch.equal(db.cpu(), torch.zeros(C))
    if backend == "triton":
        from fastddpm.triton_kernels.group_norm_silu import group_norm_silu_triton

        _, mean, rstd = group_norm_silu_triton(x.detach(), w.detach(), b.detach(), G, eps, True)
    elif backend in ("cpu", "cuda"):
        _, mean, rstd = torch.ops.fastddpm.group_norm_silu_fwd(x.detach(), w.detach(), b.detach(), None, G, eps, True)
    else:
        _, mean, rstd = reference.group_norm_silu(x.detach(), w.detach(), b.detach(), G, eps, True)
    assert mean.shape == rstd.shape == (shape[0], G)
    assert torch.equal(mean.cpu(), torch.zeros(shape[0], G))
    assert torch.equal(rstd.cpu(), torch.full((shape[0], G), 1 / eps**0.5))


EMPTY = [((2, 0, 3, 3), 1), ((0, 4, 3, 3), 2), ((2, 4, 0, 5), 2), ((0, 0, 2), 3)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,G", EMPTY)
def test_empty_inputs(backend, shape, G):
    _empty_case(backend, shape, G, CPU)


@pytest.mark.skipif(not HAS_C, reason="C++ extension not built")
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("shape,G", EMPTY + [((0, 8, 4, 4), 4)])
def test_empty_inputs_torch_backend_as_cpu(shape, G, shift):
    # The torch backend (reference.group_norm_silu, whose reshape could not infer a group's size from a
    # batch of 0) returns what the CPU kernel returns, forward and backward.
    C = shape[1]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    w, b = torch.randn(C, generator=g), torch.randn(C, generator=g)
    s = torch.randn(shape[:2], generator=g) if shift else None
    dy = torch.randn(shape, generator=g)
    outs = {}
    for backend in ("cpu", "torch"):
        leaves = [v.clone().requires_grad_() for v in (x, w, b) + ((s,) if shift else ())]
        y = group_norm_silu(leaves[0], G, leaves[1], leaves[2], backend=backend,
                            shift=leaves[3] if shift else None)
        outs[backend] = (y, *torch.autograd.grad(y, leaves, dy))
    for a, c in zip(outs["cpu"], outs["torch"]):
        assert a.shape == c.shape and a.dtype == c.dtype
        torch.testing.assert_close(c, a, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape,G", EMPTY)
def test_empty_inputs_gpu(backend, shape, G):
    _empty_case(backend, shape, G, torch.device("cuda"))


@pytest.mark.skipif(not HAS_C, reason="C++ extension not built")
def test_weight_dtype_follows_param():
    # fp16 activations with fp32 parameters (mixed precision): grads come back in the parameter dtype.
    x, w, b, dy = _inputs((2, 8, 4, 4), torch.float16, False)
    out = _run(lambda xx, ww, bb: group_norm_silu(xx, 4, ww, bb, backend="cpu"), x, w, b, dy, torch.float32)
    assert out[0].dtype == torch.float16 and out[2].dtype == torch.float32 and out[3].dtype == torch.float32


@pytest.mark.skipif(not HAS_C, reason="C++ extension not built")
def test_noncontiguous_input():
    # An odd stride (a slice over the width) is copied once to NCHW; results still match.
    x, w, b, dy = _inputs((2, 8, 5, 12), torch.float32, False)
    xs = x[..., ::2]
    ref = reference.group_norm_silu(xs.double(), w, b, 4)[0]
    y = group_norm_silu(xs, 4, w.float(), b.float(), backend="cpu")
    assert rel_err(y, ref) <= FP32_RTOL


@pytest.mark.skipif(not HAS_C, reason="C++ extension not built")
@pytest.mark.parametrize("channels_last", [False, True])
def test_deterministic_across_threads(channels_last):
    # Statistics are split in a fixed number of chunks and combined in a fixed order.
    x, w, b, dy = _inputs((1, 64, 40, 40), torch.float32, channels_last)
    old = torch.get_num_threads()
    try:
        res = []
        for n in (1, old if old > 1 else 2):
            torch.set_num_threads(n)
            res.append(_run(lambda xx, ww, bb: group_norm_silu(xx, 32, ww, bb, backend="cpu"),
                            x, w, b, dy, torch.float32))
    finally:
        torch.set_num_threads(old)
    for a, b_ in zip(*res):
        assert torch.equal(a, b_)


@pytest.mark.skipif(not HAS_C, reason="C++ extension not built")
@pytest.mark.parametrize("shape,G", [((2, 4, 3, 3), 2), ((1, 6, 5), 3), ((2, 4, 2, 3, 2), 1),
                                     ((1, 3, 1, 1), 3)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("silu", [True, False])
def test_gradcheck_cpu_kernel(shape, G, channels_last, silu):
    # The C++ kernel also accepts float64 (computing in double) so that gradcheck runs on the kernel
    # itself; the public function routes float64 to the reference, so call the op directly.
    torch.use_deterministic_algorithms(False)
    x, w, b, _ = _inputs(shape, torch.float64, channels_last)
    x.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()

    s = torch.randn(shape[0], shape[1], dtype=torch.float64, requires_grad=True)

    def f(xx, ww, bb, ss=None):
        return torch.ops.fastddpm.group_norm_silu_fwd(xx, ww, bb, ss, G, 1e-5, silu)[0]

    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-5, rtol=1e-4)
    assert torch.autograd.gradcheck(lambda xx: f(xx, None, None), (x,), eps=1e-6, atol=1e-5, rtol=1e-4)
    assert torch.autograd.gradcheck(f, (x, w, b, s), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not HAS_C, reason="C++ extension not built")
@pytest.mark.parametrize("given", ["b", "ws", "s", "bs", "w", "wbs"])
def test_gradcheck_cpu_kernel_with_optionals_left_out(given):
    """needs_input_grad counts only the tensors given: a None weight before a given bias or shift made the
    C++ backward ask past the end ("Index out of range") or return the wrong tensor's gradient."""
    torch.use_deterministic_algorithms(False)
    x, w, b, _ = _inputs((2, 4, 3, 3), torch.float64, False)
    s = torch.randn(2, 4, dtype=torch.float64)
    args = {"w": w, "b": b, "s": s}
    leaves = [x] + [args[k] for k in "wbs" if k in given]
    for t in leaves:
        t.requires_grad_()

    def f(xx, *rest):
        it = iter(rest)
        ww, bb, ss = (next(it) if k in given else None for k in "wbs")
        return torch.ops.fastddpm.group_norm_silu_fwd(xx, ww, bb, ss, 2, 1e-5, True)[0]

    assert torch.autograd.gradcheck(f, tuple(leaves), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not HAS_C, reason="C++ extension not built")
def test_module_without_affine_takes_a_shift_in_training():
    """GroupNormSiLU(affine=False)(x, shift): its backward failed with "Index out of range"."""
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    shift = torch.randn(2, 8, requires_grad=True)
    m = GroupNormSiLU(2, 8, affine=False)
    m(x, shift).square().sum().backward()
    x2, s2 = x.detach().double().requires_grad_(), shift.detach().double().requires_grad_()
    reference.group_norm_silu(x2, None, None, 2, m.eps, True, s2)[0].square().sum().backward()
    assert rel_err(x.grad, x2.grad) < 1e-5 and rel_err(shift.grad, s2.grad) < 1e-5


@pytest.mark.skipif(not HAS_C, reason="C++ extension not built")
def test_double_backward_is_refused_not_zero():
    """The fused backward has no derivative: a gradient penalty through it got zeros (PyTorch only warned
    that no autograd kernel was registered). It is refused, naming the way out; the torch backend does it."""
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="differentiable only once .* use backend='torch'"):
        torch.autograd.grad(group_norm_silu(x, 2, backend="cpu").square().sum(), x, create_graph=True)
    (g,) = torch.autograd.grad(group_norm_silu(x, 2, backend="torch").square().sum(), x, create_graph=True)
    assert torch.autograd.grad(g.square().sum(), x)[0].abs().max() > 0
    (g,) = torch.autograd.grad(group_norm_silu(x, 2, backend="cpu").square().sum(), x)  # first order as before
    assert g.abs().max() > 0


def test_torch_func_takes_the_torch_backend():
    """torch.func.grad through the torch backend equals autograd's gradient against the float64 formula; the C++
    backward is refused by PyTorch there, as the README says."""
    from torch.func import grad

    x = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    m = GroupNormSiLU(2, 8, backend="torch").double()
    g = grad(lambda x: m(x).square().sum())(x)
    xx = x.clone().requires_grad_()
    F.silu(F.group_norm(xx, 2, eps=1e-5)).square().sum().backward()  # the float64 formula, plain autograd
    assert torch.allclose(g, xx.grad, rtol=1e-10, atol=1e-12)
    if HAS_C:
        with pytest.raises(RuntimeError, match="functorch transforms"):
            mc = GroupNormSiLU(2, 8, backend="cpu")
            grad(lambda x: mc(x).sum())(x.float())


@pytest.mark.skipif(not HAS_C, reason="C++ extension not built")
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(channels_last):
    torch.use_deterministic_algorithms(False)
    x, w, b, dy = _inputs((2, 8, 5, 3), torch.float32, channels_last)
    w, b = w.float().requires_grad_(), b.float().requires_grad_()
    x.requires_grad_()
    s = torch.randn(2, 8, requires_grad=True)
    fwd, bwd = torch.ops.fastddpm.group_norm_silu_fwd.default, torch.ops.fastddpm.group_norm_silu_bwd.default
    torch.library.opcheck(fwd, (x, w, b, None, 4, 1e-5, True))
    torch.library.opcheck(fwd, (x, None, None, None, 2, 1e-5, False))
    torch.library.opcheck(fwd, (x, w, b, s, 4, 1e-5, True))
    y, mean, rstd = fwd(x.detach(), w.detach(), b.detach(), None, 4, 1e-5, True)
    torch.library.opcheck(bwd, (dy.float(), x.detach(), None, mean, rstd, w.detach(), b.detach(), 4, True))
    y, mean, rstd = fwd(x.detach(), w.detach(), b.detach(), s.detach(), 4, 1e-5, True)
    torch.library.opcheck(bwd, (dy.float(), x.detach(), s.detach(), mean, rstd, w.detach(), b.detach(), 4, True))
    # The y-only op of calls that record no graph (no_grad, inference).
    infer = torch.ops.fastddpm.group_norm_silu.default
    xd = x.detach()
    torch.library.opcheck(infer, (xd, w.detach(), b.detach(), None, 4, 1e-5, True))
    torch.library.opcheck(infer, (xd, None, None, s.detach(), 2, 1e-5, False))


@pytest.mark.skipif(not HAS_C, reason="C++ extension not built")
def test_saves_only_x_and_stats():
    # The backward recomputes from x: nothing else of x's size is kept for it.
    x, w, b, _ = _inputs((2, 16, 8, 8), torch.float32, False)
    x.requires_grad_()
    w, b = w.float().requires_grad_(), b.float().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        group_norm_silu(x, 4, w, b, backend="cpu")
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()
    assert sum(t.numel() for t in saved) <= x.numel() + 2 * 2 * 4 + 2 * 16


# ---------------------------------------------------------------------------
# The module.
# ---------------------------------------------------------------------------
def test_module_state_dict_matches_group_norm():
    gn = torch.nn.GroupNorm(8, 32)
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
    m = GroupNormSiLU(8, 32)
    assert list(m.state_dict().keys()) == list(gn.state_dict().keys()) == ["weight", "bias"]
    m.load_state_dict(gn.state_dict())
    gn2 = torch.nn.GroupNorm(8, 32)
    gn2.load_state_dict(m.state_dict())
    x = torch.randn(2, 32, 6, 6)
    torch.testing.assert_close(m(x), F.silu(gn(x)), rtol=1e-5, atol=1e-5)
    plain = GroupNormSiLU(8, 32, activation=None)
    plain.load_state_dict(gn.state_dict())
    torch.testing.assert_close(plain(x), gn(x), rtol=1e-5, atol=1e-5)
    na = GroupNormSiLU(4, 8, affine=False)
    assert na.weight is None and na.bias is None and list(na.state_dict()) == []
    torch.testing.assert_close(na(x[:, :8]), F.silu(F.group_norm(x[:, :8], 4)), rtol=1e-5, atol=1e-5)
    assert "activation='silu'" in repr(m)


def test_module_from_group_norm_shares_parameters():
    gn = torch.nn.GroupNorm(4, 16)
    m = GroupNormSiLU.from_group_norm(gn)
    assert m.weight is gn.weight and m.bias is gn.bias


@pytest.mark.slow
@pytest.mark.skipif(not HAS_C, reason="C++ extension not built")
def test_torch_compile_fullgraph():
    torch.use_deterministic_algorithms(False)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), GroupNormSiLU(4, 16),
                              torch.nn.Conv2d(16, 16, 3, padding=1), GroupNormSiLU(4, 16, activation=None))
    x = torch.randn(2, 8, 6, 6)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.square().sum().backward()
    g_comp = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    y_ref = net(x)
    y_ref.square().sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(g_comp, [p.grad for p in net.parameters()]):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)
    # And with inductor, forward only (inductor's C++ compile is slow on this machine).
    y2 = torch.compile(net, fullgraph=True)(x)
    torch.testing.assert_close(y2, y_ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Bad inputs.
# ---------------------------------------------------------------------------
def test_bad_inputs():
    x = torch.randn(2, 12, 4, 4)
    with pytest.raises(ValueError, match="num_groups.*divisible"):
        group_norm_silu(x, 5)
    with pytest.raises(ValueError, match="weight: expected shape \\(12,\\)"):
        group_norm_silu(x, 4, torch.ones(6))
    with pytest.raises(ValueError, match="bias: expected shape"):
        group_norm_silu(x, 4, torch.ones(12), torch.ones(12, 1))
    with pytest.raises(ValueError, match="weight: expected device"):
        group_norm_silu(x, 4, torch.ones(12, device="meta"))
    with pytest.raises(ValueError, match="x: expected shape \\(N, C, \\*spatial\\)"):
        group_norm_silu(torch.randn(12), 4)
    with pytest.raises(TypeError, match="x: expected dtype"):
        group_norm_silu(x.to(torch.int32), 4)
    with pytest.raises(ValueError, match="activation"):
        group_norm_silu(x, 4, activation="relu")
    with pytest.raises(ValueError, match="num_groups: expected a positive"):
        group_norm_silu(x, 0)
    with pytest.raises(ValueError, match="backend"):
        group_norm_silu(x, 4, backend="nope")
    with pytest.raises(ValueError, match="shift: expected shape \\(2, 12\\)"):
        group_norm_silu(x, 4, shift=torch.ones(2, 12, 1))
    with pytest.raises(ValueError, match="shift: expected device"):
        group_norm_silu(x, 4, shift=torch.ones(2, 12, device="meta"))
    with pytest.raises(TypeError, match="shift: expected a floating-point"):
        group_norm_silu(x, 4, shift=torch.ones(2, 12, dtype=torch.int64))
    with pytest.raises(ValueError, match="num_groups"):
        GroupNormSiLU(5, 12)
    with pytest.raises(ValueError, match="x: expected 12 channels"):
        GroupNormSiLU(4, 12)(torch.randn(2, 8, 3, 3))
    if HAS_C:
        # The C++ op checks too (a direct torch.ops call bypasses the Python checks).
        with pytest.raises(ValueError, match="num_groups: the number of channels C=12"):
            torch.ops.fastddpm.group_norm_silu_fwd(x, None, None, None, 5, 1e-5, True)
        with pytest.raises(ValueError, match="weight: expected shape"):
            torch.ops.fastddpm.group_norm_silu_fwd(x, torch.ones(3), None, None, 4, 1e-5, True)
        with pytest.raises(ValueError, match="shift: expected shape \\(2, 12\\)"):
            torch.ops.fastddpm.group_norm_silu_fwd(x, None, None, torch.ones(12), 4, 1e-5, True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_backend_on_cpu_tensor_says_why():
    with pytest.raises(BackendNotSupported, match="cuda"):
        group_norm_silu(torch.randn(1, 4, 2, 2), 2, backend="cuda")


def test_float64_routes_to_reference():
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    y = group_norm_silu(x, 2)
    torch.testing.assert_close(y, F.silu(F.group_norm(x, 2)))
    assert fastddpm.ops.group_norm_silu is group_norm_silu


def test_backends_tested():
    # The CPU tests here run every backend backends_for(CPU) names (BACKENDS); a backend that stopped resolving
    # would drop out of them silently. (On a GPU the tests name cuda and triton themselves.)
    assert_backends_tested("group_norm_silu_fwd")
