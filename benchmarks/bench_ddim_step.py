"""ddim_step against diffusers' DDIMScheduler.step (the eager torch sequence it runs), CPU.

    python -m pytest benchmarks/bench_ddim_step.py      # pytest-benchmark, one provider at a time
    python benchmarks/bench_ddim_step.py [--csv FILE]   # interleaved table: medians, ratios, GB/s

One step of a 50-step schedule (t = 500 to 480, epsilon, clipped x0). Bytes counted: sample and model
output read, x_{t-1} written (plus the noise read when it is a tensor).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastddpm.bench import suite as S  # noqa: E402
from fastddpm.bench.ops import ddim_step_providers  # noqa: E402

SHAPES = [(1, 3, 32, 32), (16, 3, 32, 32), (16, 3, 256, 256)]
test_ddim_step = S.pytest_benchmark(ddim_step_providers, SHAPES[:2], [
    "diffusers step (eta 0)", "fastddpm cpu (eta 0)", "fastddpm cpu (eta 1, noise tensor)"], needs="diffusers")

if __name__ == "__main__":
    S.op_script(__doc__, ["ddim_step"], SHAPES)
