"""`fastddpm bench`: the smoke suite end to end, the CSV appends, the plots, the tables, the command line.

Nothing here judges speed: the smoke run proves that every case and provider runs and writes its rows.
"""

import csv
import multiprocessing
import os
import subprocess
import sys

import pytest
import torch

from fastddpm.bench import suite as S
from fastddpm.bench.countops import count
from fastddpm.bench.timing import append_csv, peak_tensor_bytes
from fastddpm.cli import main as cli_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- the smoke run
def _repo_results():
    d = os.path.join(ROOT, "benchmarks", "results")
    return {n: os.stat(os.path.join(d, n)).st_mtime_ns for n in os.listdir(d)} if os.path.isdir(d) else {}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """`python -m benchmarks.run --smoke --csv --plot` (what `bash scripts/run.sh bench` runs, at its smallest
    setting), run from a temporary folder that receives the CSVs, the plots and the markdown."""
    out = tmp_path_factory.mktemp("bench")
    md = out / "report.md"
    before = _repo_results()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    r = subprocess.run([sys.executable, "-m", "benchmarks.run", "--smoke", "--csv", str(out), "--plot",
                        "--markdown", str(md), "--threads", "1"],
                       capture_output=True, text=True, timeout=600, cwd=str(out), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _repo_results() == before, "the smoke run wrote into the repository's benchmarks/results"
    return out, r


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_smoke_suite_runs_every_case_and_provider(smoke_run):
    out, r = smoke_run
    timings = _read(out / "bench_timings.csv")
    counts = _read(out / "bench_counts.csv")
    names = {f"{c.workload} {c.shape}" for c in S.cases("smoke")}
    seen = {f"{row['workload']} {row['shape']}" for row in timings + counts}
    assert seen == names
    # every provider ran: the peers are pinned in requirements-dev.txt and none needs a GPU, so a provider
    # skipped ("skipped: ... not importable") fails here as an error does
    bad = [(row["workload"], row["shape"], row["provider"], row["status"]) for row in timings + counts
           if row.get("status")]
    assert not bad, bad
    providers = {row["provider"] for row in timings + counts}
    assert {"denoising-diffusion-pytorch", "diffusers DDPMPipeline", "diffusers", "torch.compile (eager)",
            "sdpa"} <= providers, providers
    for row in timings:
        assert float(row["median_s"]) > 0 and int(row["rounds"]) >= 1
        assert row["role"] in ("ours", "peer", "other", "bound", "component")
    # the long cases' path (--full's 1000-step sampling): prewarmed, no warm-up, two rounds, its providers
    long_case, = [c for c in S.cases("smoke") if c.prewarm is not None]
    assert long_case.warmup == 0
    long_rows = [row for row in timings if f"{row['workload']} {row['shape']}" == long_case.name]
    assert {row["provider"] for row in long_rows} == {"fastddpm.sample", "diffusers DDPMPipeline",
                                                      "denoising-diffusion-pytorch"}
    assert all(int(row["rounds"]) == 2 and int(row["inner"]) == 1 for row in long_rows)
    # each timed case: fastddpm and at least one peer, and every fastddpm row has its speed-up
    for name in {f"{row['workload']} {row['shape']}" for row in timings}:
        rows = [row for row in timings if f"{row['workload']} {row['shape']}" == name]
        assert any(row["role"] == "ours" for row in rows) and any(row["role"] == "peer" for row in rows), name
        assert all(float(row["speedup"]) > 0 for row in rows), name
    training = [row for row in timings if row["kind"] == "training"]
    assert training and all(float(row["peak_mib"]) > 0 for row in training)
    for row in counts:
        assert int(float(row["kernels"])) <= int(float(row["ops"])) and float(row["bytes"]) > 0
    # rows carry the machine, the versions and the date
    for key in ("machine", "torch", "fastddpm", "diffusers", "date", "run_id", "load_avg"):
        assert timings[0][key], key
    assert "| workload |" in r.stdout and "GPU cost proxy" in r.stdout
    assert (out / "report.md").read_text().strip() == r.stdout.strip()


def test_smoke_csv_appends_with_one_header(smoke_run, tmp_path):
    out, _ = smoke_run
    src = out / "bench_counts.csv"
    dst = tmp_path / "c.csv"
    rows = _read(src)
    append_csv(str(dst), rows)
    append_csv(str(dst), rows)
    lines = dst.read_text().splitlines()
    assert sum(1 for ln in lines if ln.startswith("kind,")) == 1
    assert len(_read(dst)) == 2 * len(rows)


def test_plots_from_the_smoke_csv(smoke_run, tmp_path):
    from PIL import Image

    out, r = smoke_run
    for name in ("bench_speedup.png", "bench_end_to_end.png", "bench_counts.png"):  # benchmarks.run --plot's
        assert f"wrote {out / name}" in r.stderr
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 200
    r = subprocess.run([sys.executable, "-m", "fastddpm.bench.plot",
                        "--timings", str(out / "bench_timings.csv"), "--counts", str(out / "bench_counts.csv"),
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    for name in ("bench_speedup.png", "bench_end_to_end.png", "bench_counts.png"):
        p = tmp_path / name
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 200
        assert os.path.getsize(p) < 300_000


# ----------------------------------------------------------------------------- CSV
def test_append_csv_header_once_and_new_columns(tmp_path):
    p = str(tmp_path / "sub" / "x.csv")
    append_csv(p, [{"a": 1, "b": 2}])
    append_csv(p, [{"a": 3, "b": 4}, {"a": 5, "b": 6}])
    append_csv(p, [{"a": 7, "c": 8}])
    with open(p) as f:
        text = f.read()
    assert text.splitlines()[0] == "a,b,c"
    assert text.count("a,b") == 1
    rows = _read(p)
    assert [r["a"] for r in rows] == ["1", "3", "5", "7"]
    assert rows[0]["c"] == "" and rows[3]["b"] == "" and rows[3]["c"] == "8"
    assert os.stat(p).st_mode & 0o777 == 0o644
    assert sorted(os.listdir(tmp_path / "sub")) == ["x.csv"]  # no temporary or lock file left


class _Unprintable:
    def __str__(self):
        raise RuntimeError("cannot format")


def test_append_csv_is_atomic(tmp_path):
    p = str(tmp_path / "x.csv")
    append_csv(p, [{"a": 1}])
    before = open(p).read()
    with pytest.raises(RuntimeError):
        append_csv(p, [{"a": 2}, {"a": _Unprintable()}])
    assert open(p).read() == before
    assert os.listdir(tmp_path) == ["x.csv"]


def _appender(args):
    path, k = args
    for i in range(20):
        append_csv(path, [{"worker": k, "i": i}])


def test_append_csv_concurrent_processes_lose_nothing(tmp_path):
    p = str(tmp_path / "x.csv")
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(3) as pool:
        pool.map(_appender, [(p, k) for k in range(3)])
    rows = _read(p)
    assert sorted((int(r["worker"]), int(r["i"])) for r in rows) == [(k, i) for k in range(3) for i in range(20)]


# ----------------------------------------------------------------------------- measuring
def test_summarise_picks_the_best_peer_and_pairs_rounds():
    case = S.Case("op", "w", "s", build=dict, rate=lambda p: (2e9, "GB/s"))
    times = {
        "fastddpm cpu": [1.0, 2.0, 1.0],
        "eager": [2.0, 2.0, 4.0],             # peer
        "torch.compile (eager)": [3.0, 3.0, 3.0],  # slower peer
        "torch copy (minimum bytes)": [0.1, 0.1, 0.1],  # a bound is never the best peer
        "denoising-diffusion-pytorch": [0.5, 0.5, 0.5],  # nor is another network
        "torch.randn alone": [0.2, 0.2, 0.2],  # nor a component (one part of the work alone)
    }
    rows = {r["provider"]: r for r in S.summarise(case, times)}
    assert {r["best_peer"] for r in rows.values()} == {"eager"}
    ours = rows["fastddpm cpu"]
    assert ours["median_s"] == 1.0
    assert ours["speedup"] == 2.0  # per-round ratios 2, 1, 4: median 2 (the ratio of medians would also be 2)
    assert (ours["speedup_q1"], ours["speedup_q3"]) == (1.5, 3.0)
    assert rows["eager"]["speedup"] == 1.0
    assert rows["torch.compile (eager)"]["speedup"] == pytest.approx(2 / 3)
    assert ours["rate"] == pytest.approx(2.0) and ours["rate_unit"] == "GB/s"
    assert [rows[k]["role"] for k in times] == ["ours", "peer", "peer", "bound", "other", "component"]


def test_peak_tensor_bytes_counts_what_lives_at_once():
    def fn():
        a = torch.empty(2 * 2**20)  # 8 MiB
        b = torch.empty(2**20)  # 4 MiB: 12 MiB live
        del a
        c = torch.empty(2**20)  # 8 MiB live
        return b, c

    peak = peak_tensor_bytes(fn)
    assert 12 * 2**20 <= peak <= 12 * 2**20 + 64 * 1024


def test_count_ops_kernels_and_bytes():
    x = torch.randn(4, 8)
    c = count(lambda: (x * 2 + 1).view(32).add_(1))
    assert c.ops == 4  # mul, add, view, add_
    assert c.kernels == 3  # the view launches nothing
    assert c.bytes == 2 * 32 * 4  # mul and add allocate; the view and the in-place add do not
    w = torch.randn(8, requires_grad=True)
    c = count(lambda: (w * w).sum().backward(), grad=True)
    assert c.names.get("aten.mul", 0) >= 3  # the forward's and the backward's (two multiplies by w)


def test_missing_peer_is_skipped_with_a_reason(monkeypatch):
    from fastddpm.bench import models, workloads

    monkeypatch.setattr(workloads, "ddpm_pytorch_status", lambda: "denoising-diffusion-pytorch not importable")
    net = models.network("tiny")
    case = S.Case("sampling", "sampling tiny", "batch 1",
                  build=lambda: workloads.sampling_providers(net, 1, 1), rate=lambda p: (1, "images/s"),
                  budget_s=0, min_rounds=1, max_rounds=1, warmup=1)
    rows = {r["provider"]: r for r in S.run_case(case).rows}
    assert rows["denoising-diffusion-pytorch"]["status"] == "skipped: denoising-diffusion-pytorch not importable"
    assert rows["diffusers DDPMPipeline"]["median_s"] > 0
    assert "skipped: denoising-diffusion-pytorch not importable" in S.render_timings(list(rows.values()))


def test_long_case_prewarms_each_provider_then_times_without_warmup():
    """The path of --full's 1000-step cases: each provider called once on its short version (prewarm), no
    warm-up call of the long one, exactly min_rounds interleaved rounds."""
    calls = []

    def provider(tag):
        return lambda: calls.append(tag)

    case = S.Case("sampling", "w", "s", build=lambda: {"fastddpm.sample": provider("A"), "diffusers": provider("B")},
                  prewarm=lambda: {"fastddpm.sample": provider("a"), "diffusers": provider("b"),
                                   "left out by which=": provider("x")},
                  budget_s=0.0, min_rounds=2, max_rounds=2, warmup=0)
    rows = S.run_case(case).rows
    assert calls == ["a", "b", "A", "B", "A", "B"]
    assert [(r["provider"], r["rounds"]) for r in rows] == [("fastddpm.sample", 2), ("diffusers", 2)]


def test_settled_case_calls_each_provider_once_before_each_timed_sample():
    """settle: a timed sample starts after one untimed call of the same provider, never right after another
    provider (whose frees would be charged to it); op cases settle by default."""
    calls = []

    def provider(tag):
        return lambda: calls.append(tag)

    case = S.Case("op", "w", "s", build=lambda: {"fastddpm cpu": provider("A"), "eager": provider("B")},
                  rounds=2, warmup=0, settle=True)
    S.run_case(case)
    assert calls == ["A", "A", "B", "B", "A", "A", "B", "B"]
    assert S.op_case("q_sample", (1, 3, 8, 8)).settle


def test_a_failing_provider_is_reported_not_fatal():
    def boom():
        raise RuntimeError("kernel said no")

    case = S.Case("op", "w", "s", build=lambda: {"fastddpm x": boom, "eager": lambda: None},
                  budget_s=0, min_rounds=2, max_rounds=2)
    rows = {r["provider"]: r for r in S.run_case(case).rows}
    assert rows["fastddpm x"]["status"] == "error: RuntimeError: kernel said no"
    assert rows["eager"]["rounds"] == 2


def test_a_failing_prewarm_is_reported_not_fatal():
    def boom():
        raise RuntimeError("short run said no")

    # One provider's short run fails: that provider is reported, the others are timed.
    case = S.Case("sampling", "w", "s", build=lambda: {"a": lambda: None, "b": lambda: None},
                  prewarm=lambda: {"a": boom, "b": lambda: None}, budget_s=0.0, min_rounds=2, max_rounds=2,
                  warmup=0)
    rows = {r["provider"]: r for r in S.run_case(case).rows}
    assert rows["a"]["status"] == "error: RuntimeError: short run said no"
    assert rows["b"]["rounds"] == 2
    # Building the short versions fails: the case is reported as an error row.
    case = S.Case("sampling", "w", "s", build=lambda: {"a": lambda: None}, prewarm=boom, budget_s=0.0,
                  min_rounds=2, max_rounds=2, warmup=0)
    res = S.run_case(case)
    assert res.error == "error: RuntimeError: short run said no"
    assert [r["status"] for r in res.rows] == [res.error]


# ----------------------------------------------------------------------------- planning and tables
def test_suites_cover_the_issue_workloads():
    quick = [c.name for c in S.cases("quick")]
    full = [c.name for c in S.cases("full")]
    assert set(quick) < set(full)
    assert not any("1000 steps" in n for n in quick)
    for net in ("digits", "cifar10"):
        for steps in (50, 1000):
            for b in (1, 16):
                assert f"sampling {net}, {steps} steps batch {b}" in full
        for b in (16, 64):
            assert f"training step, {net} batch {b}" in full
    for op in ("q_sample", "ddpm_step", "group_norm_silu", "attention", "U-Net forward",
               "per denoising step", "per training step"):
        assert any(n.startswith(op) for n in quick), op
    assert len(S.cases("smoke")) == len({c.name for c in S.cases("smoke")})
    with pytest.raises(ValueError, match="suite"):
        S.cases("medium")
    assert [c.name for c in S.select(S.cases("quick"), ["Q_SAMPLE", "per training"])] == \
        ["q_sample 16x3x32x32", "per training step, cifar10 batch 1"]


def test_no_compile_leaves_out_the_compiled_providers():
    from fastddpm.bench import ops as bops

    assert "torch.compile (eager)" not in bops.q_sample_providers((1, 3, 4, 4), compile=False)
    c = next(c for c in S.cases("quick", compile=False) if c.workload == "q_sample")
    assert not any("compile" in k for k in c.build())


def test_render_tables():
    rows = [dict(kind="op", workload="q_sample", shape="1x3", provider="fastddpm cpu", role="ours",
                 median_s=2e-5, speedup=1.5, speedup_q1=1.4, speedup_q3=1.6, best_peer="eager", rate=3.0,
                 rate_unit="GB/s"),
            dict(kind="op", workload="q_sample", shape="1x3", provider="torch copy (same bytes)", role="bound",
                 median_s=1e-6, speedup=20.0, speedup_q1=19.0, speedup_q3=21.0, best_peer="eager"),
            dict(kind="op", workload="q_sample", shape="1x3", provider="x", role="peer", status="error: E: no"),
            dict(kind="counts", workload="per denoising step, tiny", shape="batch 1", provider="diffusers",
                 role="peer", ops=10, kernels=8, bytes=2e6, ops_vs_diffusers=1.0, bytes_vs_diffusers=1.0)]
    t = S.render_timings(rows)
    assert "| q_sample | 1x3 | fastddpm cpu | 20 µs | 1.50x (1.40-1.60) | 3 GB/s | - |" in t
    assert "*(bound)*" in t and "error: E: no" in t and "per denoising" not in t
    c = S.render_counts(rows)
    assert "| denoising step, tiny | batch 1 | diffusers | 10 | 8 | 2.00 | 1.00x, 1.00x |" in c
    assert S.fmt_time(2.5) == "2.50 s" and S.fmt_time(0.0123) == "12.3 ms" and S.fmt_time(float("nan")) == "-"


def test_readme_markers(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(ROOT)
    from benchmarks.run import BEGIN, END, replace_between_markers

    text = f"a\n{BEGIN}\nold\n{END}\nb\n"
    assert replace_between_markers(text, "new table") == f"a\n{BEGIN}\nnew table\n{END}\nb\n"
    with pytest.raises(ValueError, match="markers"):
        replace_between_markers("no markers", "x")
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert BEGIN in readme and END in readme


# ----------------------------------------------------------------------------- the command line
def test_bench_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["bench", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--full", "--smoke", "--only", "--csv", "--markdown", "--threads", "--no-compile", "--list"):
        assert opt in out


def test_bench_list(capsys):
    assert cli_main(["bench", "--list", "--only", "attention"]) == 0
    assert capsys.readouterr().out.strip() == "attention fwd 16x1x256x256"


@pytest.mark.parametrize("argv,message", [
    # (100000 threads crashed the suite: "failed to map segment from shared object", then a segfault)
    (["--threads", "100000"], "--threads: expected 0 (torch's default) or a number of threads up to"),
    (["--threads", "-1"], "--threads: expected 0 (torch's default) or a number of threads up to"),
    (["--threads", "two"], "argument --threads: invalid int value: 'two'"),
    (["--only", ""], "--only: expected part of a case name, got an empty string"),  # ran every case
    (["--full", "--smoke"], "argument --smoke: not allowed with argument --full"),
    (["--only", "nothing-like-this"], "--only: no case of the quick suite matches 'nothing-like-this'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bench_bad_usage_exits_2(argv, message, capsys):
    try:
        code = cli_main(["bench", *argv])
    except SystemExit as e:
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_bench_csv_must_be_a_folder(tmp_path, capsys, monkeypatch):
    # Found before the suite runs: a folder under a file was found only after it (minutes; hours with --full).
    import fastddpm.bench.suite as S

    monkeypatch.setattr(S, "run", lambda *a, **k: pytest.fail("the suite ran before --csv was checked"))
    f = tmp_path / "file.csv"
    f.write_text("x")
    assert cli_main(["bench", "--only", "q_sample", "--csv", str(f)]) == 2
    assert f"--csv: {str(f)!r} is a file; expected a folder" in capsys.readouterr().err
    assert cli_main(["bench", "--only", "q_sample", "--csv", str(f / "sub")]) == 2
    assert f"--csv: {str(f)!r} is a file, so the folder" in capsys.readouterr().err
    # a CSV there that cannot be appended to (not text) was found only after the suite, naming neither
    d = tmp_path / "d"
    d.mkdir()
    (d / "bench_counts.csv").write_bytes(b"\xff\xfe\x00binary")
    assert cli_main(["bench", "--only", "q_sample", "--csv", str(d)]) == 2
    err = capsys.readouterr().err
    assert f"--csv: {d / 'bench_counts.csv'} is not a readable CSV file of benchmark rows" in err, err
    (d / "bench_counts.csv").unlink()
    (d / "bench_counts.csv").mkdir()  # a folder of that name: IsADirectoryError was a traceback
    assert cli_main(["bench", "--only", "q_sample", "--csv", str(d)]) == 2
    assert f"--csv: {d / 'bench_counts.csv'} is not a readable CSV file" in capsys.readouterr().err


def test_benchmarks_run_module_usage(capsys, monkeypatch):
    # in-process: the smoke fixture runs `python -m benchmarks.run` itself
    monkeypatch.syspath_prepend(ROOT)
    from benchmarks.run import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--readme" in out and "--smoke" in out and "--plot" in out
    with pytest.raises(SystemExit) as e:
        main(["--smoke", "--plot"])
    assert e.value.code == 2 and "--plot: draws from the CSVs, so it needs --csv" in capsys.readouterr().err
    # the README's table is the quick suite's, and its prose reads those rows: a smoke or partial run replaced it
    for argv in (["--smoke", "--readme"], ["--only", "q_sample", "--readme"], ["--full", "--readme"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and "--readme: only with the whole quick suite" in capsys.readouterr().err


def test_fastddpm_bench_runs_a_case_into_csv_and_markdown(tmp_path, capsys):
    """`fastddpm bench` itself on one cheap case (the smoke fixture runs the suite through benchmarks.run)."""
    md = tmp_path / "r.md"
    assert cli_main(["bench", "--smoke", "--only", "attention fwd 1x1x16x8", "--csv", str(tmp_path),
                     "--markdown", str(md)]) == 0
    out = capsys.readouterr().out
    rows = _read(tmp_path / "bench_timings.csv")
    assert [r["provider"] for r in rows] == ["fastddpm", "sdpa", "materialised"]
    assert all(float(r["median_s"]) > 0 and not r.get("status") and r["machine"] for r in rows)
    assert sorted(os.listdir(tmp_path)) == ["bench_timings.csv", "r.md"]  # no counts case: no counts CSV
    assert md.read_text().strip() == out.strip() and "| attention fwd | 1x1x16x8 | sdpa |" in out


def test_traffic_counts_each_kernel_reads_and_writes():
    x = torch.randn(64, 32)
    col = torch.randn(64, 1)
    t = count(lambda: (x * col.expand(64, 32)).view(-1).add_(1))
    # mul reads x (8 KiB) and the broadcast column once (256 B), writes 8 KiB; the expand and the view are
    # views; the in-place add reads and writes 8 KiB
    assert t.kernels == 2
    assert [name for name, _, _ in t.per_op] == ["aten.mul", "aten.add_"]
    assert t.read == 64 * 32 * 4 + 64 * 4 + 64 * 32 * 4
    assert t.written == 2 * 64 * 32 * 4


def test_traffic_catches_a_wasteful_op():
    """The count charges an op what its kernels move, so an op that wastes passes shows it: (1) an op
    "fused" in name only (its implementation runs x * 2, then + 1, then * 3 as three ATen kernels) is charged
    3 kernels and 3 reads and writes of x's size, not 1; (2) a custom op whose kernel makes three passes
    over x, declared as such (countops.declare_passes, as PASSES declares group_norm_silu's three launches),
    is charged 3 reads of x, where the one-pass op beside it is charged one."""
    from fastddpm.bench.countops import PASSES, declare_passes

    lib = torch.library.Library("fastddpm_traffic_probe", "DEF")
    try:
        lib.define("composite(Tensor x) -> Tensor")
        lib.impl("composite", lambda x: ((x * 2) + 1) * 3, "CompositeImplicitAutograd")
        for name in ("one_pass", "three_pass"):
            lib.define(f"{name}(Tensor x) -> Tensor")
            lib.impl(name, lambda x: x * 2, "CPU")
        declare_passes("fastddpm_traffic_probe::three_pass", [({"x": 1}, {}), ({"x": 1}, {}), ({"x": 1}, {"out0": 1})])
        x = torch.randn(64, 32)
        n = x.numel() * 4
        ops = torch.ops.fastddpm_traffic_probe
        composite = count(lambda: ops.composite(x))
        one, three = count(lambda: ops.one_pass(x)), count(lambda: ops.three_pass(x))
        assert (composite.kernels, composite.read, composite.written) == (3, 3 * n, 3 * n)
        assert (one.kernels, one.read, one.written) == (1, n, n)
        assert (three.kernels, three.read, three.written) == (3, 3 * n, n)
    finally:
        PASSES.pop("fastddpm_traffic_probe::three_pass", None)
        lib._destroy()


def test_group_norm_silu_is_charged_its_three_launches():
    """The fused GroupNorm+SiLU forward is 3 GPU launches reading x twice (stats_partial_kernel,
    stats_final_kernel, fwd_apply_kernel in csrc/cuda/group_norm_silu.cu), not one op reading x once."""
    from fastddpm import ops

    x, w, b = torch.randn(2, 64, 8, 8), torch.randn(64), torch.randn(64)
    ops.group_norm_silu(x, 32, w, b)
    t = count(lambda: ops.group_norm_silu(x, 32, w, b))
    n = x.numel() * 4
    assert t.kernels == 3
    assert 2 * n <= t.read <= 2 * n + 4096 and n <= t.written <= n + 4096, (t.read, t.written, n)


def test_bytes_moved_table(monkeypatch):
    monkeypatch.syspath_prepend(ROOT)
    from benchmarks.bytes_moved import render

    text = render([dict(case="q", impl="eager", kernels=8, read=2e6, written=1e6, minimum=1.5e6),
                   dict(case="step", impl="x", kernels=3, read=1e6, written=1e6, minimum=float("nan"))], 1000.0)
    assert "| q | eager | 8 | 2.0 | 1.0 | 3.0 | 2.00x | 3 µs |" in text
    assert "| step | x | 3 | 1.0 | 1.0 | 2.0 | - | 2 µs |" in text


def test_readme_bytes_table_is_the_result_file():
    """README.md's bytes-moved table is benchmarks/results/bytes_moved.md (the script's --markdown output), row
    for row: a rerun that changes a count changes the file, and then the README must follow."""
    with open(os.path.join(ROOT, "benchmarks", "results", "bytes_moved.md"), encoding="utf-8") as f:
        result = [ln for ln in f.read().splitlines() if ln.startswith("|")]
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read().splitlines()
    start = readme.index(result[0])  # the header row
    assert readme[start:start + len(result)] == result
    assert len(result) == 2 + 17 and not readme[start + len(result)].startswith("|")


def _moved(r):
    return r["read"] + r["written"]


# What a fused op's GPU kernels move beyond the op's minimum, in tensors of the op's size, counted by hand from
# the kernel sources (independent of countops.PASSES): the two-pass GroupNorm+SiLU reads x once more for its
# statistics (csrc/cuda/group_norm_silu.cu stats_partial_kernel, then fwd_apply_kernel), and its backward
# reads x and dy once more (bwd_partial_kernel, then bwd_apply_kernel). Every other fused op is one pass.
EXTRA_PASSES = {"group_norm_silu fwd": 1, "group_norm_silu fwd+bwd": 1 + 2}


def _extra_tensors(case: str) -> int:
    return EXTRA_PASSES.get(case.split(" 2x")[0], 0)


def test_bytes_moved_fused_ops_move_their_minimum(monkeypatch):
    """Counted at two tiny sizes that differ only in the large tensors (image, feature map, head width): each
    fused op's traffic grows by exactly its minimum's growth plus its extra passes (EXTRA_PASSES), so what it
    moves beyond that is a constant of a few KiB (schedule tables, t, weights, statistics); each eager
    sequence moves more."""
    monkeypatch.syspath_prepend(ROOT)
    from benchmarks.bytes_moved import rows

    small = rows(dict(image=(2, 3, 8, 8), group_norm=(2, 64, 4, 4), attention=(2, 16, 8), network=None))
    large = rows(dict(image=(2, 3, 16, 16), group_norm=(2, 64, 8, 8), attention=(2, 16, 16), network="tiny",
                      batch=1))
    *large, step_theirs, step_ours = large
    assert [(r["case"].split(" 2x")[0], r["impl"]) for r in small] == \
        [(r["case"].split(" 2x")[0], r["impl"]) for r in large]
    by_case: dict[str, list] = {}
    for a, b in zip(small, large):
        grow, min_grow = _moved(b) - _moved(a), b["minimum"] - a["minimum"]
        assert min_grow > 0, b
        if b["impl"].startswith("fastddpm"):
            # GroupNorm's minimum is 2 tensors of x's size (x, y), forward+backward 5 (x, y, x, dy, dx)
            k = 5 if "fwd+bwd" in b["case"] else 2
            n_extra = _extra_tensors(b["case"])
            assert grow == min_grow + n_extra * min_grow // k, (b["case"], b["impl"], grow, min_grow)
            assert 0 <= _moved(b) - b["minimum"] - n_extra * b["minimum"] // k <= 16 * 1024, b
        else:
            assert grow >= min_grow and _moved(a) > a["minimum"] and _moved(b) > b["minimum"], b
        by_case.setdefault(b["case"], []).append(b)
    assert len(by_case) == 7
    for case, rs in by_case.items():
        fused = [_moved(r) for r in rs if r["impl"].startswith("fastddpm")]
        eager = [_moved(r) for r in rs if not r["impl"].startswith("fastddpm")]
        assert fused and eager and min(eager) > max(fused), case
    # the whole step (no minimum): fastddpm launches fewer kernels and moves fewer bytes than diffusers
    assert step_ours["impl"].startswith("fastddpm") and step_theirs["impl"].startswith("diffusers")
    assert step_ours["kernels"] < step_theirs["kernels"] and _moved(step_ours) < _moved(step_theirs)


# ----------------------------------------------------------------------------- the scripts' own options
def _script_exit(fn, argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        fn(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("argv,message", [
    (["--providers", "fastddpm"], "--providers: no provider named 'fastddpm'; these cases have: "),  # rows dropped
    (["--csv", "{tmp}"], "--csv: "),  # was found after the timing
    (["--threads", "-1"], "--threads: expected 0 (torch's default) or a number of threads"),
    (["--rounds", "0"], "--rounds: expected a positive integer, got 0"),
])
def test_per_op_script_options_are_checked_before_the_timing(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(S, "run_case", lambda *a, **k: pytest.fail("a case was timed before the options were read"))
    err = _script_exit(lambda a: S.op_script("doc", ["q_sample"], [(1, 3, 8, 8)], a),
                       [x.format(tmp=tmp_path) for x in argv], capsys)
    assert message in err, err


def test_script_plans_name_their_option(capsys, monkeypatch):
    monkeypatch.syspath_prepend(ROOT)
    from benchmarks import bench_sampling, bench_unet

    for mod, argv, message in ((bench_unet, ["--modes", "fwd"], "--modes: expected MODE:BATCH items"),
                               (bench_sampling, ["runs", "--runs", "foo:1:2"], "--runs: expected MODEL:BATCH:STEPS"),
                               (bench_sampling, ["runs", "--runs", "cifar10:x:1"], "--runs: expected MODEL:BATCH")):
        assert message in _script_exit(lambda a, m=mod: S.script_main("doc", m._plan, a, extend=m._extend), argv,
                                       capsys)


def test_benchmarks_run_reports_settings_in_one_line(capsys, monkeypatch):
    """python -m benchmarks.run printed tracebacks where fastddpm bench gives one line and exit 2."""
    monkeypatch.syspath_prepend(ROOT)
    from benchmarks import run

    for value, message in (("junk", "FASTDDPM_BACKEND: expected one of"),
                           ("torch", "benchmark refused: FASTDDPM_BACKEND=torch runs")):
        monkeypatch.setenv("FASTDDPM_BACKEND", value)
        assert run.main(["--smoke", "--only", "q_sample"]) == 2
        err = capsys.readouterr().err
        assert f"python -m benchmarks.run: error: {message}" in err and "Traceback" not in err, err


def test_bytes_moved_markdown_is_checked_before_the_counting(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(ROOT)
    from benchmarks import bytes_moved

    monkeypatch.setattr(bytes_moved, "rows", lambda *a, **k: pytest.fail("counted before --markdown was checked"))
    for arg, message in ((str(tmp_path), "is a folder"), ("", "expected a file name, got ''"),
                         (str(tmp_path / "t.png"), "expected a file name ending in .md")):
        assert message in _script_exit(bytes_moved.main, ["--markdown", arg], capsys)


def test_plot_options(tmp_path, capsys):
    from fastddpm.bench.plot import main as plot_main

    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe")
    (tmp_path / "afile").write_text("")
    good = tmp_path / "good"
    good.mkdir()
    (good / "bench_timings.csv").write_text("run_id,kind\nr1,op\n")
    for argv, message in ((["--timings", str(tmp_path / "bin.csv")], "--timings: "),
                          (["--timings", str(tmp_path / "typo.csv")], "--timings: no such file"),  # drew the repo's
                          (["--timings", str(good / "bench_timings.csv"), "--out", str(tmp_path / "afile")],
                           "--out: "),
                          (["--timings", str(good / "bench_timings.csv"), "--run", "nosuch"],
                           "--run: no run 'nosuch'")):
        assert message in _script_exit(plot_main, argv, capsys)


def test_plot_reads_each_csv_once(tmp_path, monkeypatch, capsys):
    """The file check, the --run check and the plots read each CSV anew (three reads of a file that grows with
    every run); the rows read for the checks are the rows plotted."""
    from fastddpm.bench import plot as P
    from fastddpm.bench import timing

    (tmp_path / "bench_timings.csv").write_text("run_id,kind,role\nr1,op,ours\nr2,op,ours\n")
    reads, real = [], timing._read_csv
    monkeypatch.setattr(timing, "_read_csv", lambda p, flag="": reads.append(os.path.basename(p)) or real(p, flag))
    drawn = []
    monkeypatch.setattr(P, "plot", lambda t, c, out, run: drawn.append((t, c, out, run)) or [])
    assert P.main(["--timings", str(tmp_path / "bench_timings.csv"), "--run", "r1"]) == 0
    assert reads == ["bench_timings.csv", "bench_counts.csv"]
    (timings, counts, out, run), = drawn
    assert [r["run_id"] for r in timings] == ["r1", "r2"] and counts == [] and run == "r1"


def test_cpu_variants_refuses_a_folder_without_its_build(tmp_path, capsys, monkeypatch):
    """A folder holding no build let the worker import the installed fastddpm: the table compared one build
    with itself, exit 0."""
    monkeypatch.syspath_prepend(ROOT)
    from benchmarks import cpu_variants

    for argv, message in (([], "that folder holds no built fastddpm package"),
                          (["--rounds", "0"], "--rounds: expected a positive integer"),
                          (["--variants", "sse9"], "--variants: expected a comma-separated list")):
        err = _script_exit(cpu_variants.main, ["--native", str(tmp_path), "--portable", ROOT, *argv], capsys)
        assert message in err, err



def test_compile_triton_options_are_checked_first(tmp_path, capsys, monkeypatch):
    """--launches that is no launch list was a traceback; --json was checked (and written, not atomically) only
    after the compile; --arch -5 compiled for sm_-5."""
    pytest.importorskip("triton.backends.nvidia.compiler")  # (without it main refuses before --launches)
    monkeypatch.syspath_prepend(os.path.join(ROOT, "scripts"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    import compile_triton

    monkeypatch.setattr(compile_triton, "compile_all", lambda *a, **k: pytest.fail("compiled before the check"))
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe")
    (tmp_path / "list.json").write_text("[1]")
    for argv, message in ((["--arch", "-5"], "--arch: expected a compute capability"),
                          (["--json", str(tmp_path)], "--json: "),
                          (["--launches", str(tmp_path / "bin.json")], "--launches: cannot read"),
                          (["--launches", str(tmp_path / "list.json")], "expected a list of launches"),
                          (["--launches", str(tmp_path / "missing.json")], "--launches: cannot read")):
        assert message in _script_exit(compile_triton.main, argv, capsys)


def test_image_folder_memory_options(tmp_path, capsys, monkeypatch):
    """A --folder of other images made the header describe another set than the readers read; --only that
    matched nothing printed an empty table after making the images; a file as --folder was a traceback."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import image_folder_memory as m

    monkeypatch.setattr(m, "make_folder", lambda *a, **k: pytest.fail("made the images before the check"))
    (tmp_path / "afile").write_text("")
    other = tmp_path / "other"
    other.mkdir()
    from PIL import Image

    Image.new("RGB", (16, 16)).save(other / "000000.jpg")
    Image.new("RGB", (16, 16)).save(other / "000001.jpg")
    for argv, message in ((["--folder", str(tmp_path / "afile")], "--folder: "),
                          (["--only", "zzz"], "--only: no reader matches"),
                          (["--n", "-1"], "--n: expected a positive integer"),
                          (["--folder", str(other), "--n", "1", "--side", "16"], "holds 2 other JPEGs"),
                          (["--folder", str(other), "--n", "2", "--side", "64"], "holds 2 other JPEGs")):
        assert message in _script_exit(m.main, argv, capsys)


def test_bench_sampling_main_runs_its_plan(monkeypatch):
    """bench_sampling's main passes its sections' --providers list through the parsed options; reading the
    comma-separated filter after its plan crashed every run (AttributeError on the list)."""
    import types

    monkeypatch.syspath_prepend(ROOT)
    from benchmarks import bench_sampling

    timed = []
    monkeypatch.setattr(S, "run_case", lambda c, log=None: timed.append(c.workload) or types.SimpleNamespace(rows=[]))
    bench_sampling.main(["dpmpp", "--rounds", "1"])
    assert timed == ["DPM-Solver++(2M) update"]
