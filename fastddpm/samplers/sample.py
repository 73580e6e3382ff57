"""fastddpm.sample: one call that samples from any epsilon (or x0, or v) model.

    x = fastddpm.sample(model, (16, 3, 32, 32), steps=100, seed=0)

The loop is Ho et al.'s Algorithm 2 (sampler="ddpm"), Song et al.'s DDIM (sampler="ddim") or Lu et al.'s
DPM-Solver++(2M) (sampler="dpm++2m"), each step one fused kernel. Fewer steps than the schedule has use
Nichol & Dhariwal's respacing (fastddpm/samplers/respace.py). The same seed gives bitwise the same images on
the CPU, run after run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch

from .. import ops
from ..schedule import NoiseSchedule
from .plan import (
    SamplingPlan,
    call_model,
    fused_step,
    initial_noise,
    plan_sampling,
    prepare,
    split_output,
    steady_weights,
)

# The plan's names stay importable from here, where they lived before plan.py (fastddpm.samplers.sample.*).
__all__ = ["sample", "SamplingPlan", "plan_sampling", "call_model", "initial_noise"]


def _resolve_rng(plan: SamplingPlan, generator, seed):
    ops.check_generator(generator)
    if plan.noise == "philox" and seed is None:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ValueError(f"seed: expected an integer in [0, 2**63), got {seed!r}")
    if plan.noise == "philox":
        return None, seed
    if generator is None and seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return generator, seed


def _use_channels_last(model, plan: SamplingPlan, channels_last: bool | None) -> bool:
    if channels_last is None:
        # Measured faster on the CPU (benchmarks/README.md, "DPM-Solver++(2M) and channels_last sampling");
        # on CUDA no run has compared the layouts, so NCHW stays.
        return plan.device.type == "cpu" and len(plan.shape) == 4 and isinstance(model, torch.nn.Module)
    if channels_last and len(plan.shape) != 4:
        raise ValueError(f"channels_last: needs 4-D images (B, C, H, W), got shape {plan.shape}")
    return bool(channels_last)


@contextlib.contextmanager
def channels_last_weights(model):
    """The 4-D parameters and buffers of ``model`` (convolution weights) in channels_last for the duration,
    then back to the tensors they were: the caller's model comes out as it went in."""
    changed = []
    if isinstance(model, torch.nn.Module):
        for p in (*model.parameters(), *model.buffers()):
            if p.dim() == 4 and not p.is_contiguous(memory_format=torch.channels_last):
                changed.append((p, p.data))
                p.data = p.data.contiguous(memory_format=torch.channels_last)
    try:
        yield
    finally:
        for p, old in changed:
            p.data = old


def _infer_device_dtype(model, device, dtype):
    if device is not None:
        device = ops.check_device(device)
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype: expected a torch.dtype such as torch.float32, got {dtype!r}")
    if isinstance(model, torch.nn.Module):
        p = next(iter(model.parameters()), None)
        if p is not None:
            devices = {q.device for q in model.parameters()}
            # (a model whose hooks move the work, e.g. accelerate's offload, keeps its weights elsewhere)
            hooked = any(hasattr(m, "_hf_hook") for m in model.modules())
            if device is not None and len(devices) == 1 and not hooked:
                if device.type == p.device.type and device.index is None:
                    device = p.device  # "cuda" for a model on cuda:1 is cuda:1, where its weights are
                elif device != p.device and not (device.type == "cpu" and p.device.type == "cpu"):
                    # the model's first layer would refuse the images deep inside its forward
                    raise ValueError(f"device: {device} is not the device of the model's parameters ({p.device}); "
                                     f"move the model (model.to({str(device)!r})) or leave device out")
            device = device if device is not None else p.device
            if dtype is not None and p.is_floating_point() and dtype != p.dtype and not torch.is_autocast_enabled(
                    torch.device(device).type):
                # the model's first layer would refuse the images deep inside its forward
                raise ValueError(f"dtype: {dtype} is not the dtype of the model's parameters ({p.dtype}); convert "
                                 f"the model (model.to({dtype})) or leave dtype out")
            dtype = dtype if dtype is not None else p.dtype
    return (torch.device(device) if device is not None else torch.device("cpu")), (dtype or torch.float32)


@torch.no_grad()
def sample(
    model,
    shape,
    *,
    steps: int | None = None,
    sampler: Literal["ddpm", "ddim", "dpm++2m"] = "ddpm",
    eta: float = 0.0,
    schedule: NoiseSchedule | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    noise: Literal["torch", "philox"] = "torch",
    device=None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    callback: Callable[[int, int, torch.Tensor], None] | None = None,
    return_intermediates: bool = False,
    prediction_type: Literal["epsilon", "sample", "v_prediction"] = "epsilon",
    variance_type: str = "fixed_small",
    clip_denoised: bool = True,
    use_clipped_model_output: bool = True,
    timesteps=None,
    cuda_graph: bool = False,
    backend: str = "auto",
    channels_last: bool | None = None,
    fast_math: bool = False,
):
    """Sample images from ``model``.

    Args:
        model: ``model(x, t) -> output``: a fastddpm UNet, any callable, or a diffusers UNet2DModel
            (its ``.sample`` is used). ``t`` is an int64 (B,) tensor of original timesteps.
        shape: (B, C, H, W) (any trailing dims).
        steps: number of denoising steps; default the schedule's T for DDPM, 50 for DDIM (at most T), 20 for
            DPM-Solver++ (at most T - 1: its spacing repeats a timestep beyond).
            Fewer than T respaces the schedule (Nichol & Dhariwal 2021), evenly with both ends kept; DPM-Solver++
            takes diffusers' DPMSolverMultistepScheduler timesteps (round(linspace(0, T - 1, steps + 1)) but 0),
            its last step going to sigma = 0.
        sampler: "ddpm" (ancestral, Ho et al. Algorithm 2), "ddim" (Song et al. 2021) or "dpm++2m"
            (DPM-Solver++(2M), Lu et al. 2022: diffusers' DPMSolverMultistepScheduler with its defaults).
        eta: DDIM's eta (0: deterministic).
        schedule: the :class:`~fastddpm.NoiseSchedule` the model was trained with (default: linear 1000).
        generator, seed: with noise="torch", noise comes from ``generator`` (or a CPU generator seeded
            with ``seed``), drawn on the generator's device as diffusers does; with noise="philox" it is
            generated inside the step kernel from ``seed`` (counter-based, the same on every backend).
            Given both, the generator is the one noise="torch" uses and the seed the one noise="philox"
            uses; with noise="philox" and no seed, the seed is drawn from ``generator``.
        device, dtype: of the images (default: those of the model's parameters, else CPU float32).
        progress: show a tqdm bar.
        callback: ``callback(i, t, x)`` after every step.
        return_intermediates: also return the list of x after every step.
        prediction_type: what the model predicts: "epsilon", "sample" (x0) or "v_prediction".
        variance_type: DDPM's sigma_t: "fixed_small" (beta tilde), "fixed_large" (beta), "learned",
            "learned_range" (model returns 2C channels). DDPM's only: another value with another sampler is
            refused.
        clip_denoised: clip the predicted x0 to [-1, 1] (as the original DDPM code; for DPM-Solver++ this is
            its thresholding of the data prediction with a static threshold of 1).
        use_clipped_model_output: DDIM with ``clip_denoised``: the direction to x_t uses the epsilon
            recomputed from the clipped x0, eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t), so that
            (x0, eps) stay a consistent pair and the step stays on DDIM's path (Song et al. eq. 12;
            diffusers' ``use_clipped_model_output=True``). False keeps the model's own epsilon, as
            diffusers' DDIMScheduler does by default: that mismatch accumulates over steps, and images
            get worse as DDIM takes more steps. DDIM's only: False with another sampler is refused (DDPM's
            posterior mean and DPM-Solver++ use x0 alone).
        timesteps: explicit timesteps to visit instead of ``steps``.
        cuda_graph: capture one step (model + fused step) in a CUDA graph and replay it (CUDA only).
        backend: the fused ops' backend.
        channels_last: run the model on channels_last images with channels_last weights (the same numbers
            within fp32 rounding; the model is restored afterwards). Default: on CPU tensors, where it is
            measured faster; False elsewhere.
        fast_math: for the duration of the call, let cuDNN pick its fastest convolution algorithms
            (``torch.backends.cudnn.benchmark``) and let float32 convolutions and matmuls on NVIDIA GPUs use
            TF32 (``torch.backends.cudnn.allow_tf32``, ``torch.backends.cuda.matmul.allow_tf32``): faster on
            Ampere and newer, at about 1e-3 relative error in the model's float32 arithmetic. The previous
            settings are restored on return. No effect on CPU arithmetic.

    Returns:
        x_0 (shape ``shape``), or (x_0, intermediates) with ``return_intermediates``.
    """
    if not callable(model):
        raise TypeError(f"model: expected a callable model(x, t) (a UNet, a function), got {type(model).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback: expected a callable callback(i, t, x) or None, got {type(callback).__name__}")
    if channels_last is not None and not isinstance(channels_last, bool):  # "no" would be true
        raise TypeError(f"channels_last: expected True, False or None, got {channels_last!r}")
    for name, flag in (("progress", progress), ("return_intermediates", return_intermediates),
                       ("clip_denoised", clip_denoised), ("use_clipped_model_output", use_clipped_model_output),
                       ("cuda_graph", cuda_graph), ("fast_math", fast_math)):
        if not isinstance(flag, (bool, np.bool_)):  # "False" (a string) would be true
            raise TypeError(f"{name}: expected True or False, got {flag!r}")
    device, dtype = _infer_device_dtype(model, device, dtype)
    plan = plan_sampling(shape, steps=steps, sampler=sampler, eta=eta, schedule=schedule, timesteps=timesteps,
                         prediction_type=prediction_type, variance_type=variance_type,
                         clip_denoised=clip_denoised, noise=noise, device=device, dtype=dtype,
                         use_clipped_model_output=use_clipped_model_output)
    generator, seed = _resolve_rng(plan, generator, seed)
    if cuda_graph and plan.sampler == "dpm++2m":
        raise ValueError("cuda_graph: supported with sampler='ddpm' and 'ddim', not 'dpm++2m'")
    check_shape = getattr(model, "check_input_shape", None)  # fastddpm's UNet: before the progress bar starts
    if callable(check_shape):
        check_shape(tuple(plan.shape))
    with _fast_math(fast_math):
        return _sample(model, plan, generator, seed, progress, callback, return_intermediates, cuda_graph,
                       backend, channels_last)


@contextlib.contextmanager
def _fast_math(on: bool):
    """cuDNN autotuning and TF32 for float32 convolutions/matmuls while the block runs (restored after)."""
    if not on:
        yield
        return
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.benchmark = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = saved[0], saved[1]
        torch.backends.cuda.matmul.allow_tf32 = saved[2]


def _sample(model, plan, generator, seed, progress, callback, return_intermediates, cuda_graph, backend,
            channels_last):
    with steady_weights(model):  # (the weights do not change between the steps)
        return _sample_steady(model, plan, generator, seed, progress, callback, return_intermediates, cuda_graph,
                              backend, channels_last)


def _sample_steady(model, plan, generator, seed, progress, callback, return_intermediates, cuda_graph, backend,
                   channels_last):
    if cuda_graph:
        from .graph import sample_cuda_graph

        return sample_cuda_graph(model, plan, generator=generator, seed=seed, progress=progress,
                                 callback=callback, return_intermediates=return_intermediates,
                                 backend=backend)
    step = prepare(plan, backend)
    cl = _use_channels_last(model, plan, channels_last)
    with channels_last_weights(model if cl else None):
        x = initial_noise(plan, generator, seed)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        B = plan.shape[0]
        intermediates = []
        t_host, prev_host = plan.t.tolist(), plan.prev_t.tolist()
        from tqdm.auto import tqdm

        if plan.sampler == "dpm++2m":
            from .dpmpp import DPMSolverState

            solver = DPMSolverState(step)

        for i in tqdm(range(plan.num_steps), disable=not progress, desc=f"fastddpm {plan.sampler}"):
            t, prev = t_host[i], prev_host[i]
            tb = torch.full((B,), t, dtype=torch.int64, device=plan.device)
            m, pv = split_output(plan, call_model(model, x, tb), x)
            if plan.sampler == "dpm++2m":  # deterministic: no noise after x_T
                x = solver.step(x, m, t, prev, prediction_type=plan.prediction_type, clip_sample=plan.clip_denoised)
            else:
                if plan.noise == "philox":
                    z, off = "philox", plan.philox_offset(i)
                else:
                    # DDPM adds no noise at t = 0 and diffusers draws none there; DDIM draws only when eta > 0.
                    z, off = ("none" if plan.sampler == "ddpm" and t == 0 else None), 0
                x = fused_step(plan, step, x, m, pv, t, prev, z, generator, seed, off)
            if callback is not None:
                callback(i, t, x)
            if return_intermediates:
                intermediates.append(x)
    if cl:
        x = x.contiguous()
    return (x, intermediates) if return_intermediates else x
