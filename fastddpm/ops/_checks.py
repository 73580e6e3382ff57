"""Argument checks of the public op functions: errors name the argument."""

from __future__ import annotations

import math
import numbers
import operator

import numpy as np
import torch

from ..schedule import NoiseSchedule, check_number
from ..schedule import check_device as check_device  # defined there (schedule.py checks with both), exported here
from ._codes import PREDICTION_TYPES

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(x, name: str, min_dim: int = 1) -> torch.Tensor:
    """``x`` if it is a float32/float16/bfloat16/float64 tensor of at least ``min_dim`` dimensions, else a
    TypeError/ValueError naming ``name``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{name}: expected at least {min_dim} dimension(s), got shape {tuple(x.shape)}")
    return x


def check_like(x, ref: torch.Tensor, name: str, ref_name: str) -> torch.Tensor:
    """``x`` if it is a tensor of ``ref``'s shape, device and dtype, else an error naming ``name`` and
    ``ref_name``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.shape != ref.shape:
        raise ValueError(f"{name}: expected shape {tuple(ref.shape)} (that of {ref_name}), got {tuple(x.shape)}")
    if x.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (that of {ref_name}), got {x.device}")
    if x.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (that of {ref_name}), got {x.dtype}")
    return x


# (value, batch, device) -> a read-only int64 tensor of that value: an int timestep costs a
# dictionary lookup instead of a torch.full per call. The kernels only read t, and these
# tensors never leave the op functions. Never used while tracing or capturing a CUDA graph:
# a graph keeps the addresses it was captured with, and an evicted entry's memory is freed and
# reused, so a captured graph gets a tensor of its own (allocated in the graph's pool).
_INT_TIMESTEPS: dict[tuple[int, int, torch.device], torch.Tensor] = {}
_INT_TIMESTEPS_MAX = 8192


_DEVICE_TYPES: dict[torch.device, str] = {}


def device_type(device: torch.device) -> str:
    """``device.type``, read once per device: torch.device.type costs about half a microsecond a read (torch
    2.14), and the ops read it on every call (a tensor's own ``is_cpu`` is cheaper still)."""
    kind = _DEVICE_TYPES.get(device)
    if kind is None:
        kind = _DEVICE_TYPES[device] = device.type
    return kind


def capturing(device: torch.device) -> bool:
    """Whether work for ``device`` is being captured into a CUDA graph (its current stream is capturing)."""
    if device_type(device) != "cuda":
        return False
    if torch.cuda.is_current_stream_capturing():
        return True
    idx = device.index
    if idx is None or idx == torch.cuda.current_device():
        return False
    with torch.cuda.device(idx):  # a capture on the tensors' device while another is current
        return torch.cuda.is_current_stream_capturing()


def int_timesteps(t: int, batch: int, device: torch.device) -> torch.Tensor:
    """``torch.full((batch,), t)`` on ``device``, cached; ``t`` is already range-checked."""
    if torch.compiler.is_compiling() or capturing(device):  # checked before the cache is read
        return torch.full((batch,), t, dtype=torch.int64, device=device)
    key = (t, batch, device)
    v = _INT_TIMESTEPS.get(key)
    if v is not None:
        return v
    v = torch.full((batch,), t, dtype=torch.int64, device=device)
    if len(_INT_TIMESTEPS) >= _INT_TIMESTEPS_MAX:
        _INT_TIMESTEPS.clear()
    _INT_TIMESTEPS[key] = v
    return v


# (t, prev_t, batch, device) -> the pair of such tensors, for a step op called with ints (every sampler's
# loop): one lookup instead of two, under the same rules as _INT_TIMESTEPS.
_INT_STEPS: dict[tuple[int, int, int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _int_step_timesteps(t: int, prev_t: int, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(int_timesteps(t), int_timesteps(prev_t)) of already checked ints, cached as a pair."""
    if torch.compiler.is_compiling() or capturing(device):  # checked before the cache is read
        return int_timesteps(t, batch, device), int_timesteps(prev_t, batch, device)  # fresh tensors here
    key = (t, prev_t, batch, device)
    v = _INT_STEPS.get(key)
    if v is None:
        v = int_timesteps(t, batch, device), int_timesteps(prev_t, batch, device)
        if len(_INT_STEPS) >= _INT_TIMESTEPS_MAX:
            _INT_STEPS.clear()
        _INT_STEPS[key] = v
    return v


# Up to this many timesteps, host-side checks read them with one tolist() (about 1 us for 16) instead of
# tensor reductions and item() calls (about 1 us each).
_HOST_LIST_MAX = 64


def all_less(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a < b elementwise, for two int64 (B,) CPU tensors."""
    if a.numel() <= _HOST_LIST_MAX:
        return all(x < y for x, y in zip(a.tolist(), b.tolist()))
    return not bool((a >= b).any())


def timesteps(t, batch: int, device: torch.device, T: int, name: str = "t", allow_negative: bool = False):
    """``t`` as an int64 tensor of shape (batch,) on ``device``, range-checked.

    Accepts a Python int, a 0-d tensor (broadcast over the batch) or a tensor of
    shape (batch,). The range is checked on the host for CPU tensors and with an
    asynchronous device assertion (no host synchronisation) for CUDA tensors.
    ``allow_negative`` (prev_t): any value below 0 means "before the first step", as
    diffusers reads it (50 of 1000 steps: t = 0 steps to prev_t = -20).
    """
    lo = None if allow_negative else 0
    rng = f"(-inf, {T})" if allow_negative else f"[0, {T})"
    if isinstance(t, bool):
        raise TypeError(f"{name}: expected an integer timestep, got bool")
    if isinstance(t, int):
        if not (lo is None or lo <= t) or not t < T:
            raise ValueError(f"{name}: expected a timestep in {rng}, got {t}")
        # any negative prev_t is the end: -2**70 as -1 (int64 could not hold it: an OverflowError naming nothing)
        return int_timesteps(max(t, -1) if allow_negative else t, batch, device)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected an int or an integer tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor (int64 or int32), got {t.dtype}")
    if t.dim() == 0:
        t = t.reshape(1).expand(batch)
    if t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(
            f"{name}: expected shape ({batch},) (one timestep per sample) or a scalar, got {tuple(t.shape)}"
        )
    t = t.to(device=device, dtype=torch.int64).contiguous()
    if torch.compiler.is_compiling():
        # Traced code cannot branch on values; the C++ kernels check the range themselves
        # and the Triton/CUDA kernels clamp their table reads.
        return t
    if t.is_cpu:
        if t.numel() <= _HOST_LIST_MAX:  # a short batch: one tolist() costs less than two reductions
            bad_vals = [v for v in t.tolist() if (lo is not None and v < lo) or v >= T]
            if bad_vals:
                raise ValueError(f"{name}: expected timesteps in {rng}, got {bad_vals[0]}")
        elif (lo is not None and int(t.min()) < lo) or int(t.max()) >= T:
            bad = t[(t >= T) if lo is None else ((t < lo) | (t >= T))][0].item()
            raise ValueError(f"{name}: expected timesteps in {rng}, got {bad}")
    else:
        ok = (t < T) if lo is None else ((t >= lo) & (t < T))
        torch._assert_async(ok.all(), f"{name}: timesteps outside {rng}")
    return t


def philox_stream(seed, offset, device: torch.device | None = None) -> None:
    """Check the (seed, offset) of an in-kernel Philox noise stream.

    ``offset`` is an int or a 0-d int64 tensor on ``device`` (the kernels read it there, so a CUDA graph
    replays the step with the value the tensor holds at replay). A tensor's sign is checked on the host
    for CPU tensors and with an asynchronous device assertion on CUDA (no host synchronisation).
    """
    if seed is None:
        raise ValueError("seed: required for the Philox stream (noise='philox', philox_randn)")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:  # (True was seed 1)
        raise ValueError(f"seed: expected an integer in [0, 2**63), got {seed!r}")
    if isinstance(offset, torch.Tensor):
        if offset.dtype != torch.int64 or offset.dim() != 0:
            raise TypeError(
                f"offset: expected an int or a 0-d int64 tensor, got a {offset.dtype} tensor of shape "
                f"{tuple(offset.shape)}"
            )
        if device is not None and offset.device != device:
            raise ValueError(f"offset: expected a tensor on {device} (that of sample), got one on {offset.device}")
        if torch.compiler.is_compiling():
            return  # the C++ kernel checks it; traced code cannot branch on a value
        if offset.is_cpu:
            if int(offset) < 0:
                raise ValueError(f"offset: expected a non-negative integer, got {int(offset)}")
        else:
            torch._assert_async(offset >= 0, "offset: expected a non-negative integer")
        return
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < 2**63:
        raise ValueError(f"offset: expected an integer in [0, 2**63) or a 0-d int64 tensor, got {offset!r}")


def check_generator(generator, name: str = "generator") -> None:
    """A TypeError naming ``name`` unless ``generator`` is a torch.Generator or None."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{name}: expected a torch.Generator or None, got {type(generator).__name__}")


def check_shape(shape, name: str = "shape") -> tuple[int, ...]:
    """``shape`` as a tuple of non-negative ints: a sequence of ints (tuple, list, torch.Size) or one int (a
    1-D shape, as torch.randn(5) takes it); else a TypeError/ValueError naming ``name``."""
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (shape,)
    if isinstance(shape, np.ndarray) and shape.ndim == 1:  # e.g. np.array(img.shape)
        shape = shape.tolist()
    if isinstance(shape, (str, bytes)) or not isinstance(shape, (tuple, list, torch.Size)):
        raise TypeError(f"{name}: expected a tuple of non-negative ints, got {type(shape).__name__}")
    out = []
    for s in shape:
        try:  # ints, numpy integers and 0-d integer tensors (operator.index refuses floats)
            out.append(operator.index(s) if not isinstance(s, bool) else None)
        except TypeError:
            out.append(None)
        if out[-1] is None:
            raise TypeError(f"{name}: expected a tuple of non-negative ints, got {tuple(shape)!r} (with "
                            f"{type(s).__name__} {s!r})")
    out = tuple(out)
    if any(s < 0 for s in out):
        raise ValueError(f"{name}: expected non-negative sizes, got {out}")
    return out


def check_eta(value) -> float:
    """DDIM's eta as a float: a finite number >= 0 (an infinite eta makes every sigma infinite: NaN images)."""
    v = check_number(value, "eta", "a non-negative number")
    if not 0 <= v < math.inf:
        raise ValueError(f"eta: expected a finite non-negative number, got {v}")
    return v


def check_step(sample, model_output, schedule, prediction_type, clip_sample, clip_sample_range) -> None:
    """The arguments every step op (ddpm_step, ddim_step, dpmpp_step) takes: the tensors, the schedule,
    the prediction type's name and the clip range."""
    check_tensor(sample, "sample")
    check_like(model_output, sample, "model_output", "sample")
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule: expected a fastddpm.NoiseSchedule, got {type(schedule).__name__}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type: expected one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
    if clip_sample and type(clip_sample_range) is not float:  # (read only when clipping, as diffusers reads it)
        clip_sample_range = check_number(clip_sample_range, "clip_sample_range", "a positive number")
    if clip_sample and not clip_sample_range > 0:
        raise ValueError(f"clip_sample_range: expected a positive number, got {clip_sample_range}")


def step_timesteps(t, prev_t, batch: int, device: torch.device, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, prev_t) of a step op as int64 (B,) tensors, range-checked; prev_t defaults to t - 1, and any
    prev_t < 0 is the end of the chain. prev_t < t is checked on the host where that costs no device sync."""
    if type(t) is int and 0 <= t < T:  # a sampler's loop: valid ints, one cached pair (errors: below)
        if prev_t is None:
            return _int_step_timesteps(t, t - 1, batch, device)
        if type(prev_t) is int and prev_t < t:  # (any negative prev_t is the end: -2**70 as -1)
            return _int_step_timesteps(t, max(prev_t, -1), batch, device)
    tt = timesteps(t, batch, device, T)  # an int t is valid past this point
    if prev_t is None:
        return tt, tt - 1
    pt = timesteps(prev_t, batch, device, T, name="prev_t", allow_negative=True)
    if type(t) is int and type(prev_t) is int:  # ints that passed both range checks but not prev_t < t
        raise ValueError(f"prev_t: expected prev_t < t, got prev_t={prev_t}, t={t}")
    if pt.is_cpu and not torch.compiler.is_compiling() and not all_less(pt, tt):
        raise ValueError("prev_t: expected prev_t < t for every sample")
    return tt, pt


def check_noise(noise, seed, offset, sample: torch.Tensor, generator=None) -> None:
    """The noise argument of ddpm_step/ddim_step: a tensor like ``sample``, None (drawn from ``generator``, a
    torch.Generator or None), "philox" (with a valid ``seed``/``offset`` stream) or "none"."""
    check_generator(generator)
    if isinstance(noise, str):
        if noise not in ("philox", "none"):
            raise ValueError(f"noise: expected a tensor, None, 'philox' or 'none', got {noise!r}")
    elif noise is not None:
        check_like(noise, sample, "noise", "sample")
    what = "a tensor" if isinstance(noise, torch.Tensor) else repr(noise)
    # only noise=None draws from the generator: with a tensor or Philox noise it would be ignored ("none" is
    # how a loop that passes its generator every step says "no noise at t = 0", as diffusers' step draws none)
    if generator is not None and noise is not None and not (isinstance(noise, str) and noise == "none"):
        raise ValueError(f"generator: only used with noise=None (z drawn from it), got a generator with "
                         f"noise={what}")
    if isinstance(noise, str) and noise == "philox":
        philox_stream(seed, offset, sample.device)
        return
    # the Philox stream is read only with noise="philox": a seed given with other noise would be ignored
    if seed is not None:
        raise ValueError(f"seed: only used with noise='philox', got seed={seed!r} with noise={what}")
    if isinstance(offset, torch.Tensor) or offset != 0:
        raise ValueError(f"offset: only used with noise='philox', got an offset with noise={what}")


def traced_timestep_checks(T: int, t: torch.Tensor, prev_t: torch.Tensor | None = None,
                           last_t: torch.Tensor | None = None) -> None:
    """The timestep checks of a traced call (reference.py calls this). Under torch.compile the ops' Python
    checks cannot branch on values and, on the reference path, no C++ check follows: without these a t of -1
    reads the table's last entry. Device-side assertions (no host sync); eager calls were checked before they
    came here."""
    if not torch.compiler.is_compiling():
        return
    torch._assert_async(((t >= 0) & (t < T)).all(), f"t: expected timesteps in [0, {T})")
    if prev_t is not None:
        torch._assert_async((prev_t < t).all(), "prev_t: expected prev_t < t for every sample")
    if last_t is not None:
        torch._assert_async(((last_t > t) & (last_t < T)).all(), f"last_t: expected last_t > t, below {T}")
