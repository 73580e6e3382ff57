"""q_sample against the eager torch sequence diffusers' add_noise runs, CPU.

    python -m pytest benchmarks/bench_q_sample.py       # pytest-benchmark
    python benchmarks/bench_q_sample.py                 # interleaved A/B table

Bytes counted: x0 and noise read, x_t written (v target: one more write).
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import copy_bandwidth, interleaved, machine, median, spread, write_csv  # noqa: E402
from fastddpm.bench.ops import eager_add_noise, q_sample_bytes, q_sample_providers  # noqa: E402, F401

SHAPES = [(1, 3, 32, 32), (16, 3, 32, 32), (128, 3, 32, 32), (16, 3, 256, 256)]


def providers(shape):
    return q_sample_providers(shape, backend="cpu")


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
        for k, ts in times.items():
            med = median(ts)
            lo, hi = spread(ts)
            nbytes = q_sample_bytes(shape, k)
            print(f"{'x'.join(map(str, shape)):>16} {k:>28} {med * 1e6:10.1f} {lo * 1e6:7.1f}-{hi * 1e6:<7.1f}"
                  f" {base / med:8.2f}x {nbytes / med / 1e9:6.1f}")
            rows.append(dict(op="q_sample", provider=k, shape="x".join(map(str, shape)), median_s=med,
                             ratio_vs_eager=base / med, gbps=nbytes / med / 1e9))
    if csv_path:
        write_csv(csv_path, rows)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
