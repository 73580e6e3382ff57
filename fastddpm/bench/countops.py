"""The GPU cost proxy a GPU-less machine can measure: operators dispatched, the kernels they launch, the bytes
they allocate and the bytes their kernels read and write (CountOps).

On a GPU every aten operator that reaches a kernel is (at least) one launch, and every tensor it returns
is memory written and later read; counting both per denoising step or per training step predicts where a
fused implementation saves launches and traffic, independent of the machine's load. A fastddpm op is one
operator to the dispatcher but may launch several kernels, each a pass over memory: PASSES says which.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# The kernels of each fastddpm op, pass by pass: (reads, writes), each a {tensor: multiple} of the sizes of the
# op's arguments (by schema name) and outputs ("out0", "out1", ...). A tensor of the op's that no pass names
# (timesteps, schedule tables, weights, mean/rstd: small) is read once in the first pass or written once in
# the last. The passes are the GPU kernels `auto` runs on CUDA tensors (CUDA C++ and Triton make the same
# passes), except ddpm_step_randn, which is CPU only. declare_passes() adds an op (tests use it).
PASSES: dict[str, list[tuple[dict, dict]]] = {
    # csrc/cuda/q_sample.cu (one launch), triton_kernels/q_sample.py (one), csrc/cpu/q_sample.cpp (one loop)
    "fastddpm::q_sample": [({"x0": 1, "noise": 1}, {"out0": 1, "out1": 1})],
    # csrc/cuda/ddpm_step.cu:73, triton_kernels/ddpm_step.py (one launch); noise None in Philox mode
    "fastddpm::ddpm_step": [({"sample": 1, "model_output": 1, "noise": 1, "predicted_variance": 1},
                             {"out0": 1, "out1": 1})],
    # csrc/cpu/ddpm_step.cpp, ddpm_step_randn on 2+ threads: torch's normal_ writes z (sample's size), while the
    # posterior mean pass reads sample and model_output and writes out0; then out0 += sigma z rereads both
    "fastddpm::ddpm_step_randn": [({}, {"sample": 1}), ({"sample": 1, "model_output": 1}, {"out0": 1, "out1": 1}),
                                  ({"sample": 1, "out0": 1}, {"out0": 1})],
    # csrc/cuda/ddpm_step.cu:83 (philox_normal_kernel), one launch writing out
    "fastddpm::philox_normal_": [({}, {"out": 1})],
    "fastddpm::philox_bits_": [({}, {"out": 1})],
    # csrc/cuda/ddim_step.cu and csrc/cuda/dpmpp_step.cu: one launch each (triton_kernels: one each)
    "fastddpm::ddim_step": [({"sample": 1, "model_output": 1, "noise": 1}, {"out0": 1, "out1": 1})],
    "fastddpm::dpmpp_step": [({"sample": 1, "model_output": 1, "prev_x0": 1}, {"out0": 1, "out1": 1})],
    # csrc/cuda/group_norm_silu.cu launch_group_norm_silu_fwd (triton_kernels/group_norm_silu.py the same):
    # stats_partial_kernel reads x, stats_final_kernel reduces the partial sums, fwd_apply_kernel reads x
    # again and writes y: 3 launches, x read twice
    "fastddpm::group_norm_silu": [({"x": 1}, {}), ({}, {}), ({"x": 1}, {"out0": 1})],
    "fastddpm::group_norm_silu_fwd": [({"x": 1}, {}), ({}, {}), ({"x": 1}, {"out0": 1})],
    # launch_group_norm_silu_bwd: bwd_partial_kernel reads x and dy, bwd_coef_kernel (Triton: torch sums)
    # folds the per-channel sums, bwd_apply_kernel reads x and dy again and writes dx
    "fastddpm::group_norm_silu_bwd": [({"x": 1, "grad_y": 1}, {}), ({}, {}),
                                      ({"x": 1, "grad_y": 1}, {"out0": 1})],
    # ATen's own GroupNorm on CUDA makes the same passes (aten/src/ATen/native/cuda/group_norm_kernel.cu):
    # forward RowwiseMomentsCUDAKernel reads x, ComputeFusedParamsCUDAKernel folds the statistics, the
    # elementwise apply reads x again and writes y; backward ComputeInternalGradientsCUDAKernel reads dy and x,
    # ComputeBackwardFusedParamsCUDAKernel folds them, the dx kernel reads dy and x again, GammaBetaBackward
    # reduces the per-channel sums
    "aten::native_group_norm": [({"input": 1}, {}), ({}, {}), ({"input": 1}, {"out0": 1})],
    "aten::native_group_norm_backward": [({"grad_out": 1, "input": 1}, {}), ({}, {}),
                                         ({"grad_out": 1, "input": 1}, {"out0": 1}), ({}, {})],
}


def declare_passes(op: str, passes: list[tuple[dict, dict]]) -> None:
    """Charge the operator ``op`` ("namespace::name") these passes from now on."""
    PASSES[op] = passes


def min_bytes(op: str, shape, itemsize: int = 4, *, v: bool = False, noise_tensor: bool = False,
              backward: bool = False) -> int:
    """The bytes ``op`` must move at least on tensors of ``shape``: its large inputs read once and outputs
    written once, whatever the implementation (GB/s is counted against it, and a bound row copies it).

    q_sample: x0 and the noise read, x_t (and v) written; ddpm_step and ddim_step: the sample and the
    model output read (and the noise, as a tensor), the previous sample written; dpmpp_step: the same
    with the previous x0 read; group_norm_silu: x read, y written (backward: x and dy read, dx written);
    attention over (B, H, N, d): q, k, v read, o written (backward: q, k, v, o, do read, dq, dk, dv written).
    """
    n = math.prod(shape) * itemsize
    sizes = {"q_sample": 4 if v else 3, "ddpm_step": 4 if noise_tensor else 3, "ddim_step": 4 if noise_tensor else 3,
             "dpmpp_step": 4, "group_norm_silu": 5 if backward else 2, "attention": 12 if backward else 4}
    if op not in sizes:
        raise ValueError(f"op: expected one of {', '.join(sizes)}, got {op!r}")
    return sizes[op] * n


def _outputs(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


class CountOps(TorchDispatchMode):
    """Counts, operator by operator: ``ops`` (every aten operator, views included) and ``names`` (per
    operator); ``kernels`` (the operators that are not pure views, which launch nothing on a GPU: detach,
    expand, reshape without a copy, ...; a fastddpm op counts its launches, PASSES); ``bytes`` (of the
    tensors that non-aliasing operators return: memory allocated); and the memory traffic, kernel by kernel
    (no cache reuse between kernels: what a GPU does for tensors larger than its cache): a kernel reads its
    distinct tensor inputs once and writes its outputs once, except the ops of PASSES, charged pass by pass.
    ``read`` and ``written`` sum over the block; ``per_op`` keeps (name, read, written) in order."""

    def __init__(self):
        super().__init__()
        self.ops = self.kernels = self.bytes = self.read = self.written = 0
        self.names: dict[str, int] = {}
        self.per_op: list[tuple[str, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops += 1
        name = str(func.overloadpacket)
        self.names[name] = self.names.get(name, 0) + 1
        schema = func._schema
        if any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns):
            return out  # a view
        outs = {f"out{i}": o for i, o in enumerate(_outputs(out)) if isinstance(o, torch.Tensor)}
        if all(r.alias_info is None for r in schema.returns):  # not in place: allocated
            self.bytes += sum(o.numel() * o.element_size() for o in outs.values())
        named = dict(zip((a.name for a in schema.arguments), args), **kwargs)
        tensors = {k: v for k, v in named.items() if isinstance(v, torch.Tensor)}
        listed = [x for v in named.values() if isinstance(v, (list, tuple)) for x in v if isinstance(x, torch.Tensor)]
        size = {k: _span_bytes(v) for k, v in {**tensors, **outs}.items()}
        passes = PASSES.get(schema.name)
        if passes is None:  # one kernel: every distinct input read once, every output written once
            seen: dict[int, int] = {}
            for x in [*tensors.values(), *listed]:
                seen.setdefault(id(x), _span_bytes(x))
            r, w = sum(seen.values()), sum(size[k] for k in outs)
            kernels = 1
        else:
            named_r = {k for rd, _ in passes for k in rd}
            named_w = {k for _, wr in passes for k in wr}
            r = sum(m * size.get(k, 0) for rd, _ in passes for k, m in rd.items())
            r += sum(size[k] for k in tensors if k not in named_r and k not in named_w)  # small: once
            w = sum(m * size.get(k, 0) for _, wr in passes for k, m in wr.items())
            w += sum(size[k] for k in outs if k not in named_w)
            kernels = len(passes)
        self.kernels += kernels
        self.read += r
        self.written += w
        self.per_op.append((name, r, w))
        return out


def count(fn: Callable[[], object], grad: bool = False) -> CountOps:
    """Run ``fn`` once under CountOps (under no_grad unless ``grad``: a training step needs autograd), after
    one uncounted call, so that one-time state (optimizer moments, cached schedule scalars, the U-Net's time
    projections) is not charged to the counted call."""
    with torch.set_grad_enabled(grad):
        fn()
        with CountOps() as c:
            fn()
    return c


def _span_bytes(t: torch.Tensor) -> int:
    """Bytes of memory a tensor view covers (a broadcast stride-0 view counts its elements once)."""
    if t.numel() == 0:
        return 0
    span = 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()) if s > 1)
    return min(t.numel(), span) * t.element_size()


def flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call (torch.utils.flop_counter: matmuls and convolutions, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())
