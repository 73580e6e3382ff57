"""scripts/gpu_check.sh where no GPU is: its stage list and limits, the refusal without --dry-run, the dry
run's stages that need no GPU (the environment, the test selection, the suite's plan, the TORCH_CHECK
bisect on the CPU) and the packing of the results into at most 8 files under $OUT."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
STAGES = ["env", "build", "bisect", "tests", "suite", "unet", "autotune"]
NAME_OK = re.compile(r"^[A-Za-z0-9._-]+$")  # what comes back from the device machine


def _run(*args, out=None, timeout=900):
    env = {**os.environ, "PYTHON": sys.executable}
    if out is not None:
        env["OUT"] = str(out)
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def _summary(out) -> dict[str, dict]:
    rows = {}
    for line in (out / "summary.txt").read_text().splitlines():
        m = re.match(r"^(\S+)\s+(\S+)\s+(\d+)\s+(\S+)\s+(.*)$", line)
        if m and m.group(1) != "stage" and not line.startswith(("fastddpm", "command", "budget", "files", "result")):
            rows[m.group(1)] = dict(limit=m.group(2), took=int(m.group(3)), rc=m.group(4), status=m.group(5))
    return rows


def _check_packing(out):
    entries = list(out.iterdir())
    assert 0 < len(entries) <= 8, [e.name for e in entries]
    for e in entries:
        assert e.is_file() and NAME_OK.match(e.name), e.name
        assert e.stat().st_size < 16 * 2**20


def test_stage_list_and_limits_fit_nine_minutes():
    r = _run("--list")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [ln.split()[0] for ln in lines[:-1]] == STAGES
    limits = {ln.split()[0]: ln.split()[1] for ln in lines[:-1]}
    fixed = [int(v) for k, v in limits.items() if k != "autotune"]
    assert sum(fixed) <= 540  # the stages' own limits fit the 9-minute run, build included
    assert limits["autotune"].startswith("rest")  # max-autotune only with the time left
    assert "budget 540 s" in lines[-1] and "at most 8 files" in lines[-1]


def test_header_gives_the_call_and_the_limit():
    head = open(SCRIPT).read().split("set -uo pipefail")[0]
    assert 'run(command="FASTDDPM_COMMIT=<sha> bash scripts/gpu_check.sh", timeout_s=600)' in head
    assert "9 minutes" in head and "--budget" in head and "default 540" in head
    assert re.search(r"^DRY=0; ONLY=\"\"; BUDGET=540;", open(SCRIPT).read(), re.M)
    # the call's limit leaves a minute beyond the budget
    assert 600 - 540 >= 60


@pytest.mark.parametrize("args,what", [(["--bogus"], "unknown option"), (["--only", "nope"], "unknown stage"),
                                       (["--budget", "ten"], "--budget"), (["--limit", "env"], "--limit"),
                                       # accepted, then ignored (autotune takes the time left) or planned as
                                       # gpu_suite --budget 0 (no deadline) / a negative one
                                       (["--limit", "autotune=10"], "autotune takes the time left"),
                                       (["--limit", "unet=10"], "unet needs at least 20 s")])
def test_bad_options_are_one_line_exit_2(args, what, tmp_path):
    r = _run(*args, out=tmp_path / "o")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and what in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here: the script runs instead of refusing")
def test_refuses_without_a_gpu(tmp_path):
    r = _run(out=tmp_path / "o")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "no CUDA GPU" in r.stderr and "--dry-run" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert not (tmp_path / "o").exists()  # nothing ran


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run of every stage but the (slow) bisect."""
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    r = _run("--dry-run", "--only", "env,build,tests,suite,unet,autotune", out=out)
    return r, out


def test_dry_run_runs_what_needs_no_gpu(dry_run):
    r, out = dry_run
    assert r.returncode == 0, r.stdout + r.stderr
    rows = _summary(out)
    assert list(rows) == ["env", "build", "tests", "tests-collect", "suite", "suite-plan", "unet", "autotune"]
    for s in ("env", "tests-collect", "suite-plan"):
        assert rows[s]["status"] == "passed" and rows[s]["rc"] == "0", (s, rows[s])
    for s in ("build", "tests", "suite", "unet", "autotune"):
        assert rows[s]["status"].startswith("dry run: not run"), (s, rows[s])
    assert rows["env"]["limit"] == "25" and rows["build"]["limit"] == "190" and rows["tests"]["limit"] == "120"
    env = (out / "env.txt").read_text()
    assert "torch " + torch.__version__ in env and "libstdc++" in env and "commit:" in env


def test_dry_run_shows_the_gpu_commands(dry_run):
    _, out = dry_run
    build = (out / "build.log").read_text()
    assert "TORCH_CUDA_ARCH_LIST=<this GPU>" in build and "build_ext --inplace" in build
    tests = (out / "pytest.txt").read_text()
    assert "-k cuda" in tests and "--continue-on-collection-errors" in tests
    # the selection, collected for real: the cuda-marked tests are in it
    m = re.search(r"(\d+)/(\d+) tests collected", tests)
    assert m and int(m.group(1)) > 10, tests[-500:]
    assert "test_launch.py::test_triton_kernels_on_the_second_device" in tests
    assert "test_samplers.py::test_cuda_graph_matches_eager_on_gpu" in tests
    suite = (out / "gpu_suite.txt").read_text()
    assert "gpu_suite.py --quick --no-compile" in suite
    assert re.search(r"gpu_suite --quick: \d+ cases", suite)
    assert "--unet-only --batches 1,64 --dtypes float32,bfloat16" in suite and "--max-autotune" in suite


def test_dry_run_packs_at_most_8_files(dry_run):
    r, out = dry_run
    _check_packing(out)
    assert (out / "summary.txt").exists() and "files under $OUT:" in (out / "summary.txt").read_text()


def test_budget_caps_every_stage(tmp_path):
    out = tmp_path / "o"
    r = _run("--dry-run", "--only", "env", "--budget", "30", "--limit", "env=100", out=out)
    rows = _summary(out)
    assert int(rows["env"]["limit"]) <= 25  # 30 s, less the 5 kept for packing
    assert r.returncode == (0 if rows["env"]["rc"] == "0" else 1)


def test_packing_refuses_more_than_8_files_and_cuts_huge_logs(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    for i in range(7):
        (out / f"extra{i}.txt").write_text("x")
    with open(out / "huge.log", "wb") as f:
        f.write(b"y" * (16 * 2**20 + 10))
    r = _run("--dry-run", "--only", "env", out=out)
    assert r.returncode == 1
    text = (out / "summary.txt").read_text()
    assert "more than 8 come back" in text and "failed: pack" in text
    assert (out / "huge.log").stat().st_size < 15 * 2**20


def test_bisect_flags_are_setup_pys():
    """The bisect's "our flags" variant compiles with setup.py's flags for the C++ sources plus those of its
    AVX2 build of the CPU kernels."""
    src = open(SCRIPT).read()
    ours = ast.literal_eval(re.search(r"^OUR_CFLAGS = (\[.*\])$", src, re.M).group(1))
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    consts = {t.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
              for t in node.targets if isinstance(t, ast.Name) and t.id in ("CXX_FLAGS", "CPU_VARIANTS")}
    assert ours == consts["CXX_FLAGS"] + consts["CPU_VARIANTS"]["avx2"]


@pytest.mark.slow
def test_dry_run_bisect_on_the_cpu(tmp_path):
    """The bisect runs here (on the CPU): both tiny ops build and raise, and fastddpm's own ops raise, each
    child reporting the runtime libraries it loaded."""
    out = tmp_path / "o"
    r = _run("--dry-run", "--only", "bisect", "--limit", "bisect=800", out=out)
    text = (out / "bisect.txt").read_text()
    assert r.returncode == 0, text[-3000:]
    verdict = text.split("verdict:")[1]
    assert verdict.count("ok (every error raised as a Python exception)") == 3, verdict
    assert text.count("loaded:") == 3 and "libstdc++" in text and "libgomp" in text
    assert "raised RuntimeError: boom: expected a 7-d tensor" in text
    assert "raised RuntimeError: t: expected timesteps" in text
    _check_packing(out)
