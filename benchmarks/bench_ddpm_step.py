"""ddpm_step against diffusers' DDPMScheduler.step (the eager torch sequence it runs), CPU.

    python -m pytest benchmarks/bench_ddpm_step.py      # pytest-benchmark, one provider at a time
    python benchmarks/bench_ddpm_step.py [--csv FILE]   # interleaved table: medians, ratios, GB/s

Bytes counted: sample and model output read, x_{t-1} written (plus the noise read when it is a tensor).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastddpm.bench import suite as S  # noqa: E402
from fastddpm.bench.ops import ddpm_step_providers  # noqa: E402

SHAPES = [(1, 3, 32, 32), (16, 3, 32, 32), (16, 3, 256, 256)]
test_ddpm_step = S.pytest_benchmark(lambda s: ddpm_step_providers(s, noise="generator"), SHAPES[:2], [
    "diffusers step (generator)", "fastddpm cpu (generator)", "fastddpm cpu (philox)"], needs="diffusers")

if __name__ == "__main__":
    S.op_script(__doc__, ["ddpm_step, generator noise", "ddpm_step, tensor noise"], SHAPES)
