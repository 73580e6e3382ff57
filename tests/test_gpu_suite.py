"""The CPU-runnable parts of benchmarks/gpu_suite.py: planning, inputs, providers and float64 references
(on the CPU backends, and the triton one through Triton's interpreter), rates, table rendering, CSV rows, the
exit code, refusal without a GPU."""

import ast
import csv
import dataclasses
import inspect
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import gpu_suite  # noqa: E402


def test_plan_covers_every_op_mode_and_dtype():
    cases = gpu_suite.plan()
    kinds = {(c.op, c.label) for c in cases}
    assert {c.op for c in cases} == {"q_sample", "ddpm_step", "ddim_step", "dpmpp_step", "group_norm_silu",
                                     "attention"}
    for label in ("ddpm_step[noise=tensor]", "ddpm_step[noise=philox]", "ddim_step[eta=0]", "ddim_step[eta=1]",
                  "group_norm_silu", "group_norm_silu[backward]", "attention", "attention[backward]"):
        assert label in {k[1] for k in kinds}, label
    assert {c.dtype for c in cases} == {torch.float32, torch.float16, torch.bfloat16}
    for c in cases:
        es = torch.finfo(c.dtype).bits // 8
        n = es * c.shape[0] * c.shape[1] * c.shape[2] * c.shape[3]
        sizes = {"q_sample": 3, "ddpm_step": 4 if c.extra.get("noise") == "tensor" else 3, "dpmpp_step": 4,
                 "ddim_step": 4 if c.extra.get("eta") else 3, "group_norm_silu": 5 if c.backward else 2,
                 "attention": 12 if c.backward else 4}  # the minimum: inputs read once, outputs written once
        assert gpu_suite.nbytes(c) == sizes[c.op] * n, c.label
        if c.op == "attention":
            B, H, N, d = c.shape
            assert gpu_suite.flops(c) == 4.0 * B * H * N * N * d * (3.5 if c.backward else 1.0)
    quick = gpu_suite.plan(quick=True)
    assert len(quick) < len(cases)
    assert {c.label for c in quick} >= {"q_sample", "ddpm_step[noise=philox]", "ddim_step[eta=0]", "dpmpp_step",
                                         "group_norm_silu[backward]", "attention[backward]"}
    assert any(c.shape == (64, 3, 256, 256) for c in quick)  # a bandwidth-bound size, not only launch-bound


def _small(case):
    shape = {"q_sample": (2, 3, 8, 8), "ddpm_step": (2, 3, 8, 8), "ddim_step": (2, 3, 8, 8), "dpmpp_step": (2, 3, 8, 8),
             "group_norm_silu": (2, 64, 4, 4), "attention": (2, 1, 16, 8)}[case.op]
    return dataclasses.replace(case, shape=shape)


def _kinds():
    seen = {}
    for c in gpu_suite.plan():
        seen.setdefault((c.label, c.dtype), _small(c))
    return list(seen.values())


@pytest.mark.parametrize("case", _kinds(),
                         ids=lambda c: f"{c.label}-{str(c.dtype).replace('torch.', '')}")
def test_providers_match_float64_on_cpu(case):
    """The suite's own inputs, providers and float64 references, run on the CPU backends: every provider
    must be within its bound (so a wrong reference or a mis-wired provider fails here, not on the GPU)."""
    dev = torch.device("cpu")
    rows = gpu_suite.check_and_time(case, dev, bench=lambda fn: 1.0, device_rates_={"copy_gbps": 10.0},
                                    backends=("cpu",), compile=False)
    names = {r["provider"] for r in rows}
    assert {"cpu", "torch eager"} <= names and ("sdpa" in names) == (case.op == "attention")
    for r in rows:
        assert r["ok"] == "yes", r
        assert r["ms"] == 1.0 and r["gbps"] == gpu_suite.nbytes(case) * 1e-6 and r["bw_frac"] == r["gbps"] / 10.0


@pytest.mark.parametrize("case", _kinds(),
                         ids=lambda c: f"{c.label}-{str(c.dtype).replace('torch.', '')}")
def test_triton_provider_matches_float64_in_the_interpreter(case):
    """The suite's triton provider (the one it times on a GPU), run through Triton's CPU interpreter: its
    wiring (arguments, dtype, the gradients it returns) against the same float64 reference and bound."""
    from fastddpm.ops import _dispatch

    dev = torch.device("cpu")
    why = _dispatch.backend_unavailable_reason("triton", case.op, dev)
    if why is not None:
        pytest.skip(f"triton on the CPU: {why}")
    if case.op == "group_norm_silu":  # the interpreter runs one program per (sample, group): one sample
        case = dataclasses.replace(case, shape=(1, *case.shape[1:]))
    rows = gpu_suite.check_and_time(case, dev, bench=lambda fn: 1.0, device_rates_={"copy_gbps": 10.0},
                                    backends=("triton",), compile=False)
    assert [r["provider"] for r in rows if r["provider"] not in ("torch eager", "sdpa")] == ["triton"]
    for r in rows:
        assert r["ok"] == "yes", r


def test_a_wrong_result_is_flagged():
    case = _small(gpu_suite.plan(quick=True)[0])
    sched, args = gpu_suite._inputs(case, torch.device("cpu"))
    ref = gpu_suite.reference64(case, sched, args)
    assert gpu_suite.error(ref.float(), ref) < gpu_suite.tolerance(case, "cuda")
    assert gpu_suite.error(ref.float() * 1.001, ref) > gpu_suite.tolerance(case, "cuda")


def test_rates_and_fractions():
    c = gpu_suite.Case("op", "attention", (1, 1, 1000, 1000), dtype=torch.bfloat16)  # 4 B N^2 d = 4 GFLOP
    r = gpu_suite.rates(c, 2.0, {"copy_gbps": 4.0, "bf16_tflops": 8.0, "fp32_tflops": 1.0}, nbytes_=2_000_000)
    assert r["gbps"] == 1.0 and r["bw_frac"] == 0.25
    assert r["tflops"] == 2.0 and r["flops_frac"] == 0.25  # 4 GFLOP in 2 ms
    r = gpu_suite.rates(gpu_suite.Case("op", "q_sample", (1,), dtype=torch.float32), 1.0, {})
    assert r["tflops"] != r["tflops"] and r["bw_frac"] != r["bw_frac"]  # NaN where nothing to count


def test_render_table():
    rows = [dict(op="q_sample", shape="16x3x32x32", dtype="float32", provider="triton", ms=0.01, gbps=150.0,
                 bw_frac=0.05, tflops=float("nan"), err=1e-7, ok="yes"),
            dict(op="attention", shape="1x1x64x512", dtype="float16", provider="cuda", ok="error: X")]
    text = gpu_suite.render_table(rows)
    assert "q_sample" in text and "150" in text and " 5 " in text and "error: X" in text
    assert len(text.splitlines()) == 4


def test_csv_rows(tmp_path):
    p = tmp_path / "g.csv"
    rows = [dict(op="q_sample", provider="cuda", ms=0.02, ok="yes")]
    gpu_suite.write_csv(str(p), [{**r, "copy_gbps": 3000.0} for r in rows])
    gpu_suite.write_csv(str(p), rows)
    with open(p, newline="") as f:
        got = list(csv.DictReader(f))
    assert len(got) == 2 and got[0]["copy_gbps"] == "3000.0" and got[1]["copy_gbps"] == ""
    assert got[0]["machine"] and got[0]["date"] and got[0]["torch"]


def test_timings_are_do_bench_medians(monkeypatch):
    """The tables report medians: every do_bench call must ask for one (its default return_mode is the mean)."""
    import triton.testing

    assert "return_mode" in inspect.signature(triton.testing.do_bench).parameters  # the installed triton's
    seen = []

    def fake(fn, **kw):
        seen.append(kw)
        return 1.5

    monkeypatch.setattr(triton.testing, "do_bench", fake)
    assert gpu_suite.bench_median(lambda: None) == 1.5 and seen == [{"return_mode": "median"}]
    # one CUDA mode: do_bench is called in fastddpm/bench/timing.py only, and there with return_mode="median"
    for name in ("benchmarks/gpu_suite.py", "benchmarks/bench_attention.py", "fastddpm/bench/timing.py"):
        with open(os.path.join(ROOT, name)) as f:
            tree = ast.parse(f.read())
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
                 and getattr(n.func, "attr", getattr(n.func, "id", None)) == "do_bench"]
        assert bool(calls) == name.endswith("timing.py"), name
        for c in calls:
            mode = {k.arg: k.value for k in c.keywords}.get("return_mode")
            assert isinstance(mode, ast.Constant) and mode.value == "median", f"{name}:{c.lineno}"


def test_error_metric():
    ref = torch.tensor([2.0, -4.0], dtype=torch.float64)
    assert abs(gpu_suite.error(torch.tensor([2.0, -4.5]), ref) - 0.5 / 4) < 1e-12
    assert gpu_suite.error((torch.tensor([2.0]), torch.tensor([1.5])),
                           (torch.tensor([2.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64))) == 0.5


@pytest.mark.parametrize("bad_ok", ["NO", "error: RuntimeError: no kernel image for this device"])
def test_exit_code_fails_on_a_wrong_or_failing_backend(monkeypatch, capsys, bad_ok):
    """main() on fake rows (the GPU run replaced): 0 only when every checked row is "yes" ("-": not checked)."""
    good = [dict(op="q_sample", shape="2x3x8x8", dtype="float32", provider="triton", ms=0.01, err=1e-7, ok="yes"),
            dict(op="unet+step", shape="16x3x32x32", dtype="float32", provider="eager", ms=36.0, ok="yes"),
            dict(op="unet+step", shape="1x3x32x32", dtype="float32", provider="torch.compile max-autotune",
                 ok="skipped: out of time")]
    bad = dict(op="attention", shape="1x1x16x8", dtype="bfloat16", provider="cuda", ms=0.02, err=0.25, ok=bad_ok)
    rows: list[dict] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_suite, "run", lambda quick, csv_path, **kw: list(rows))
    rows[:] = good
    assert gpu_suite.main(["--quick"]) == 0
    assert capsys.readouterr().err == ""
    rows[:] = [good[0], bad, *good[1:]]
    assert gpu_suite.main(["--quick"]) == 1
    err = capsys.readouterr().err
    assert "1 of 4 rows failed" in err and f"attention 1x1x16x8 bfloat16 cuda: {bad_ok}" in err
    assert ("2.50e-01" in err) == (bad_ok == "NO") and "q_sample" not in err


def test_refuses_clearly_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible here: the suite runs instead of refusing")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_suite.py"), "--quick"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "no CUDA device" in r.stderr


def _tiny_unet(dev, dtype):
    import fastddpm

    return fastddpm.UNet.tiny().to(dev, dtype).eval()


def _sample_fn(corrupt: str | None = None):
    """fastddpm.sample, except that cuda_graph=True runs eagerly (no GPU here) and the provider named by
    ``corrupt`` ("eager" or "cuda graph") returns its images off by 1%."""
    import fastddpm

    def fn(model, shape, cuda_graph=False, **kw):
        out = fastddpm.sample(model, shape, **kw)
        reference_run = os.environ.get("FASTDDPM_BACKEND") == "torch"
        which = "cuda graph" if cuda_graph else "eager"
        return out * 1.01 if (which == corrupt and not reference_run) else out

    return fn


def test_whole_step_rows_check_their_images():
    """The whole-step rows on the CPU with the tiny U-Net: eager against the PyTorch path (a real check:
    the C++ kernels against the reference ops), the replayed provider against eager."""
    rows = gpu_suite.whole_step(torch.device("cpu"), batches=(2,), dtypes=(torch.float32,),
                                providers=("eager", "cuda graph"), steps=4, reps=1, model_fn=_tiny_unet,
                                sample_fn=_sample_fn())
    assert [(r["provider"], r["vs"], r["ok"]) for r in rows] == [("eager", "torch path", "yes"),
                                                                  ("cuda graph", "eager", "yes")]
    assert rows[0]["err"] > 0  # the kernels and the reference ops round differently: a comparison happened
    assert all(r["ms"] > 0 and r["shape"] == "2x3x32x32" for r in rows)
    assert not gpu_suite.failures(rows)


@pytest.mark.parametrize("corrupt", ["eager", "cuda graph"])
def test_whole_step_flags_wrong_images(corrupt):
    rows = gpu_suite.whole_step(torch.device("cpu"), batches=(1,), dtypes=(torch.float32,),
                                providers=("eager", "cuda graph"), steps=3, reps=1, model_fn=_tiny_unet,
                                sample_fn=_sample_fn(corrupt))
    bad = {r["provider"] for r in rows if r["ok"] == "NO"}
    # a wrong eager run fails its own row; the graph row compares with it and fails too (its images are right)
    assert bad == ({"eager", "cuda graph"} if corrupt == "eager" else {"cuda graph"})
    assert gpu_suite.report_failures(rows) == 1


def test_whole_step_out_of_time_is_a_skip_not_a_failure():
    rows = gpu_suite.whole_step(torch.device("cpu"), batches=(1,), dtypes=(torch.float32,),
                                providers=("eager", "cuda graph", "torch.compile max-autotune"), steps=2, reps=1,
                                deadline=0.0, model_fn=_tiny_unet, sample_fn=_sample_fn())
    assert [r["ok"] for r in rows] == ["skipped: out of time"] * 3
    assert not gpu_suite.failures(rows)


def test_bad_batches_or_dtypes_are_a_one_line_error(capsys):
    assert gpu_suite.main(["--unet-only", "--batches", "1,x"]) == 2
    assert gpu_suite.main(["--unet-only", "--dtypes", "float32,int8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "--batches" in err


@pytest.mark.parametrize("argv,message", [
    (["--budget", "0"], "--budget: expected a positive number of seconds, got 0.0"),  # was: no deadline at all
    (["--budget", "-5"], "--budget: expected a positive number of seconds"),  # was: every whole-step row skipped
    (["--budget", "nan"], "--budget: expected a positive number of seconds"),
    (["--batches", "0,-3"], "--batches: expected positive batch sizes"),
    (["--batches", ","], "--batches: expected positive batch sizes"),
    (["--dtypes", ""], "--dtypes: expected float32, bfloat16 or float16"),
    (["--csv", "{tmp}"], "is a folder; expected a file name"),  # was found only after the GPU run
    (["--csv", "{tmp}/rows.txt"], "--csv: expected a file name ending in .csv"),
])
def test_options_are_checked_before_the_gpu_run(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gpu_suite, "run", lambda *a, **k: pytest.fail("the suite ran before its options were checked"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert gpu_suite.main([a.format(tmp=tmp_path) for a in argv]) == 2
    assert message in capsys.readouterr().err


def test_quick_without_compile_has_no_compile_providers():
    case = _small(gpu_suite.plan(quick=True)[0])
    sched, args = gpu_suite._inputs(case, torch.device("cpu"))
    names = set(gpu_suite.providers(case, sched, args, backends=("cpu",), compile=False))
    assert names == {"cpu", "torch eager"}
    assert "torch.compile" in gpu_suite.providers(case, sched, args, backends=("cpu",), compile=True)
