"""q_sample against the eager torch sequence diffusers' add_noise runs, CPU.

    python -m pytest benchmarks/bench_q_sample.py       # pytest-benchmark
    python benchmarks/bench_q_sample.py [--csv FILE]    # interleaved table: medians, ratios, GB/s

Bytes counted: x0 and noise read, x_t written (v target: one more write); the bound copies exactly those.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastddpm.bench import suite as S  # noqa: E402
from fastddpm.bench.ops import q_sample_providers  # noqa: E402

SHAPES = [(1, 3, 32, 32), (16, 3, 32, 32), (128, 3, 32, 32), (16, 3, 256, 256)]
test_q_sample = S.pytest_benchmark(q_sample_providers, SHAPES[:3], ["eager (diffusers add_noise)", "fastddpm cpu"])

if __name__ == "__main__":
    S.op_script(__doc__, ["q_sample"], SHAPES)
