"""torch.library.opcheck over every registered fastddpm op, from one set of sample inputs per op.

opcheck runs each op under its schema's checks (no argument mutated that the schema says is not, no output
aliasing an input), against its fake (shapes, dtypes, strides of the fake equal the kernel's), through
AOTAutograd, and checks that its autograd registration is where torch expects it. The same sample inputs
call the C++ op (CPU kernel) and its Triton twin (fastddpm::<op>_triton, run by Triton's interpreter here:
its fake trace cannot read a tensor under the interpreter, so the Triton ops get the schema and autograd
registration checks only).
"""

from __future__ import annotations

import pytest
import torch
from _utils import stable_seed

from fastddpm import NoiseSchedule, ops
from fastddpm.ops import _codes, _library

pytestmark = pytest.mark.skipif(not _library.has_c(), reason="fastddpm._C not built")

SCHED = NoiseSchedule()  # linear, 1000 steps (Ho et al.)


def _t(*vals):
    return torch.tensor(vals, dtype=torch.int64)


def sample_inputs(op: str, layout: str) -> tuple:
    """Arguments of fastddpm::<op> (the schema of csrc/ops.cpp) on 2 samples of 3x4x4: ``layout``
    "contiguous" or "channels_last"."""
    g = torch.Generator().manual_seed(stable_seed(op, layout))

    def rnd(*shape, grad=False):
        x = torch.randn(*shape, generator=g)
        if layout == "channels_last" and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x.requires_grad_(grad)

    ac = SCHED.table("alphas_cumprod", "cpu", torch.float32)
    sab = SCHED.table("sqrt_alphas_cumprod", "cpu", torch.float32)
    s1m = SCHED.table("sqrt_one_minus_alphas_cumprod", "cpu", torch.float32)
    x, m = rnd(2, 3, 4, 4), rnd(2, 3, 4, 4)
    eps = _codes.PREDICTION_TYPES["epsilon"]
    if op == "q_sample":
        return (rnd(2, 3, 4, 4, grad=True), rnd(2, 3, 4, 4, grad=True), _t(10, 900), sab, s1m, True)
    if op == "ddpm_step":
        return (x, m, _t(500, 20), _t(499, 19), ac, rnd(2, 3, 4, 4), None, 0, 0, _codes.NOISE_TENSOR, eps,
                _codes.VARIANCE_TYPES["fixed_small"], 1.0, True)
    if op == "ddim_step":
        return (x, m, _t(500, 20), _t(480, 0), ac, 1.0, rnd(2, 3, 4, 4), 0, 0, _codes.NOISE_TENSOR, eps, 0.5, 1.0,
                True, True)
    if op == "dpmpp_step":
        return (x, m, rnd(2, 3, 4, 4), _t(500, 500), _t(480, 480), _t(520, 520), ac, eps, 1.0, True)
    if op == "group_norm_silu_fwd":
        return (rnd(2, 8, 4, 4, grad=True), rnd(8, grad=True), rnd(8, grad=True), None, 4, 1e-5, True)
    if op == "group_norm_silu":
        return (rnd(2, 8, 4, 4), rnd(8), rnd(8), None, 4, 1e-5, True)
    if op == "group_norm_silu_bwd":
        xx, w, b = rnd(2, 8, 4, 4), rnd(8), rnd(8)
        _, mean, rstd = torch.ops.fastddpm.group_norm_silu_fwd(xx, w, b, None, 4, 1e-5, True)
        return (rnd(2, 8, 4, 4), xx, None, mean, rstd, w, b, 4, True)
    if op == "attention":
        q, k, v = (torch.randn(2, 1, 16, 8, generator=g).requires_grad_() for _ in range(3))
        return (q, k, v, 8 ** -0.5)
    raise ValueError(op)


CPP_OPS = ["q_sample", "ddpm_step", "ddim_step", "dpmpp_step", "group_norm_silu_fwd", "group_norm_silu",
           "group_norm_silu_bwd"]
LAYOUTS = ["contiguous", "channels_last"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", CPP_OPS)
def test_opcheck_cpp_op(op, layout):
    torch.library.opcheck(getattr(torch.ops.fastddpm, op).default, sample_inputs(op, layout))


def test_every_schema_is_opchecked():
    """The list above covers csrc/ops.cpp's schemas (the Philox fillers and the CPU randn step aside: they
    draw from a generator, so two calls cannot be compared, and test_ddpm_step checks them)."""
    import os
    import re

    with open(os.path.join(os.path.dirname(__file__), "..", "csrc", "ops.cpp")) as f:
        names = set(re.findall(r'"(\w+)\(', f.read()))
    assert names - set(CPP_OPS) == {"ddpm_step_randn", "philox_normal_", "philox_bits_"}


TRITON_OPS = {"q_sample": "q_sample_triton", "ddpm_step": "ddpm_step_triton", "ddim_step": "ddim_step_triton",
              "dpmpp_step": "dpmpp_step_triton", "attention": "attention_triton_fwd"}


@pytest.mark.parametrize("op", sorted(TRITON_OPS))
def test_opcheck_triton_op(op):
    from fastddpm.ops import _dispatch

    if _dispatch.backend_unavailable_reason("triton", op, torch.device("cpu")) is not None:
        pytest.skip("Triton cannot run here")
    _dispatch.implementation(op, "triton")  # imports the module, registering the triton_op
    if op == "attention":
        import fastddpm.triton_kernels.attention  # noqa: F401
    fn = getattr(torch.ops.fastddpm, TRITON_OPS[op]).default
    torch.library.opcheck(fn, sample_inputs(op, "contiguous"),
                          test_utils=("test_schema", "test_autograd_registration"))


def test_opcheck_fails_on_a_wrong_fake():
    """opcheck is not a formality: a fake that returns the wrong shape is caught."""
    lib = torch.library.Library("fastddpm_opcheck_probe", "DEF")
    lib.define("twice(Tensor x) -> Tensor")
    lib.impl("twice", lambda x: x * 2, "CPU")
    torch.library.register_fake("fastddpm_opcheck_probe::twice", lambda x: x.new_empty(x.shape[0]), lib=lib)
    try:
        with pytest.raises(Exception):  # noqa: B017 (opcheck raises OpCheckError, not exported by torch)
            torch.library.opcheck(torch.ops.fastddpm_opcheck_probe.twice.default, (torch.randn(3, 2),))
    finally:
        lib._destroy()


def test_attention_public_function_matches_reference_on_shared_inputs():
    """The shared attention inputs are valid ones: the public op on them is softmax(QK^T/sqrt(d)) V."""
    q, k, v, scale = sample_inputs("attention", "contiguous")
    ref = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * scale, -1) @ v.double()
    assert torch.allclose(ops.attention(q, k, v).double(), ref, atol=1e-5)
