"""Sampling: fastddpm's scheduler step and sampling loop against diffusers', on this CPU.

    python -m pytest benchmarks/bench_sampling.py     # pytest-benchmark, one provider at a time
    python benchmarks/bench_sampling.py step counts   # step() table, dispatch counts
    python benchmarks/bench_sampling.py runs --runs cifar10:1:50 digits:16:1000 [--rounds 3]
    python benchmarks/bench_sampling.py dpmpp runs --runs digits:64:20 --providers "fastddpm.sample (philox)" \
        "fastddpm.sample (philox, NCHW)" "diffusers DPMSolverMultistep loop" "fastddpm.sample dpm++2m"

Sections (default: step counts runs):
* step: step() alone at batch 16 (3x32x32), interleaved: diffusers.DDPMScheduler.step vs
  fastddpm.DDPMScheduler.step (both with a torch.Generator: the same numbers), the fused step with
  in-kernel Philox noise (what fastddpm.sample(noise="philox") runs) and torch.randn alone, a component:
  the draw a generator-compatible step cannot avoid.
* dpmpp: one DPM-Solver++(2M) update at batch 16: diffusers' DPMSolverMultistepScheduler.step against the
  fused ops.dpmpp_step and the reference in eager torch.
* counts: per call, the operators dispatched and the bytes of tensors they allocate (fastddpm.bench.countops).
* runs: whole sampling runs with the same weights, interleaved, as MODEL:BATCH:STEPS (models: cifar10, the
  DDPM CIFAR-10 U-Net with random weights; digits, the shipped digits model); providers: those of
  fastddpm.bench.workloads.sampling_providers.

Every section prints the load average before and after it.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fastddpm  # noqa: E402
from fastddpm import ops  # noqa: E402
from fastddpm.bench import suite as S  # noqa: E402
from fastddpm.bench.countops import count  # noqa: E402
from fastddpm.bench.models import diffusers_unet, network  # noqa: E402
from fastddpm.bench.timing import load_average, machine  # noqa: E402
from fastddpm.bench.workloads import sampling_providers  # noqa: E402

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


def dpmpp_providers(shape=SHAPE):
    """One second-order DPM-Solver++(2M) update: diffusers' step() in steady state (its step index rewound
    each call), the fused op, and the reference's eager torch in fp32."""
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


@pytest.mark.parametrize("provider", ["diffusers step() (generator)", "fastddpm step() (generator)",
                                      "fastddpm fused step (philox)"])
def test_step(benchmark, provider):
    pytest.importorskip("diffusers")
    benchmark(step_providers()[provider])


def dispatch_table(batch: int = 1) -> list[tuple[str, int, int, dict]]:
    import diffusers

    x, m = torch.randn(SHAPE), torch.randn(SHAPE)
    theirs, ours = diffusers.DDPMScheduler(), fastddpm.DDPMScheduler()
    g = torch.Generator().manual_seed(0)
    t = torch.tensor(500)
    net = network("cifar10")
    unet, fu = diffusers_unet(net), net.ours
    xb, tb = torch.randn(batch, 3, 32, 32), torch.full((batch,), 500)
    rows = []
    for name, fn in [("diffusers step() (batch 16)", lambda: theirs.step(m, t, x, generator=g)),
                     ("fastddpm step() (batch 16)", lambda: ours.step(m, t, x, generator=g)),
                     ("fastddpm fused step, philox (batch 16)",
                      lambda: ops.ddpm_step(x, m, 500, ours.schedule, noise="philox", seed=1)),
                     (f"diffusers UNet2DModel forward (batch {batch})", lambda: unet(xb, tb).sample),
                     (f"fastddpm UNet forward (batch {batch})", lambda: fu(xb, tb))]:
        c = count(fn)
        rows.append((name, c.ops, c.bytes, c.names))
    return rows


def section_counts() -> None:
    print("\n## operators dispatched and bytes allocated per call (TorchDispatchMode)\n")
    print("| what | aten ops | bytes allocated | ops |")
    print("|---|---|---|---|")
    for name, n, b, names in dispatch_table():
        which = ", ".join(f"{k.split('.')[-1]} x{v}" if v > 1 else k.split(".")[-1] for k, v in names.items())
        print(f"| {name} | {n} | {b:,} | {which if n <= 12 else '...'} |")


def _runs_plan(specs, which, warmup, rounds):
    out = []
    for spec in specs:
        try:
            name, batch, steps = spec.split(":")
            batch, steps = int(batch), int(steps)
        except ValueError:
            raise S.OptionError(f"--runs: expected MODEL:BATCH:STEPS (e.g. cifar10:1:50), got {spec!r}") from None
        if name not in ("cifar10", "digits") or batch < 1 or steps < 1:
            raise S.OptionError(f"--runs: expected MODEL:BATCH:STEPS with MODEL cifar10 or digits and positive BATCH "
                             f"and STEPS, got {spec!r}")
        out.append(S.Case("sampling", f"sampling {name}, {steps} steps", f"batch {batch}", warmup=warmup, rounds=rounds,
                          build=lambda n=name, b=batch, s=steps: sampling_providers(network(n), b, s, tuple(which)),
                          rate=lambda p, b=batch: (b, "images/s")))
        if {"diffusers DDPMPipeline", "fastddpm DDPMPipeline"} <= set(which):
            short = sampling_providers(network(name), batch, min(steps, 4),
                                       ("diffusers DDPMPipeline", "fastddpm DDPMPipeline"))
            a, b = (short[k]().images for k in ("diffusers DDPMPipeline", "fastddpm DDPMPipeline"))
            print(f"{spec}: fastddpm DDPMPipeline vs diffusers (same generator, {min(steps, 4)} steps), max "
                  f"|difference| of the images in [0, 1]: {abs(a - b).max():.2e}")
    return out


def _plan(a):
    sys.stdout.reconfigure(line_buffering=True)  # tables appear as they are measured
    print(f"machine: {machine()}; load average {load_average()}")
    kw = dict(target_sample_s=0.005, rounds=a.step_rounds)
    out = [S.Case("op", "step()", "16x3x32x32", step_providers, **kw)] if "step" in a.sections else []
    if "dpmpp" in a.sections:
        out.append(S.Case("op", "DPM-Solver++(2M) update", "16x3x32x32", dpmpp_providers, **kw))
    if "counts" in a.sections:
        section_counts()
    if "runs" in a.sections:
        out += _runs_plan(a.runs, a.providers, a.warmup, a.rounds)
    return out


def _extend(ap):
    ap.add_argument("sections", nargs="*", default=["step", "counts", "runs"],
                    choices=["step", "dpmpp", "counts", "runs"])
    ap.add_argument("--runs", nargs="+", default=["cifar10:1:20"], metavar="MODEL:BATCH:STEPS",
                    help="whole-sampling runs (models: cifar10, digits; default: cifar10:1:20)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs of each provider first (default 1)")
    ap.add_argument("--step-rounds", type=int, default=40, help="interleaved rounds of the step tables")


def main(argv=None) -> None:
    import argparse

    # --providers of the sections: a list of names (script_main's is a comma-separated filter)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--providers", nargs="+", default=None)
    known, rest = pre.parse_known_args(argv)
    S.script_main(__doc__, lambda a: _plan(_with(a, known.providers)), rest, rounds=3, extend=_extend)


def _with(a, providers):
    a.providers = providers or ["diffusers DDPMPipeline", "fastddpm DDPMPipeline", "fastddpm.sample (philox)"]
    return a


if __name__ == "__main__":
    main()
