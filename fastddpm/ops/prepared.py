"""Prepared reverse steps: a step op bound once to a schedule, device, dtype and backend.

A sampler calls the same step op hundreds of times with the same schedule on the same device and dtype.
:func:`prepare_step` does the per-configuration work once (the backend's resolution, with the same
errors as the ops; the op function of that backend; the schedule's ``alphas_cumprod`` table on that
device), and the :class:`PreparedStep` it returns runs one step with only the per-call work left:
timesteps to tensors, names to the kernels' codes, the noise mode. It does not re-check what the caller
checked once (the tensors' shapes, dtypes and devices, the timesteps' range): the public functions
:func:`fastddpm.ops.ddpm_step`, :func:`~fastddpm.ops.ddim_step` and :func:`~fastddpm.ops.dpmpp_step` are
their argument checks followed by a (cached) prepared step, and the schedulers check their arguments in
diffusers' words before calling one.
"""

from __future__ import annotations

import weakref

import torch

from ..schedule import NoiseSchedule
from . import _checks, _dispatch
from ._codes import NOISE_NONE, NOISE_PHILOX, NOISE_TENSOR, PREDICTION_TYPES, VARIANCE_TYPES

STEP_OPS = ("ddpm_step", "ddim_step", "dpmpp_step")


def _code(table: dict[str, int], value: str, name: str) -> int:
    code = table.get(value)
    if code is None:
        raise ValueError(f"{name}: expected one of {', '.join(table)}, got {value!r}")
    return code


def _timesteps(t, prev_t, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, prev_t) as int64 (B,) tensors: ints become cached tensors, prev_t None is t - 1."""
    if type(t) is int and (prev_t is None or type(prev_t) is int):  # a sampler's loop: one cached pair
        return _checks._int_step_timesteps(t, t - 1 if prev_t is None else prev_t, batch, device)
    tt = _checks.int_timesteps(t, batch, device) if type(t) is int else t
    if prev_t is None:
        pt = _checks.int_timesteps(t - 1, batch, device) if type(t) is int else tt - 1
    else:  # any prev_t < 0 is the end of the chain, for every kernel
        pt = _checks.int_timesteps(prev_t, batch, device) if type(prev_t) is int else prev_t
    return tt, pt


def _noise_mode(noise, seed, offset) -> tuple[int | None, torch.Tensor | None, int, int, torch.Tensor | None]:
    """(noise mode, z, seed, offset, offset tensor) of a step's noise argument; mode None: draw z from a
    torch.Generator. An ``offset`` tensor is read by the kernel, and only with Philox noise."""
    if isinstance(noise, str):
        if noise == "philox":
            if seed is None:
                raise ValueError("seed: required with noise='philox'")
            if isinstance(offset, torch.Tensor):
                return NOISE_PHILOX, None, int(seed), 0, offset
            return NOISE_PHILOX, None, int(seed), int(offset), None
        if noise == "none":
            mode = NOISE_NONE
        else:
            raise ValueError(f"noise: expected a tensor, None, 'philox' or 'none', got {noise!r}")
        z = None
    elif noise is None:
        mode, z = None, None
    else:
        mode, z = NOISE_TENSOR, noise
    return mode, z, int(seed or 0), 0 if isinstance(offset, torch.Tensor) else int(offset), None


def step_fake(sample: torch.Tensor, return_pred: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The outputs of every step op's schema, for its fake: (x_prev, predicted x0 or an empty tensor)."""
    pred = torch.empty_like(sample) if return_pred else sample.new_empty(0)
    return torch.empty_like(sample), pred


def randn_in_op(backend: str, generator, variance_type: str) -> bool:
    """Whether ddpm_step_randn can draw z (torch's own normal_, on the calling thread, while a
    second thread computes the posterior mean): the CPU kernel, one CPU generator (or the
    default one), a fixed variance type, outside tracing."""
    return (
        backend == "cpu"
        and variance_type in ("fixed_small", "fixed_small_log", "fixed_large")
        and (generator is None or (isinstance(generator, torch.Generator) and generator.device.type == "cpu"))
        and not torch.compiler.is_compiling()
    )


def generator_noise(sample: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """z as diffusers' randn_tensor draws it: ``torch.randn(sample.shape, generator=generator)`` on the
    generator's device (the sample's for None), then moved to the sample's device."""
    if generator is not None:
        _checks.check_generator(generator)  # (an int's .device would be an AttributeError)
    if generator is None or generator.device == sample.device:
        return torch.randn(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
    z = torch.randn(sample.shape, generator=generator, device=generator.device, dtype=sample.dtype)
    return z.to(sample.device)


class PreparedStep:
    """One step op bound to a schedule, device, dtype and resolved backend; made by :func:`prepare_step`.

    Attributes:
        op: "ddpm_step", "ddim_step" or "dpmpp_step".
        backend: the resolved backend ("cpu", "cuda", "triton" or "torch").
        device, dtype: of the tensors it steps.
        schedule: the :class:`~fastddpm.NoiseSchedule`.
        alphas_cumprod: the table the kernel reads (float32; float64 for float64 tensors on "torch").
        fn: the op function of ``backend`` (arguments as the schema in csrc/ops.cpp).

    Calling it runs one step: ``step(sample, model_output, t, prev_t=None, **kw)`` returns
    ``(prev_sample, pred_original_sample)``, the second None unless ``return_pred_original=True``.
    ``t`` and ``prev_t`` are ints (for the whole batch) or int64 (B,) tensors on the sample's device;
    ``prev_t`` None is t - 1. ``kw`` are the keyword arguments of the public op of the same name, with the
    same meanings and defaults.

    The fused kernels have no backward. Where autograd must see through a step (grad mode on and an input
    tensor that requires grad: guidance or a loss through the sampler), the step runs on the PyTorch path,
    whose operations autograd differentiates, so gradients are never dropped.
    """

    op: str

    def __init__(self, schedule: NoiseSchedule, device: torch.device, dtype: torch.dtype, backend: str):
        self.backend = backend
        self.device = device
        self.dtype = dtype
        self._schedule = schedule
        self._schedule_ref = None
        self.fn = _dispatch.implementation(self.op, backend)
        self._torch_fn = _dispatch.implementation(self.op, "torch")
        if backend == "torch" and dtype == torch.float64:
            self.alphas_cumprod = schedule.table("alphas_cumprod", device, torch.float64)
        else:
            self.alphas_cumprod = schedule.tables(device)["alphas_cumprod"]

    @property
    def schedule(self) -> NoiseSchedule:
        return self._schedule if self._schedule is not None else self._schedule_ref()

    def _hold_weakly(self) -> None:
        # The ops' cache is keyed by the schedule: a strong reference from its values would keep it alive.
        self._schedule_ref, self._schedule = weakref.ref(self._schedule), None

    def _differentiated(self, *tensors: torch.Tensor | None) -> bool:
        """Whether autograd records this step: grad mode on and an input that requires grad."""
        return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors)

    @staticmethod
    def _per_call(sample: torch.Tensor, t, prev_t, prediction_type: str, clip_sample: bool,
                  clip_sample_range: float) -> tuple[torch.Tensor, torch.Tensor, int, float]:
        """What every step op turns its shared arguments into on each call: (t, prev_t) as int64 (B,)
        tensors, the prediction type's code, the clip range (0.0: no clipping)."""
        tt, pt = _timesteps(t, prev_t, sample.shape[0], sample.device)
        pcode = _code(PREDICTION_TYPES, prediction_type, "prediction_type")
        clip = float(clip_sample_range) if clip_sample else 0.0
        if clip_sample and not 0 < clip < float("inf"):  # (NaN or <= 0 turned the clipping off, silently)
            raise ValueError(f"clip_sample_range: expected a positive number, got {clip_sample_range}")
        return tt, pt, pcode, clip

    def __repr__(self) -> str:
        return (f"PreparedStep(op={self.op!r}, backend={self.backend!r}, device={str(self.device)!r}, "
                f"dtype={self.dtype}, schedule={self.schedule!r})")


class _DDPMStep(PreparedStep):
    op = "ddpm_step"

    def __call__(
        self,
        sample: torch.Tensor,
        model_output: torch.Tensor,
        t: torch.Tensor | int,
        prev_t: torch.Tensor | int | None = None,
        *,
        noise: torch.Tensor | str | None = None,
        generator: torch.Generator | None = None,
        prediction_type: str = "epsilon",
        variance_type: str = "fixed_small",
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        seed: int | None = None,
        offset: int | torch.Tensor = 0,
        diffusers_beta: bool = False,
        predicted_variance: torch.Tensor | None = None,
        return_pred_original: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        tt, pt, pcode, clip = self._per_call(sample, t, prev_t, prediction_type, clip_sample, clip_sample_range)
        vcode = _code(VARIANCE_TYPES, variance_type, "variance_type")
        ret = bool(return_pred_original)
        kw = dict(diffusers_beta=True) if diffusers_beta else {}
        mode, z, seed, off, off_t = _noise_mode(noise, seed, offset)
        grad = self._differentiated(sample, model_output, z, predicted_variance)
        if mode is None:
            if not grad and randn_in_op(self.backend, generator, variance_type):
                prev, pred = torch.ops.fastddpm.ddpm_step_randn(
                    sample, model_output, tt, pt, self.alphas_cumprod, generator, pcode, vcode, clip, ret, **kw)
                return prev, (pred if ret else None)
            z, mode = generator_noise(sample, generator), NOISE_TENSOR
        extra = () if off_t is None else (off_t,)
        fn = self._torch_fn if grad else self.fn
        prev, pred = fn(sample, model_output, tt, pt, self.alphas_cumprod, z, predicted_variance, seed, off, mode,
                        pcode, vcode, clip, ret, *extra, **kw)
        return prev, (pred if ret else None)


class _DDIMStep(PreparedStep):
    op = "ddim_step"

    def __call__(
        self,
        sample: torch.Tensor,
        model_output: torch.Tensor,
        t: torch.Tensor | int,
        prev_t: torch.Tensor | int | None = None,
        *,
        eta: float = 0.0,
        noise: torch.Tensor | str | None = None,
        generator: torch.Generator | None = None,
        prediction_type: str = "epsilon",
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        final_alpha_cumprod: float = 1.0,
        use_clipped_model_output: bool = False,
        seed: int | None = None,
        offset: int | torch.Tensor = 0,
        diffusers_beta: bool = False,
        return_pred_original: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        tt, pt, pcode, clip = self._per_call(sample, t, prev_t, prediction_type, clip_sample, clip_sample_range)
        ret = bool(return_pred_original)
        eta = float(eta)
        if not 0 <= eta < float("inf"):  # (inf gave NaN images on the CPU, -1 and NaN ran on the torch backend)
            raise ValueError(f"eta: expected a finite non-negative number, got {eta}")
        mode, z, seed, off, off_t = _noise_mode(noise, seed, offset)
        if mode is None:  # diffusers draws only when eta > 0
            z, mode = (generator_noise(sample, generator), NOISE_TENSOR) if eta > 0 else (None, NOISE_NONE)
        extra = () if off_t is None else (off_t,)
        kw = dict(diffusers_beta=True) if diffusers_beta else {}
        fn = self._torch_fn if self._differentiated(sample, model_output, z) else self.fn
        prev, pred = fn(sample, model_output, tt, pt, self.alphas_cumprod, float(final_alpha_cumprod), z, seed, off,
                        mode, pcode, eta, clip, bool(use_clipped_model_output), ret, *extra, **kw)
        return prev, (pred if ret else None)


class _DPMPPStep(PreparedStep):
    op = "dpmpp_step"

    def __call__(
        self,
        sample: torch.Tensor,
        model_output: torch.Tensor,
        t: torch.Tensor | int,
        prev_t: torch.Tensor | int | None = None,
        *,
        prev_x0: torch.Tensor | None = None,
        last_t: torch.Tensor | int | None = None,
        prediction_type: str = "epsilon",
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        return_pred_original: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        tt, pt, pcode, clip = self._per_call(sample, t, prev_t, prediction_type, clip_sample, clip_sample_range)
        if prev_x0 is None:
            lt = None
        else:
            if last_t is None:
                raise ValueError("last_t: required with prev_x0 (the timestep of that prediction)")
            lt = _checks.int_timesteps(last_t, sample.shape[0], sample.device) if type(last_t) is int else last_t
        ret = bool(return_pred_original)
        fn = self._torch_fn if self._differentiated(sample, model_output, prev_x0) else self.fn
        prev, pred = fn(sample, model_output, prev_x0, tt, pt, lt, self.alphas_cumprod, pcode, clip, ret)
        return prev, (pred if ret else None)


_CLASSES = {"ddpm_step": _DDPMStep, "ddim_step": _DDIMStep, "dpmpp_step": _DPMPPStep}


def prepare_step(
    op: str,
    schedule: NoiseSchedule,
    device: torch.device | str,
    dtype: torch.dtype,
    backend: str = "auto",
) -> PreparedStep:
    """The step op ``op`` ("ddpm_step", "ddim_step" or "dpmpp_step") bound to ``schedule`` for tensors on
    ``device`` of ``dtype``, its backend resolved once as the op resolves it (same errors:
    :class:`~fastddpm.ops.BackendNotSupported` for a backend that cannot serve them).

    Resolve again (prepare a new step) when the environment's FASTDDPM_BACKEND or TRITON_INTERPRET changes.
    """
    if op not in _CLASSES:
        raise ValueError(f"op: expected one of {', '.join(STEP_OPS)}, got {op!r}")
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule: expected a fastddpm.NoiseSchedule, got {type(schedule).__name__}")
    device = _checks.check_device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"dtype: expected float32, float16, bfloat16 or float64, got {dtype}")
    b = _dispatch.resolve(op, backend, device, dtype)
    return _CLASSES[op](schedule, device, dtype, b)


# schedule -> {(op, resolved backend, device, dtype): PreparedStep}, for the public op functions.
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cached_step(op: str, schedule: NoiseSchedule, device: torch.device, dtype: torch.dtype,
                backend: str) -> PreparedStep:
    """prepare_step for arguments the caller checked, cached per schedule (held weakly) and configuration.

    The backend is resolved on each call (memoised in _dispatch, and following FASTDDPM_BACKEND); while
    tracing, no cache is read (a fresh step is built into the graph).
    """
    b = _dispatch.resolve(op, backend, device, dtype)
    if torch.compiler.is_compiling():
        return _CLASSES[op](schedule, device, dtype, b)
    per = _CACHE.get(schedule)
    if per is None:
        per = _CACHE[schedule] = {}
    key = (op, b, device, dtype)
    step = per.get(key)
    if step is None:
        step = _CLASSES[op](schedule, device, dtype, b)
        step._hold_weakly()
        per[key] = step
    return step


__all__ = ["PreparedStep", "generator_noise", "prepare_step"]
