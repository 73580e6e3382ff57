"""q_sample against the eager torch sequence diffusers' add_noise runs, CPU.

    python -m pytest benchmarks/bench_q_sample.py       # pytest-benchmark
    python benchmarks/bench_q_sample.py [--csv FILE]    # interleaved table: medians, ratios, GB/s

Bytes counted: x0 and noise read, x_t written (v target: one more write); the bound copies exactly those.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastddpm.bench import suite as S  # noqa: E402
from fastddpm.bench.ops import q_sample_providers  # noqa: E402

SHAPES = [(1, 3, 32, 32), (16, 3, 32, 32), (128, 3, 32, 32), (16, 3, 256, 256)]


@pytest.mark.parametrize("shape", SHAPES[:3], ids=S.shape_str)
@pytest.mark.parametrize("provider", ["eager (diffusers add_noise)", "fastddpm cpu"])
def test_q_sample(benchmark, shape, provider):
    benchmark(q_sample_providers(shape)[provider])


if __name__ == "__main__":
    S.script_main(__doc__, lambda a: [S.op_case("q_sample", s, a.compile, target_sample_s=0.005) for s in SHAPES])
