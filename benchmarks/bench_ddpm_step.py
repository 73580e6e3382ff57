"""ddpm_step against diffusers' DDPMScheduler.step (the eager torch sequence it runs), CPU.

    python -m pytest benchmarks/bench_ddpm_step.py      # pytest-benchmark, one provider at a time
    python benchmarks/bench_ddpm_step.py                # interleaved A/B table with medians and ratios

Bytes counted: sample and model output read, x_{t-1} written (plus noise read when it is a tensor).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import copy_bandwidth, interleaved, machine, median, spread, write_csv  # noqa: E402
from fastddpm import NoiseSchedule, ops  # noqa: E402

SHAPES = [(1, 3, 32, 32), (16, 3, 32, 32), (16, 3, 256, 256)]
SCHED = NoiseSchedule()


def providers(shape):
    import diffusers

    sch = diffusers.DDPMScheduler()
    x = torch.randn(shape)
    m = torch.randn(shape)
    z = torch.randn(shape)
    t = 500
    g = torch.Generator().manual_seed(0)
    return {
        "diffusers step (generator)": lambda: sch.step(m, t, x, generator=g).prev_sample,
        "fastddpm cpu (generator)": lambda: ops.ddpm_step(x, m, t, SCHED, generator=g, backend="cpu"),
        "fastddpm cpu (philox)": lambda: ops.ddpm_step(x, m, t, SCHED, noise="philox", seed=1, backend="cpu"),
        "fastddpm cpu (noise tensor)": lambda: ops.ddpm_step(x, m, t, SCHED, noise=z, backend="cpu"),
        "torch.randn alone": lambda: torch.randn(shape, generator=g),
    }


@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("provider", ["diffusers step (generator)", "fastddpm cpu (generator)",
                                      "fastddpm cpu (philox)"])
def test_ddpm_step(benchmark, shape, provider):
    pytest.importorskip("diffusers")
    benchmark(providers(shape)[provider])


def main(csv_path: str | None = None) -> None:
    bw = copy_bandwidth()
    print(f"# ddpm_step, {machine()}; copy bandwidth {bw / 1e9:.1f} GB/s")
    print(f"{'shape':>16} {'provider':>28} {'median us':>10} {'IQR us':>15} {'vs diffusers':>12} {'GB/s':>6}")
    rows = []
    for shape in SHAPES:
        fns = providers(shape)
        times = interleaved(fns, rounds=25 if shape[-1] <= 32 else 8)
        base = median(times["diffusers step (generator)"])
        n = torch.Size(shape).numel()
        for k, ts in times.items():
            med = median(ts)
            lo, hi = spread(ts)
            nbytes = 4 * n * (4 if "tensor" in k else 3)
            gbs = nbytes / med / 1e9 if k.startswith("fastddpm") else float("nan")
            print(f"{'x'.join(map(str, shape)):>16} {k:>28} {med * 1e6:10.1f} {lo * 1e6:7.1f}-{hi * 1e6:<7.1f}"
                  f" {base / med:11.2f}x {gbs:6.1f}")
            rows.append(dict(op="ddpm_step", provider=k, shape="x".join(map(str, shape)), median_s=med,
                             ratio_vs_diffusers=base / med, gbps=gbs))
    if csv_path:
        write_csv(csv_path, rows)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
