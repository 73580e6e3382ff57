"""CUDA graphs for sampling: capture one denoising step (model forward + fused step), replay it.

A graph freezes every value passed by value at capture time, so nothing that changes from step to step
may be a Python number inside the captured region:

* t and prev_t are read from device tables (``GraphBuffers.t_table`` / ``prev_table``) at a device-side
  step index (``step_index``, incremented by the graph itself);
* the noise is drawn inside the graph: noise="torch" with a CUDA generator registered with the graph
  (torch's graph-safe Philox, whose offset advances on every replay); noise="philox" by the fused step's
  own in-kernel Philox, its counter offset a 0-d device tensor (``GraphBuffers.offset``) that the kernel
  reads and the graph advances by numel per step: element i of step k is normal(seed, (k + 1) * numel + i),
  the stream fastddpm.sample's eager loop uses, so the images are bitwise the same on the CPU.
* x lives in one static buffer that each replay overwrites.

``graph_step`` is the captured function; it also runs eagerly (any device), which is how the CPU tests
check it gives the same images as the plain loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .plan import SamplingPlan, call_model, fused_step, initial_noise, prepare, split_output

__all__ = ["GraphBuffers", "plan_buffers", "graph_step", "sample_cuda_graph"]


@dataclass
class GraphBuffers:
    """The static tensors a captured step reads and writes (all on the plan's device)."""

    x: torch.Tensor  # (B, ...) the images, overwritten in place by each step
    t_table: torch.Tensor  # (n,) int64
    prev_table: torch.Tensor  # (n,) int64
    offset: torch.Tensor  # () int64, Philox counter offset of the next step's noise, read by the kernel
    step_index: torch.Tensor  # (1,) int64, the step the next replay runs


def plan_buffers(plan: SamplingPlan, x_T: torch.Tensor) -> GraphBuffers:
    """Static buffers for ``plan``, with x initialised to ``x_T``."""
    if tuple(x_T.shape) != plan.shape:
        raise ValueError(f"x_T: expected shape {plan.shape}, got {tuple(x_T.shape)}")
    dev = plan.device
    return GraphBuffers(
        x=x_T.to(device=dev, dtype=plan.dtype).clone(memory_format=torch.contiguous_format),
        t_table=plan.t.to(dev),
        prev_table=plan.prev_t.to(dev),
        offset=torch.tensor(plan.philox_offset(0), dtype=torch.int64, device=dev),
        step_index=torch.zeros(1, dtype=torch.int64, device=dev),
    )


def reset_buffers(plan: SamplingPlan, buf: GraphBuffers, x_T: torch.Tensor) -> None:
    """Back to step 0 in place (the addresses a captured graph reads stay the same)."""
    buf.x.copy_(x_T)
    buf.step_index.zero_()
    buf.offset.fill_(plan.philox_offset(0))


def graph_step(model, plan: SamplingPlan, buf: GraphBuffers, generator=None, seed: int | None = None,
               backend: str = "auto", step=None) -> None:
    """One denoising step that reads everything step-dependent from device tensors. In place on buf.x.
    ``step``: the plan's prepared step op (:func:`~fastddpm.samplers.plan.prepare`), prepared here if None."""
    step = step if step is not None else prepare(plan, backend)
    B = plan.shape[0]
    i = buf.step_index.expand(B)  # (B,) views of the one counter
    t = buf.t_table.index_select(0, i)  # (B,)
    prev = buf.prev_table.index_select(0, i)  # (B,)
    x = buf.x
    m, pv = split_output(plan, call_model(model, x, t), x)
    if plan.sampler == "ddim" and plan.eta == 0:
        z = "none"
    elif plan.noise == "philox":
        z = "philox"  # in the kernel, at the offset buf.offset holds when the step runs (or replays)
    else:
        # Drawn at t = 0 too (the step adds none there): a graph cannot branch on t.
        gd = generator.device if generator is not None else x.device
        z = torch.randn(plan.shape, generator=generator, device=gd, dtype=plan.dtype)
    new = fused_step(plan, step, x, m, pv, t, prev, z, None, seed, buf.offset)
    x.copy_(new)
    buf.step_index.add_(1)
    buf.offset.add_(plan.numel)


def sample_cuda_graph(model, plan: SamplingPlan, *, generator=None, seed=None, progress=True, callback=None,
                      return_intermediates=False, backend="auto"):
    """fastddpm.sample(..., cuda_graph=True): capture graph_step once, replay it plan.num_steps times."""
    if not torch.cuda.is_available():
        raise RuntimeError(
            "cuda_graph=True: CUDA graphs need a CUDA device, and torch.cuda.is_available() is False here; "
            "call sample(..., cuda_graph=False)"
        )
    if plan.device.type != "cuda":
        raise RuntimeError(f"cuda_graph=True: the images must be on a CUDA device, got device={plan.device}")
    if plan.noise == "torch":
        if generator is None:
            generator = torch.Generator(device=plan.device)
            generator.seed()
        elif generator.device.type != "cuda":
            # A CPU generator cannot be advanced by a replay; seed a CUDA one from it, deterministically.
            s = int(torch.randint(0, 2**62, (1,), generator=generator).item())
            generator = torch.Generator(device=plan.device).manual_seed(s)
    step = prepare(plan, backend)
    x_T = initial_noise(plan, generator, seed)
    buf = plan_buffers(plan, x_T)
    # Warm up on a side stream (lazy initialisation, cuDNN autotuning) without disturbing the real run:
    # the RNG state and the buffers are restored afterwards.
    rng_state = generator.get_state() if generator is not None else None
    side = torch.cuda.Stream(device=plan.device)
    side.wait_stream(torch.cuda.current_stream(plan.device))
    with torch.cuda.stream(side):
        for _ in range(2):
            graph_step(model, plan, buf, generator, seed, step=step)
    torch.cuda.current_stream(plan.device).wait_stream(side)
    reset_buffers(plan, buf, x_T)
    if generator is not None:
        generator.set_state(rng_state)
    graph = torch.cuda.CUDAGraph()
    if generator is not None and hasattr(graph, "register_generator_state"):
        graph.register_generator_state(generator)
    with torch.cuda.graph(graph):
        graph_step(model, plan, buf, generator, seed, step=step)
    # Capture does not execute: reset once more (capture recorded the increments, not applied them).
    reset_buffers(plan, buf, x_T)
    intermediates = []
    from tqdm.auto import tqdm

    t_host = plan.t.tolist()
    for i in tqdm(range(plan.num_steps), disable=not progress, desc=f"fastddpm {plan.sampler} (CUDA graph)"):
        graph.replay()
        if callback is not None:
            callback(i, t_host[i], buf.x)
        if return_intermediates:
            intermediates.append(buf.x.clone())
    x = buf.x.clone()
    return (x, intermediates) if return_intermediates else x
