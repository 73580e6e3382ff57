"""Sampling: fastddpm's scheduler step and sampling loop against diffusers', on this CPU.

    python -m pytest benchmarks/bench_sampling.py     # pytest-benchmark, one provider at a time
    python benchmarks/bench_sampling.py step counts   # step() table, dispatch counts
    python benchmarks/bench_sampling.py runs --runs cifar10:1:50 digits:16:1000 [--rounds 3]
    python benchmarks/bench_sampling.py dpmpp runs --runs digits:64:20 --providers "fastddpm.sample (philox)" \
        "fastddpm.sample (philox, NCHW)" "diffusers DPMSolverMultistep loop" "fastddpm.sample dpm++2m"

Sections (default: step counts runs):
* step: step() alone at batch 16 (3x32x32), interleaved: diffusers.DDPMScheduler.step vs
  fastddpm.DDPMScheduler.step (both with a torch.Generator: the same numbers), the fused step with
  in-kernel Philox noise (ops.ddpm_step(noise="philox"), what fastddpm.sample(noise="philox") runs)
  and torch.randn alone, the floor of generator-compatible noise.
* dpmpp: one DPM-Solver++(2M) update at batch 16: diffusers' DPMSolverMultistepScheduler.step against the
  fused ops.dpmpp_step and the reference in eager torch.
* counts: per call, the operators dispatched and the bytes of tensors they allocate (a
  TorchDispatchMode counts every aten op and sums its outputs' sizes): the proxy for GPU launch count
  and memory traffic this GPU-less machine can measure.
* runs: whole sampling runs with the same weights, interleaved, as MODEL:BATCH:STEPS. cifar10 is the
  DDPM CIFAR-10 U-Net (35.7 M parameters, random init, 3x32x32); digits is the shipped digits model
  (fastddpm/assets, 687 k parameters, trained, 1x16x16). Providers: diffusers' DDPMPipeline with a
  diffusers UNet2DModel (fastddpm.compat.diffusers.to_diffusers of the same weights), fastddpm's
  DDPMPipeline (fastddpm UNet + fastddpm DDPMScheduler, the same generator and numbers), and
  fastddpm.sample with Philox noise (on the CPU in channels_last, its default there; "NCHW": the same run
  with channels_last=False); on request, DPM-Solver++(2M) runs of the same number of steps (diffusers'
  scheduler on diffusers' U-Net, and fastddpm.sample(sampler="dpm++2m")).

Every section prints the load average before and after it.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fastddpm  # noqa: E402
from benchmarks._common import interleaved, machine, median, spread  # noqa: E402
from fastddpm import ops  # noqa: E402
from fastddpm.bench.countops import CountOps  # noqa: E402
from fastddpm.bench.countops import count as _count  # noqa: E402

SHAPE = (16, 3, 32, 32)


def load() -> str:
    a, b, c = os.getloadavg()
    return f"load average {a:.2f} {b:.2f} {c:.2f}"


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


def count(fn) -> CountOps:
    """fn's operators and allocated bytes per call in steady state: one uncounted call first, so one-time
    work (the U-Net's cached time-projection weights, lazy initialisation) is not charged to it."""
    with torch.no_grad():
        fn()
    return _count(fn)


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


def models(name: str):
    """(diffusers UNet2DModel, fastddpm UNet) with the same weights, and the image shape."""
    from fastddpm.compat.diffusers import from_diffusers, to_diffusers

    if name == "cifar10":
        theirs = cifar_unet()
        return theirs, from_diffusers(theirs).eval(), (3, 32, 32)
    if name == "digits":
        from fastddpm import pretrained

        lm = pretrained.load_builtin("digits")
        ours = lm.model.eval()
        return to_diffusers(ours).eval(), ours, lm.image_shape
    raise ValueError(f"model: expected cifar10 or digits, got {name!r}")


def dispatch_table(batch: int = 1) -> list[tuple[str, int, int, dict]]:
    import diffusers

    rows = []
    x, m = torch.randn(16, 3, 32, 32), torch.randn(16, 3, 32, 32)
    theirs, ours = diffusers.DDPMScheduler(), fastddpm.DDPMScheduler()
    g = torch.Generator().manual_seed(0)
    t = torch.tensor(500)
    for name, fn in [("diffusers step() (batch 16)", lambda: theirs.step(m, t, x, generator=g)),
                     ("fastddpm step() (batch 16)", lambda: ours.step(m, t, x, generator=g)),
                     ("fastddpm fused step, philox (batch 16)",
                      lambda: ops.ddpm_step(x, m, 500, ours.schedule, noise="philox", seed=1))]:
        fn()  # once outside the count: first-call caches (backend, timestep tensors) are not per-step work
        c = count(fn)
        rows.append((name, c.ops, c.bytes, c.names))
    unet, fu, _ = models("cifar10")
    xb = torch.randn(batch, 3, 32, 32)
    tb = torch.full((batch,), 500)
    c = count(lambda: unet(xb, tb).sample)
    rows.append((f"diffusers UNet2DModel forward (batch {batch})", c.ops, c.bytes, c.names))
    c = count(lambda: fu(xb, tb))
    rows.append((f"fastddpm UNet forward (batch {batch})", c.ops, c.bytes, c.names))
    return rows


def section_step(rounds: int) -> None:
    print(f"\n## step() at batch 16, 3x32x32, fp32 (interleaved, {rounds} rounds of 10 calls, medians)\n")
    print(f"before: {load()}")
    times = interleaved(step_providers(), rounds=rounds, inner=10)
    print(f"after: {load()}\n")
    base = median(times["diffusers step() (generator)"])
    print("| provider | median (us) | IQR (us) | speed-up vs diffusers |")
    print("|---|---|---|---|")
    for k, v in times.items():
        lo, hi = spread(v)
        print(f"| {k} | {median(v) * 1e6:.0f} | {lo * 1e6:.0f}-{hi * 1e6:.0f} | {base / median(v):.2f}x |")


def section_counts() -> None:
    print("\n## operators dispatched and bytes allocated per call (TorchDispatchMode)\n")
    print("| what | aten ops | bytes allocated | ops |")
    print("|---|---|---|---|")
    for name, n, b, names in dispatch_table():
        which = ", ".join(f"{k.split('.')[-1]} x{v}" if v > 1 else k.split(".")[-1] for k, v in names.items())
        print(f"| {name} | {n} | {b:,} | {which if n <= 12 else '...'} |")


def run_providers(name: str, batch: int, steps: int, which: list[str]):
    import diffusers

    theirs, ours, img = models(name)
    shape = (batch, *img)
    pipe = diffusers.DDPMPipeline(unet=theirs, scheduler=diffusers.DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    fpipe = fastddpm.DDPMPipeline(ours, fastddpm.DDPMScheduler())
    fpipe.set_progress_bar_config(disable=True)

    def gen():
        return torch.Generator().manual_seed(0)

    fns = {
        "diffusers DDPMPipeline": lambda: pipe(batch_size=batch, num_inference_steps=steps, output_type="pt",
                                               generator=gen(), return_dict=False)[0],
        "fastddpm DDPMPipeline": lambda: fpipe(batch_size=batch, num_inference_steps=steps, output_type="pt",
                                               generator=gen(), return_dict=False)[0],
        "fastddpm.sample (philox)": lambda: fastddpm.sample(ours, shape, steps=steps, noise="philox", seed=0,
                                                            progress=False),
        # the same run with the model in NCHW (fastddpm.sample's CPU default is channels_last)
        "fastddpm.sample (philox, NCHW)": lambda: fastddpm.sample(ours, shape, steps=steps, noise="philox", seed=0,
                                                                  progress=False, channels_last=False),
        # DPM-Solver++(2M) with the same number of model evaluations: diffusers' scheduler on diffusers' U-Net,
        # and fastddpm.sample (fused dpmpp_step, fastddpm U-Net)
        "diffusers DPMSolverMultistep loop": lambda: dpm_loop(theirs, shape, steps),
        "fastddpm.sample dpm++2m": lambda: fastddpm.sample(ours, shape, steps=steps, sampler="dpm++2m", seed=0,
                                                           progress=False),
    }
    return {k: v for k, v in fns.items() if k in which}


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


def dpmpp_providers(shape=SHAPE):
    """One second-order DPM-Solver++(2M) update at batch 16 (3x32x32): diffusers' step() in steady state (its
    step index rewound each call), the fused op, and the reference's eager torch in fp32."""
    import diffusers

    theirs = diffusers.DPMSolverMultistepScheduler()
    theirs.set_timesteps(20)
    x, m, prev = torch.randn(shape), torch.randn(shape), torch.randn(shape)
    t, tp, tl = (int(theirs.timesteps[i]) for i in (5, 6, 4))
    tt = theirs.timesteps[5]
    theirs.step(prev, theirs.timesteps[0], x)  # fills the model-output history

    def diffusers_step():
        theirs._step_index, theirs.lower_order_nums = 5, 2
        return theirs.step(m, tt, x).prev_sample

    sched = fastddpm.NoiseSchedule()
    return {
        "diffusers DPMSolverMultistep step()": diffusers_step,
        "fastddpm dpmpp_step (fused)": lambda: ops.dpmpp_step(x, m, t, sched, tp, prev, tl),
        "reference dpmpp_step (eager torch)": lambda: ops.dpmpp_step(x, m, t, sched, tp, prev, tl, backend="torch"),
    }


def section_dpmpp(rounds: int) -> None:
    print(f"\n## DPM-Solver++(2M) update at batch 16, 3x32x32, fp32 (interleaved, {rounds} rounds of 10 calls)\n")
    print(f"before: {load()}")
    times = interleaved(dpmpp_providers(), rounds=rounds, inner=10)
    print(f"after: {load()}\n")
    base = median(times["diffusers DPMSolverMultistep step()"])
    print("| provider | median (us) | IQR (us) | speed-up vs diffusers |")
    print("|---|---|---|---|")
    for k, v in times.items():
        lo, hi = spread(v)
        print(f"| {k} | {median(v) * 1e6:.0f} | {lo * 1e6:.0f}-{hi * 1e6:.0f} | {base / median(v):.2f}x |")


def section_runs(specs: list[str], rounds: int, which: list[str], warmup: int = 1) -> None:
    print(f"\n## whole sampling runs, same weights (interleaved; medians of {rounds} rounds after {warmup} "
          "warm-up run(s))\n")
    for spec in specs:
        try:
            name, batch, steps = spec.split(":")
            batch, steps = int(batch), int(steps)
        except ValueError:
            raise SystemExit(f"--runs: expected MODEL:BATCH:STEPS (e.g. cifar10:1:50), got {spec!r}") from None
        fns = run_providers(name, batch, steps, which)
        print(f"\n{name}, batch {batch}, {steps} steps; before: {load()}")
        times = interleaved(fns, rounds=rounds, inner=1, warmup=warmup)
        print(f"after: {load()}\n")
        if "diffusers DDPMPipeline" in fns and "fastddpm DDPMPipeline" in fns:
            short = run_providers(name, batch, min(steps, 4), ["diffusers DDPMPipeline", "fastddpm DDPMPipeline"])
            a, b = short["diffusers DDPMPipeline"](), short["fastddpm DDPMPipeline"]()
            print(f"fastddpm DDPMPipeline vs diffusers (same generator, {min(steps, 4)} steps), max |difference|: "
                  f"{(a - b).abs().max().item():.2e}\n")
        base = median(times["diffusers DDPMPipeline"]) if "diffusers DDPMPipeline" in times else None
        print("| provider | median (s) | range (s) | images/s | vs diffusers |")
        print("|---|---|---|---|---|")
        for k, v in times.items():
            ratio = f"{base / median(v):.2f}x" if base else "-"
            print(f"| {k} | {median(v):.3f} | {min(v):.3f}-{max(v):.3f} | {batch / median(v):.2f} | {ratio} |")


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sections", nargs="*", default=["step", "counts", "runs"],
                    choices=["step", "dpmpp", "counts", "runs"])
    ap.add_argument("--runs", nargs="+", default=["cifar10:1:20"], metavar="MODEL:BATCH:STEPS",
                    help="whole-sampling runs (models: cifar10, digits; default: cifar10:1:20)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of each whole run (default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs of each provider first (default 1)")
    ap.add_argument("--step-rounds", type=int, default=40, help="interleaved rounds of the step table")
    ap.add_argument("--providers", nargs="+", default=["diffusers DDPMPipeline", "fastddpm DDPMPipeline",
                                                       "fastddpm.sample (philox)"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    sys.stdout.reconfigure(line_buffering=True)  # tables appear as they are measured
    print(f"machine: {machine()}")
    if "step" in a.sections:
        section_step(a.step_rounds)
    if "dpmpp" in a.sections:
        section_dpmpp(a.step_rounds)
    if "counts" in a.sections:
        section_counts()
    if "runs" in a.sections:
        section_runs(a.runs, a.rounds, a.providers, a.warmup)


if __name__ == "__main__":
    main()
