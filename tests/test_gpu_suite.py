"""The CPU-runnable parts of benchmarks/gpu_suite.py: planning, table rendering, refusal without a GPU."""

import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import gpu_suite  # noqa: E402


def test_plan_covers_every_op_and_dtype():
    cases = gpu_suite.plan()
    assert {c.op for c in cases} == {"q_sample", "ddpm_step", "group_norm_silu", "attention"}
    assert {c.dtype for c in cases} == {torch.float32, torch.float16, torch.bfloat16}
    for c in cases:
        assert c.bytes_moved > 0
        if c.op == "attention":
            B, H, N, d = c.shape
            assert c.flops == 4.0 * B * H * N * N * d
    assert len(gpu_suite.plan(quick=True)) < len(cases)


def test_render_table():
    rows = [dict(op="q_sample", shape="16x3x32x32", dtype="float32", provider="triton", ms=0.01, gbps=150.0,
                 tflops=float("nan"), err=1e-7, ok="yes"),
            dict(op="attention", shape="1x1x64x512", dtype="float16", provider="cuda", ok="error: X")]
    text = gpu_suite.render_table(rows)
    assert "q_sample" in text and "150" in text and "error: X" in text
    assert len(text.splitlines()) == 4


def test_error_metric():
    ref = torch.tensor([2.0, -4.0], dtype=torch.float64)
    assert abs(gpu_suite.error(torch.tensor([2.0, -4.5]), ref) - 0.5 / 4) < 1e-12


def test_refuses_clearly_without_gpu():
    if torch.cuda.is_available():
        return
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_suite.py"), "--quick"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "no CUDA device" in r.stderr
