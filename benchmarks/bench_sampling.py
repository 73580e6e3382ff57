"""Sampling: fastddpm's scheduler step and sampling loop against diffusers', on this CPU.

    python -m pytest benchmarks/bench_sampling.py          # pytest-benchmark, one provider at a time
    python benchmarks/bench_sampling.py [--full]           # interleaved tables: step(), dispatch counts,
                                                           # whole sampling runs (--full: batch 16 too)

What is measured:
* step() alone at batch 16 (3x32x32): diffusers.DDPMScheduler.step vs fastddpm.DDPMScheduler.step (both
  with a torch.Generator, the same numbers) and the fused step with in-kernel Philox noise (what
  fastddpm.sample(noise="philox") runs); torch.randn alone as the floor of generator-compatible noise.
* per denoising step, the operators dispatched and the bytes of tensors they allocate (a
  TorchDispatchMode counts every aten op and sums its outputs' sizes): the proxy for GPU launch count
  and memory traffic this GPU-less machine can measure.
* whole sampling runs with the same weights (DDPM CIFAR-10 U-Net, random init): diffusers' DDPMPipeline
  vs fastddpm (the UNet converted with fastddpm.compat.diffusers.from_diffusers + fastddpm.sample).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fastddpm  # noqa: E402
from benchmarks._common import interleaved, machine, median, spread  # noqa: E402
from fastddpm import ops  # noqa: E402

SHAPE = (16, 3, 32, 32)


def step_providers(shape=SHAPE):
    import diffusers

    theirs, ours = diffusers.DDPMScheduler(), fastddpm.DDPMScheduler()
    x, m = torch.randn(shape), torch.randn(shape)
    g1, g2, g3 = (torch.Generator().manual_seed(0) for _ in range(3))
    t = torch.tensor(500)  # as a pipeline passes it: an element of scheduler.timesteps
    return {
        "diffusers step() (generator)": lambda: theirs.step(m, t, x, generator=g1).prev_sample,
        "fastddpm step() (generator)": lambda: ours.step(m, t, x, generator=g2).prev_sample,
        "fastddpm fused step (philox)": lambda: ops.ddpm_step(x, m, 500, ours.schedule, noise="philox", seed=1,
                                                              clip_sample=True),
        "torch.randn alone": lambda: torch.randn(shape, generator=g3),
    }


@pytest.mark.parametrize("provider", ["diffusers step() (generator)", "fastddpm step() (generator)",
                                      "fastddpm fused step (philox)"])
def test_step(benchmark, provider):
    pytest.importorskip("diffusers")
    benchmark(step_providers()[provider])


class CountOps(TorchDispatchMode):
    """Counts aten ops and the bytes of the tensors they return (views and in-place ops excluded)."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.bytes = 0
        self.names: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        name = str(func.overloadpacket)
        self.names[name] = self.names.get(name, 0) + 1
        schema = func._schema
        aliasing = any(r.alias_info is not None for r in schema.returns)
        if not aliasing:
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(o, torch.Tensor):
                    self.bytes += o.numel() * o.element_size()
        return out


def count(fn) -> CountOps:
    with torch.no_grad(), CountOps() as c:
        fn()
    return c


def cifar_unet():
    import diffusers

    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32, norm_eps=1e-6, resnet_time_scale_shift="default", act_fn="silu",
        attention_head_dim=None, flip_sin_to_cos=False, freq_shift=1, center_input_sample=False,
    ).eval()


def dispatch_table(batch: int = 1) -> list[tuple[str, int, int]]:
    import diffusers

    from fastddpm.compat.diffusers import from_diffusers

    rows = []
    x, m = torch.randn(16, 3, 32, 32), torch.randn(16, 3, 32, 32)
    theirs, ours = diffusers.DDPMScheduler(), fastddpm.DDPMScheduler()
    g = torch.Generator().manual_seed(0)
    t = torch.tensor(500)
    for name, fn in [("diffusers step() (batch 16)", lambda: theirs.step(m, t, x, generator=g)),
                     ("fastddpm step() (batch 16)", lambda: ours.step(m, t, x, generator=g)),
                     ("fastddpm fused step, philox (batch 16)",
                      lambda: ops.ddpm_step(x, m, 500, ours.schedule, noise="philox", seed=1))]:
        c = count(fn)
        rows.append((name, c.ops, c.bytes))
    unet = cifar_unet()
    xb = torch.randn(batch, 3, 32, 32)
    tb = torch.full((batch,), 500)
    fu = from_diffusers(unet).eval()
    c = count(lambda: unet(xb, tb).sample)
    rows.append((f"diffusers UNet2DModel forward (batch {batch})", c.ops, c.bytes))
    c = count(lambda: fu(xb, tb))
    rows.append((f"fastddpm UNet forward (batch {batch})", c.ops, c.bytes))
    return rows


def main(full: bool = False, steps: int = 20, rounds: int = 3) -> None:
    import diffusers

    sys.stdout.reconfigure(line_buffering=True)  # tables appear as they are measured

    from fastddpm.compat.diffusers import from_diffusers

    print(f"machine: {machine()}")
    print("\n## step() at batch 16, 3x32x32, fp32 (interleaved, medians of 5-call means)\n")
    times = interleaved(step_providers(), rounds=40, inner=10)
    base = median(times["diffusers step() (generator)"])
    print("| provider | median (us) | IQR (us) | speed-up vs diffusers |")
    print("|---|---|---|---|")
    for k, v in times.items():
        lo, hi = spread(v)
        print(f"| {k} | {median(v) * 1e6:.0f} | {lo * 1e6:.0f}-{hi * 1e6:.0f} | {base / median(v):.2f}x |")

    print("\n## operators dispatched and bytes allocated per call (TorchDispatchMode)\n")
    print("| what | aten ops | bytes allocated |")
    print("|---|---|---|")
    for name, n, b in dispatch_table():
        print(f"| {name} | {n} | {b:,} |")

    print("\n## whole sampling runs, same weights (CIFAR-10 DDPM U-Net, random init)\n")
    unet = cifar_unet()
    fu = from_diffusers(unet).eval()
    configs = [(1, steps)] + ([(16, 5)] if full else [])
    for batch, steps in configs:
        pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler())
        pipe.set_progress_bar_config(disable=True)
        ours = fastddpm.DDPMPipeline(fu, fastddpm.DDPMScheduler())
        ours.set_progress_bar_config(disable=True)
        fns = {
            "diffusers DDPMPipeline": lambda p=pipe, b=batch, n=steps: p(
                batch_size=b, num_inference_steps=n, output_type="pt", generator=torch.Generator().manual_seed(0)),
            "fastddpm DDPMPipeline (fastddpm UNet)": lambda p=ours, b=batch, n=steps: p(
                batch_size=b, num_inference_steps=n, output_type="pt", generator=torch.Generator().manual_seed(0)),
            "fastddpm.sample (fastddpm UNet, philox)": lambda b=batch, n=steps: fastddpm.sample(
                fu, (b, 3, 32, 32), steps=n, noise="philox", seed=0, progress=False),
        }
        times = interleaved(fns, rounds=rounds, inner=1, warmup=1)
        base = median(times["diffusers DDPMPipeline"])
        print(f"\nbatch {batch}, {steps} steps:\n")
        print("| provider | median (s) | images/s | speed-up |")
        print("|---|---|---|---|")
        for k, v in times.items():
            print(f"| {k} | {median(v):.2f} | {batch / median(v):.2f} | {base / median(v):.2f}x |")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true", help="also batch 16 whole-sampling runs")
    ap.add_argument("--steps", type=int, default=20, help="denoising steps of the whole-sampling runs")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    main(full=a.full, steps=a.steps, rounds=a.rounds)
