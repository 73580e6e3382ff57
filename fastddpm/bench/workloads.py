"""End-to-end workloads: sampling and training, as fastddpm, diffusers and denoising-diffusion-pytorch run them.

Sampling (images/s): ``steps`` denoising steps from noise to images at a batch size.

* ``fastddpm.sample``: fastddpm's U-Net and loop, one fused kernel per step (DDPM, respaced to ``steps``);
* ``fastddpm DDPMPipeline``: the drop-in pipeline (fastddpm U-Net + fastddpm.DDPMScheduler);
* ``diffusers DDPMPipeline``: UNet2DModel with the same weights + diffusers.DDPMScheduler;
* ``denoising-diffusion-pytorch``: GaussianDiffusion.sample with its own U-Net of matching widths
  (DDPM at 1000 steps; at fewer steps it can only run DDIM, eta = 0; a step costs one U-Net call either way).

Training (it/s, peak memory): one optimisation step at a batch size: draw t and noise, make x_t, predict,
MSE to the noise, backward, AdamW, gradients freed (zero_grad(set_to_none=True) at the end, so nothing
but parameters and optimizer state lives between steps). fastddpm as its training driver does it (fused
q_sample), diffusers as its train_unconditional example does (DDPMScheduler.add_noise + UNet2DModel),
denoising-diffusion-pytorch through GaussianDiffusion's forward (its loss). The same optimiser
everywhere; no EMA or gradient clipping.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import refuse_reference_run
from .models import Network, ddpm_pytorch_diffusion, ddpm_pytorch_status, ddpm_pytorch_unet, diffusers_unet

DDP = "denoising-diffusion-pytorch"


class Skip(Exception):
    """A provider that cannot run here; the message says why."""


# the suite's sampling providers; benchmarks/bench_sampling.py runs the others on request
SUITE_SAMPLERS = ("fastddpm.sample", "fastddpm DDPMPipeline", "diffusers DDPMPipeline", "denoising-diffusion-pytorch")


def dpm_loop(unet, shape, steps):
    """diffusers' DPMSolverMultistepScheduler (its defaults: dpmsolver++, order 2) driven as its pipelines do."""
    import diffusers

    sched = diffusers.DPMSolverMultistepScheduler()
    sched.set_timesteps(steps)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x).prev_sample
    return x


def sampling_providers(net: Network, batch: int, steps: int, which: tuple[str, ...] | None = SUITE_SAMPLERS
                       ) -> dict[str, Callable[[], object] | Skip]:
    """Whole sampling runs, the same weights: fastddpm.sample (DDPM; with Philox noise, on the CPU in
    channels_last, its default there, and in NCHW; DPM-Solver++(2M)), the drop-in DDPMPipeline, diffusers'
    DDPMPipeline and DPM-Solver++ loop, denoising-diffusion-pytorch. ``which``: the names to build (None: all)."""
    refuse_reference_run()  # never time the torch reference under fastddpm's name
    import diffusers

    import fastddpm

    C, H, W = net.image_shape
    shape = (batch, C, H, W)
    ours = net.ours.eval()
    theirs = diffusers_unet(net)
    out: dict[str, Callable[[], object] | Skip] = {}
    kw = dict(steps=steps, seed=0, progress=False)
    out["fastddpm.sample"] = lambda: fastddpm.sample(ours, shape, sampler="ddpm", **kw)
    # what fastddpm.sample runs on a GPU (NCHW; channels_last is its default on CPU tensors only): the GPU proxy
    out["fastddpm.sample (NCHW)"] = lambda: fastddpm.sample(ours, shape, sampler="ddpm", channels_last=False, **kw)
    out["fastddpm.sample (philox)"] = lambda: fastddpm.sample(ours, shape, noise="philox", **kw)
    out["fastddpm.sample (philox, NCHW)"] = lambda: fastddpm.sample(ours, shape, noise="philox", channels_last=False,
                                                                    **kw)
    out["fastddpm.sample dpm++2m"] = lambda: fastddpm.sample(ours, shape, sampler="dpm++2m", **kw)
    out["diffusers DPMSolverMultistep loop"] = lambda: dpm_loop(theirs, shape, steps)
    pipe = fastddpm.DDPMPipeline(ours, fastddpm.DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    out["fastddpm DDPMPipeline"] = lambda: pipe(batch_size=batch, num_inference_steps=steps, output_type="np",
                                                generator=torch.Generator().manual_seed(0))
    dpipe = diffusers.DDPMPipeline(unet=theirs, scheduler=diffusers.DDPMScheduler())
    dpipe.set_progress_bar_config(disable=True)
    out["diffusers DDPMPipeline"] = lambda: dpipe(batch_size=batch, num_inference_steps=steps, output_type="np",
                                                  generator=torch.Generator().manual_seed(0))
    if which is None or DDP in which:
        why = ddpm_pytorch_status()
        if why:
            out[DDP] = Skip(why)
        else:
            diff = ddpm_pytorch_diffusion(net, sampling_steps=steps).eval()
            out[DDP] = lambda: diff.sample(batch_size=batch)
    if which is not None:
        out = {k: out[k] for k in which if k in out}
    return out


def _adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-4)


def _optimised(loss_fn: Callable[[], torch.Tensor], model: torch.nn.Module):
    """(step, model, optimizer): step() computes loss_fn(), backpropagates it, steps AdamW over ``model``
    and frees the gradients."""
    opt = _adamw(model)

    def step():
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, model, opt


def training_providers(net: Network, batch: int, which: tuple[str, ...] | None = None,
                       ) -> dict[str, tuple[Callable[[], object], torch.nn.Module, torch.optim.Optimizer] | Skip]:
    """name -> (step, model, optimizer): step() runs one optimisation step."""
    refuse_reference_run()  # never time the torch reference under fastddpm's name
    import copy

    import diffusers

    from .. import NoiseSchedule, ops

    C, H, W = net.image_shape
    shape = (batch, C, H, W)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(shape, generator=g) * 2 - 1  # images in [-1, 1]
    sched, dsched = NoiseSchedule(), diffusers.DDPMScheduler()

    def fastddpm_loss(model):
        t = torch.randint(0, 1000, (batch,))
        xt, target = ops.q_sample(x0, t, torch.randn(shape), sched, target="eps")  # x_t and its target in one pass
        return F.mse_loss(model(xt, t), target)

    def diffusers_loss(model):
        t, noise = torch.randint(0, 1000, (batch,)), torch.randn(shape)
        return F.mse_loss(model(dsched.add_noise(x0, noise, t), t).sample, noise)

    out: dict = {}
    for name, fmt in (("fastddpm", torch.contiguous_format), ("fastddpm channels_last", torch.channels_last)):
        m = copy.deepcopy(net.ours).train().to(memory_format=fmt)
        out[name] = _optimised(lambda m=m: fastddpm_loss(m), m)
    theirs = diffusers_unet(net).train()
    out["diffusers"] = _optimised(lambda: diffusers_loss(theirs), theirs)
    why = ddpm_pytorch_status()
    if why:
        out[DDP] = Skip(why)
    else:
        diff = ddpm_pytorch_diffusion(net, ddpm_pytorch_unet(net).train()).train()
        x01 = (x0 + 1) / 2  # it takes images in [0, 1] and normalises them itself
        out[DDP] = _optimised(lambda: diff(x01), diff.model)
    if which is not None:
        out = {k: v for k, v in out.items() if k in which}
    return out


def persistent_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Parameters and optimizer state: what lives between steps (each step frees its gradients)."""
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    for st in opt.state.values():
        n += sum(v.numel() * v.element_size() for v in st.values() if isinstance(v, torch.Tensor))
    return n


def denoising_step_counters(net: Network, batch: int, steps: int = 4) -> dict[str, Callable[[], object] | Skip]:
    """Sampling runs of ``steps`` steps to count operators per denoising step (divide by ``steps``), as they
    run on a GPU (fastddpm.sample in NCHW, its layout there)."""
    return sampling_providers(net, batch, steps, which=("fastddpm.sample (NCHW)", "fastddpm DDPMPipeline",
                                                        "diffusers DDPMPipeline", DDP))


def unet_forward_providers(net: Network, batch: int, backward: bool = False
                           ) -> dict[str, Callable[[], object] | Skip]:
    """One U-Net forward (eval, no_grad) per provider, the same weights for all but the last; with
    ``backward`` forward + backward of mean(out^2) in train mode (dropout 0 on both sides: the same
    computation), gradients freed after each call."""
    refuse_reference_run()  # never time the torch reference under fastddpm's name
    from .models import unet_variants

    C, H, W = net.image_shape
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, C, H, W, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    out: dict = {}
    for name, m in unet_variants(net.ours).items():
        xx = x.to(memory_format=torch.channels_last) if name == "fastddpm-cl" else x
        out[name] = _forward(m, xx, t, backward)
    why = ddpm_pytorch_status()
    out[DDP] = Skip(why) if why else _forward(ddpm_pytorch_unet(net), x, t, backward)
    return out


def _forward(m, x, t, backward=False):
    def run():
        m.train(backward)  # the "fastddpm" variant is the network itself, which other cases share
        with torch.set_grad_enabled(backward):
            y = m(x, t)
            y = y.sample if hasattr(y, "sample") else y
        if backward:
            y.pow(2).mean().backward()
            for p in m.parameters():
                p.grad = None
        return y
    return run
