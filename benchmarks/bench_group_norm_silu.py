"""GroupNorm+SiLU: the fused op against eager torch at the DDPM U-Net's shapes, CPU.

    python -m pytest benchmarks/bench_group_norm_silu.py           # pytest-benchmark
    python benchmarks/bench_group_norm_silu.py [--rounds 15] [--csv FILE]

Providers: ``fastddpm`` (fastddpm.ops.group_norm_silu, auto backend: the C++ kernel on the CPU), ``eager``
(F.silu(F.group_norm(x))), ``eager (in-place silu)`` (forward only) and the copy of the minimum bytes (x
read, y written; forward+backward: x and dy read, dx written), whose time over the fused op's is the
fraction of copy bandwidth the fused op reaches. Then the peak resident memory of forward+backward through
6 x (conv -> GroupNorm+SiLU) at 16x128x32x32, fused and eager, each in a fresh process.
"""

import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastddpm.bench import suite as S  # noqa: E402
from fastddpm.bench.ops import group_norm_silu_providers  # noqa: E402

# The U-Net's GroupNorm inputs (C, H, W), at batch 1 and 16.
SHAPES = [(b, c, h, h) for b in (1, 16) for (c, h) in ((128, 32), (256, 16), (256, 8), (256, 4))]


@pytest.mark.parametrize("shape", SHAPES, ids=S.shape_str)
@pytest.mark.parametrize("provider", ["fastddpm", "eager", "eager (in-place silu)"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_group_norm_silu(benchmark, mode, provider, shape):
    fns = group_norm_silu_providers(shape, backward=mode == "fwd+bwd")
    if provider not in fns:
        pytest.skip("in-place silu on group_norm's output cannot be differentiated with a saved output")
    benchmark.group = f"{mode} {shape}"
    benchmark(fns[provider])


_PEAK_SCRIPT = r"""
import sys, torch
from torch import nn
from fastddpm.nn import GroupNormSiLU
from fastddpm.bench.timing import peak_rss_mib
torch.manual_seed(0)
layers = []
for _ in range(6):
    layers += [nn.Conv2d(128, 128, 3, padding=1),
               GroupNormSiLU(32, 128) if sys.argv[1] == "fused" else nn.Sequential(nn.GroupNorm(32, 128), nn.SiLU())]
net = nn.Sequential(*layers)
x = torch.randn(16, 128, 32, 32)
stor = {}
def step():
    def pack(t):  # bytes kept for the backward, each storage once (x of a block may be shared)
        stor[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = net(x).sum()
    loss.backward()
print(peak_rss_mib(step), sum(stor.values()) / 2**20)
"""


def peak_memory_mib(kind: str) -> tuple[float, float]:
    """(peak resident MiB that a first forward+backward through 6 conv -> GroupNorm+SiLU blocks at
    16x128x32x32 adds, MiB of tensors saved for the backward), in a fresh process."""
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, kind], capture_output=True, text=True, check=True)
    peak, saved = out.stdout.strip().splitlines()[-1].split()
    return float(peak), float(saved)


def test_peak_memory_stack():
    fused, eager = peak_memory_mib("fused"), peak_memory_mib("eager")
    print(f"peak / saved MiB: fused {fused} eager {eager}")


if __name__ == "__main__":
    S.op_script(__doc__, ["group_norm_silu fwd", "group_norm_silu fwd+bwd"], SHAPES, rounds=15)
    mem = {k: peak_memory_mib(k) for k in ("fused", "eager")}
    print("fwd+bwd through 6 x (conv -> GroupNorm+SiLU), 16x128x32x32 fp32: (peak RSS MiB, saved MiB):", mem)
