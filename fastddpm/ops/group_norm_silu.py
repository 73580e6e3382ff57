"""group_norm_silu: GroupNorm then SiLU (or plain GroupNorm), fused, optionally of x + shift.

y = silu(group_norm(x + shift[:, :, None, None], num_groups, weight, bias, eps)). The optional
per-(sample, channel) shift is the DDPM ResNet block's time-embedding add, which the fused op absorbs
instead of making its own pass over memory.

The statistics are per-(n, group) mean and rstd in fp32; the normalise, affine and SiLU write straight
into the output. The backward recomputes the normalised values from x and the saved (N, G) mean/rstd,
so training keeps nothing of x's size besides x itself (eager keeps the GroupNorm output too).

Backward, with u = x + shift, z = w * xhat + b, y = silu(z), per (n, c) sums over the spatial
positions A = sum dz, B = sum dz * xhat, and M = (C / G) * spatial elements per group:

    dz      = dy * sigmoid(z) * (1 + z * (1 - sigmoid(z)))
    dbias   = sum_n A,   dweight = sum_n B
    dx      = rstd * (w dz - (sum_{c in g} w A) / M - xhat (sum_{c in g} w B) / M)
    dshift  = sum over the spatial positions of dx
"""

from __future__ import annotations

import torch

from . import _dispatch, _library, reference

_OP = "group_norm_silu_fwd"
_ACTIVATIONS = ("silu", None)


def _check(x, num_groups, weight, bias, eps, activation, shift=None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"x: expected dtype float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x: expected shape (N, C, *spatial), got {x.dim()}-D shape {tuple(x.shape)}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int):
        raise TypeError(f"num_groups: expected an int, got {type(num_groups).__name__}")
    C = x.shape[1]
    if num_groups <= 0:
        raise ValueError(f"num_groups: expected a positive int, got {num_groups}")
    if C % num_groups != 0:
        raise ValueError(
            f"num_groups: the number of channels C={C} of x must be divisible by num_groups={num_groups}"
        )
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(p).__name__}")
        if p.shape != (C,):
            raise ValueError(f"{name}: expected shape ({C},) (one per channel of x), got {tuple(p.shape)}")
        if p.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (that of x), got {p.device}")
        if not p.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a floating-point dtype, got {p.dtype}")
    if shift is not None:
        if not isinstance(shift, torch.Tensor):
            raise TypeError(f"shift: expected a torch.Tensor or None, got {type(shift).__name__}")
        if shift.shape != x.shape[:2]:
            raise ValueError(f"shift: expected shape ({x.shape[0]}, {C}) (one per sample and channel of x), "
                             f"got {tuple(shift.shape)}")
        if shift.device != x.device:
            raise ValueError(f"shift: expected device {x.device} (that of x), got {shift.device}")
        if not shift.dtype.is_floating_point:
            raise TypeError(f"shift: expected a floating-point dtype, got {shift.dtype}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"eps: expected a non-negative float, got {eps!r}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation: expected 'silu' or None, got {activation!r}")


def _records_grad(x, weight, bias, shift) -> bool:
    # Whether autograd will record this call (else the statistics need not be returned).
    return torch.is_grad_enabled() and (
        x.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
        or (shift is not None and shift.requires_grad)
    )


def _limit(b: str, ndim: int, dtype: torch.dtype, device: torch.device) -> str | None:
    if b == "triton" and ndim > 5:
        return "the Triton kernel takes at most 3 spatial dimensions"
    return None


_dispatch.LIMITS[_OP] = _limit


def group_norm_silu(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = "silu",
    backend: str = "auto",
    *,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """silu(group_norm(x + shift, num_groups, weight, bias, eps)), fused; differentiable.

    Args:
        x: (N, C, *spatial), float32/float16/bfloat16 (float64 runs the reference),
            NCHW-contiguous or channels_last (other strides are copied once).
        num_groups: G, dividing C.
        weight, bias: per-channel affine, shape (C,), or None.
        eps: added to the variance.
        activation: "silu", or None for plain GroupNorm.
        backend: "auto", "cpu", "cuda", "triton" or "torch".
        shift: optional (N, C) tensor added to x per sample and channel before normalising (the
            ResNet block's time-embedding add); differentiable. The C++ kernels add it in fp32; the
            Triton backend adds it in x's dtype before its kernel, as eager ``x + temb`` does (in bfloat16
            a large shift then costs x's low bits).

    Returns:
        y, same shape, dtype and memory format as x. Statistics are fp32 for any input dtype.
    """
    if activation == "silu":
        silu = True
    elif activation is None:
        silu = False
    else:
        raise ValueError(f"activation: expected 'silu' or None, got {activation!r}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    b = _dispatch.resolve(_OP, backend, x.device, x.dtype, x.dim())
    if b != "cpu" or type(num_groups) is not int or type(eps) is not float:
        # On the CPU path the C++ op checks every argument (with the same TypeError / ValueError
        # messages), so Python repeats nothing there: small U-Net shapes are call-overhead bound.
        _check(x, num_groups, weight, bias, eps, activation, shift)
        eps = float(eps)
    if b == "cpu" or b == "cuda":
        try:
            if _records_grad(x, weight, bias, shift):
                return _C_FWD(x, weight, bias, shift, num_groups, eps, silu)[0]
            return _C_INFER(x, weight, bias, shift, num_groups, eps, silu)
        except (AttributeError, RuntimeError, TypeError):
            # A list for weight fails in _records_grad or the schema's parser, naming no argument: the
            # Python checks name it (free until something fails).
            _check(x, num_groups, weight, bias, eps, activation, shift)
            raise
    if b == "torch":
        return reference.group_norm_silu(x, weight, bias, num_groups, eps, silu, shift)[0]
    # The Triton kernel has no shift input: one extra (differentiable) add, in x's dtype as the eager block's
    # x + temb is (the C++ kernels add in fp32 inside).
    if shift is not None:
        x = x + shift.to(x.dtype).reshape(shift.shape + (1,) * (x.dim() - 2))
    return _triton_fwd()(x, weight, bias, num_groups, eps, silu)[0]


# ---------------------------------------------------------------------------
# Registrations of the C++ op (schemas in csrc/ops.cpp): fake and autograd.
# ---------------------------------------------------------------------------
def _fwd_fake(x, weight, bias, shift, num_groups, eps, silu):
    # Meta tensors reach here instead of a kernel (a meta weight makes the dispatcher pick the fake
    # implementation for the whole call), so the arguments are checked here too.
    _check(x, num_groups, weight, bias, eps, "silu" if silu else None, shift)
    y = _like_layout(x)
    stats = x.new_empty((x.shape[0], num_groups), dtype=_stat_dtype(x))
    return y, stats, torch.empty_like(stats)


def _bwd_fake(grad_y, x, shift, mean, rstd, weight, bias, num_groups, silu):
    dx = _like_layout(x)
    dw = weight.new_empty(weight.shape) if weight is not None else x.new_empty(0)
    db = bias.new_empty(bias.shape) if bias is not None else x.new_empty(0)
    ds = shift.new_empty(shift.shape) if shift is not None else x.new_empty(0)
    return dx, dw, db, ds


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _is_channels_last(x: torch.Tensor) -> bool:
    # (N, *spatial, C) dense, for any spatial rank (channels_last, channels_last_3d, NLC).
    return x.dim() >= 3 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous()


def _like_layout(x: torch.Tensor) -> torch.Tensor:
    # The kernels write in x's layout when it is NCHW-contiguous or channels_last, else NCHW.
    if x.is_contiguous() or _is_channels_last(x):
        return torch.empty_like(x)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _setup(ctx, inputs, output):
    x, weight, bias, num_groups, eps, silu = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, mean, rstd, weight, bias)
    ctx.num_groups, ctx.silu = num_groups, silu
    ctx.mark_non_differentiable(mean, rstd)


def _make_backward(bwd):
    def backward(ctx, grad_y, grad_mean, grad_rstd):
        x, mean, rstd, weight, bias = ctx.saved_tensors
        dx, dw, db = bwd(grad_y, x, mean, rstd, weight, bias, ctx.num_groups, ctx.silu)
        return (dx if ctx.needs_input_grad[0] else None,
                dw if weight is not None and ctx.needs_input_grad[1] else None,
                db if bias is not None and ctx.needs_input_grad[2] else None,
                None, None, None)

    return backward


_TRITON_REGISTERED = False


def _triton_fwd():
    # The Triton ops (torch.library.triton_op) register on first use, with the same autograd.
    global _TRITON_REGISTERED
    from ..triton_kernels.group_norm_silu import group_norm_silu_triton, group_norm_silu_triton_bwd

    if not _TRITON_REGISTERED:
        torch.library.register_autograd(
            "fastddpm::group_norm_silu_triton_fwd", _make_backward(group_norm_silu_triton_bwd),
            setup_context=_setup,
        )
        _TRITON_REGISTERED = True
    return group_norm_silu_triton


# The C++ op's autograd is registered in C++ (csrc/autograd.cpp); here only its fake implementations.
_C_FWD = _C_INFER = None
if _library.has_c() and hasattr(torch.ops.fastddpm, "group_norm_silu_fwd"):
    _C_FWD = torch.ops.fastddpm.group_norm_silu_fwd.default
    _C_INFER = torch.ops.fastddpm.group_norm_silu.default
    torch.library.register_fake("fastddpm::group_norm_silu_fwd")(_fwd_fake)
    torch.library.register_fake("fastddpm::group_norm_silu")(lambda *a: _fwd_fake(*a)[0])
    torch.library.register_fake("fastddpm::group_norm_silu_bwd")(_bwd_fake)

__all__ = ["group_norm_silu"]
