"""ddpm_step against diffusers' DDPMScheduler.step (the eager torch sequence it runs), CPU.

    python -m pytest benchmarks/bench_ddpm_step.py      # pytest-benchmark, one provider at a time
    python benchmarks/bench_ddpm_step.py [--csv FILE]   # interleaved table: medians, ratios, GB/s

Bytes counted: sample and model output read, x_{t-1} written (plus the noise read when it is a tensor).
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastddpm.bench import suite as S  # noqa: E402
from fastddpm.bench.ops import ddpm_step_providers  # noqa: E402

SHAPES = [(1, 3, 32, 32), (16, 3, 32, 32), (16, 3, 256, 256)]


@pytest.mark.parametrize("shape", SHAPES[:2], ids=S.shape_str)
@pytest.mark.parametrize("provider", ["diffusers step (generator)", "fastddpm cpu (generator)",
                                      "fastddpm cpu (philox)"])
def test_ddpm_step(benchmark, shape, provider):
    pytest.importorskip("diffusers")
    benchmark(ddpm_step_providers(shape, noise="generator")[provider])


if __name__ == "__main__":
    S.script_main(__doc__, lambda a: [S.op_case(f"ddpm_step, {n} noise", s, a.compile, target_sample_s=0.005)
                                      for s in SHAPES for n in ("generator", "tensor")])
