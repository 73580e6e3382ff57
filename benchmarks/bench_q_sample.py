"""q_sample against the eager torch sequence diffusers' add_noise runs, CPU.

    python -m pytest benchmarks/bench_q_sample.py       # pytest-benchmark
    python benchmarks/bench_q_sample.py                 # interleaved A/B table

Bytes counted: x0 and noise read, x_t written (v target: one more write).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import copy_bandwidth, interleaved, machine, median, spread, write_csv  # noqa: E402
from fastddpm import NoiseSchedule, ops  # noqa: E402

SHAPES = [(1, 3, 32, 32), (16, 3, 32, 32), (128, 3, 32, 32), (16, 3, 256, 256)]
SCHED = NoiseSchedule()


def eager_add_noise(x0, noise, t, ac):
    # diffusers' DDPMScheduler.add_noise, line by line
    sqrt_alpha_prod = ac[t] ** 0.5
    sqrt_alpha_prod = sqrt_alpha_prod.flatten()
    while len(sqrt_alpha_prod.shape) < len(x0.shape):
        sqrt_alpha_prod = sqrt_alpha_prod.unsqueeze(-1)
    sqrt_one_minus = (1 - ac[t]) ** 0.5
    sqrt_one_minus = sqrt_one_minus.flatten()
    while len(sqrt_one_minus.shape) < len(x0.shape):
        sqrt_one_minus = sqrt_one_minus.unsqueeze(-1)
    return sqrt_alpha_prod * x0 + sqrt_one_minus * noise


def providers(shape):
    x0, noise = torch.randn(shape), torch.randn(shape)
    t = torch.randint(0, 1000, (shape[0],))
    ac = SCHED.alphas_cumprod
    return {
        "eager (diffusers add_noise)": lambda: eager_add_noise(x0, noise, t, ac),
        "fastddpm cpu": lambda: ops.q_sample(x0, t, noise, SCHED, backend="cpu"),
        "fastddpm cpu (x_t and v)": lambda: ops.q_sample(x0, t, noise, SCHED, target="v", backend="cpu"),
        "torch copy (same bytes)": lambda: x0.clone(),
    }


@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("provider", ["eager (diffusers add_noise)", "fastddpm cpu"])
def test_q_sample(benchmark, shape, provider):
    benchmark(providers(shape)[provider])


def main(csv_path: str | None = None) -> None:
    bw = copy_bandwidth()
    print(f"# q_sample, {machine()}; copy bandwidth {bw / 1e9:.1f} GB/s")
    print(f"{'shape':>16} {'provider':>28} {'median us':>10} {'IQR us':>15} {'vs eager':>9} {'GB/s':>6}")
    rows = []
    for shape in SHAPES:
        times = interleaved(providers(shape), rounds=25 if shape[-1] <= 32 else 8)
        base = median(times["eager (diffusers add_noise)"])
        n = torch.Size(shape).numel()
        for k, ts in times.items():
            med = median(ts)
            lo, hi = spread(ts)
            nbytes = 4 * n * (4 if "and v" in k else (2 if "copy" in k else 3))
            print(f"{'x'.join(map(str, shape)):>16} {k:>28} {med * 1e6:10.1f} {lo * 1e6:7.1f}-{hi * 1e6:<7.1f}"
                  f" {base / med:8.2f}x {nbytes / med / 1e9:6.1f}")
            rows.append(dict(op="q_sample", provider=k, shape="x".join(map(str, shape)), median_s=med,
                             ratio_vs_eager=base / med, gbps=nbytes / med / 1e9))
    if csv_path:
        write_csv(csv_path, rows)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
