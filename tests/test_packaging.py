"""Packaging: the sdist holds everything the build needs, and the extension builds from it in a fresh
folder (CUDA kernels included where a CUDA toolkit and a CUDA build of torch exist); the metadata asks
for a torch range, not the tested pin."""

from __future__ import annotations

import fcntl
import glob
import os
import subprocess
import sys
import tarfile
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCK = "/tmp/fastddpm-build.lock"  # shared with scripts/run.sh and every other build on the machine


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:
        import tomli as tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_dependencies_are_ranges_and_the_pin_is_dev_only():
    import torch
    from packaging.requirements import Requirement
    from packaging.version import Version

    proj = _pyproject()["project"]
    deps = {Requirement(d).name: Requirement(d) for d in proj["dependencies"]}
    tested = Version(torch.__version__.split("+")[0])
    t = deps["torch"].specifier
    assert "==" not in str(t), t
    assert tested in t and Version(f"{tested.major + 1}.0") not in t, t
    assert Version(f"{tested.major}.{tested.minor}") in t  # the oldest tested minor release is allowed
    assert "safetensors" in deps  # shipped models and checkpoints are safetensors files
    # Python 3.10 lacks tomllib (train --config): tomli is required there and only there.
    assert proj["requires-python"] == ">=3.10"
    tomli = deps["tomli"]
    assert tomli.marker.evaluate({"python_version": "3.10"}) and not tomli.marker.evaluate({"python_version": "3.11"})
    with open(os.path.join(ROOT, "requirements-dev.txt")) as f:
        dev = [ln.split("#")[0].strip() for ln in f]
    assert f"torch=={torch.__version__.split('+')[0]}" in dev and "build" in dev


def _checkout_files() -> list[str]:
    """The files a fresh clone would have (tracked, plus new files not ignored)."""
    r = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"the sdist test runs from a git checkout (git ls-files failed: {r.stderr.strip()})")
    return [f for f in r.stdout.splitlines() if os.path.isfile(os.path.join(ROOT, f))]


def _cuda_expected() -> bool:
    """Whether setup.py should build the CUDA kernels here: decided independently of setup.py's own search,
    from the toolkit's usual places and torch's build."""
    import torch

    mode = os.environ.get("FASTDDPM_CUDA", "auto")
    if mode == "0":
        return False
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    toolkit = any(h and os.path.isfile(os.path.join(h, "bin", "nvcc")) for h in homes)
    return bool(torch.version.cuda) and toolkit


@pytest.mark.slow
def test_sdist_builds_the_extension_in_a_fresh_folder(tmp_path):
    import shutil

    src = tmp_path / "clone"
    for f in _checkout_files():
        os.makedirs(src / os.path.dirname(f), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), src / f)
    env = dict(os.environ)
    # One GPU architecture: the test proves the CUDA sources compile and link from the sdist; each extra
    # architecture recompiles every .cu file (minutes each on a 2-core CI machine) and proves nothing more.
    env["TORCH_CUDA_ARCH_LIST"] = "9.0"
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    r = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path / "dist"),
                        str(src)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (sdist,) = glob.glob(str(tmp_path / "dist" / "fastddpm-*.tar.gz"))
    with tarfile.open(sdist) as tf:
        names = tf.getnames()
        top = names[0].split("/")[0]
        members = {n.split("/", 1)[1] for n in names if "/" in n}
        tf.extractall(tmp_path / "fresh", filter="data")
    needed = [f for f in _checkout_files() if f.startswith("csrc/") or f in ("CMakeLists.txt", "setup.py",
                                                                             "pyproject.toml", "MANIFEST.in")]
    assert any(f.endswith(".h") for f in needed) and any(f.endswith(".cu") for f in needed)
    missing = sorted(set(needed) - members)
    assert not missing, f"the sdist lacks {missing}"
    assert "fastddpm/_build_info.py" not in members and not any(m.endswith(".so") for m in members)

    # Build the wheel from the unpacked sdist alone (the checkout is not on any path), one build at a time.
    fresh = tmp_path / "fresh" / top
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
                            "--disable-pip-version-check", "-w", str(tmp_path / "wheel"), str(fresh)],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=3000)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (whl,) = glob.glob(str(tmp_path / "wheel" / "fastddpm-*.whl"))
    site = tmp_path / "site"
    with zipfile.ZipFile(whl) as z:
        z.extractall(site)
    # Import the built package (not the checkout's) and run a C++ kernel against a float64 formula.
    code = r"""
import os, sys, torch
import fastddpm
from fastddpm import _build_info as bi
from fastddpm.ops import _library
assert fastddpm.__file__.startswith(sys.argv[1]), fastddpm.__file__
assert _library.has_c(), _library.C_IMPORT_ERROR
x0, eps = torch.randn(3, 2, 5, 7), torch.randn(3, 2, 5, 7)
t = torch.tensor([0, 500, 999])
sched = fastddpm.NoiseSchedule(1000)
xt = fastddpm.ops.q_sample(x0, t, eps, sched, backend="cpu")
# the float64 values the kernel's float32 tables were rounded from (the float32 abar table rounded again
# would put up to ~3e-6 into 1 - abar near t = 0: the schedule's rounding, not the kernel's error)
a = sched.table("alphas_cumprod", "cpu", torch.float64)[t].view(-1, 1, 1, 1)
ref = a.sqrt() * x0.double() + (1 - a).sqrt() * eps.double()
assert torch.allclose(xt.double(), ref, rtol=1e-5, atol=1e-6), (xt.double() - ref).abs().max()
print(bi.WITH_CUDA, bi.CUDA_ARCHS)
"""
    penv = dict(env, PYTHONPATH=str(site), FASTDDPM_REQUIRE_EXTENSION="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code, str(site)], cwd=tmp_path, env=penv, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    with_cuda, archs = r.stdout.split()[0] == "True", r.stdout.split()[1:]
    assert with_cuda == _cuda_expected(), r.stdout
    if with_cuda:
        assert archs == ["9.0"]
        # The CUDA kernels are in the built library (their symbols, without a GPU to call them on).
        import glob as g

        (so,) = g.glob(str(site / "fastddpm" / "_C*.so"))
        assert b"group_norm_silu" in open(so, "rb").read() and b"cudaLaunch" in open(so, "rb").read()

    # The wheel's portable CPU kernels: all three builds on x86-64 (the baseline elsewhere), and each one this
    # CPU runs gives the float64 reference's answers (tests/test_cpu_variants.py's CHECK) when loaded.
    import platform

    from test_cpu_variants import CHECK

    from fastddpm.ops import _library

    ns: dict = {}
    exec((site / "fastddpm" / "_build_info.py").read_text(), ns)
    expected = ["avx2", "avx512", "default"] if platform.machine() == "x86_64" else ["default"]
    assert sorted(ns["CPU_VARIANTS"]) == expected and ns["CPU_VARIANTS_MODE"] == "all", ns["CPU_VARIANTS"]
    for name in expected:
        assert glob.glob(str(site / "fastddpm" / f"_cpu_{name}*.so")), name
    for name in _library.cpu_variants_runnable():
        r = subprocess.run([sys.executable, "-c", CHECK, os.path.join(ROOT, "tests")], cwd=tmp_path,
                           env=dict(penv, FASTDDPM_CPU_VARIANT=name), capture_output=True, text=True, timeout=600)
        assert r.returncode == 0 and r.stdout.split() == [name, "ok"], (name, r.stdout, r.stderr[-3000:])


@pytest.mark.parametrize("argv, rc", [([""], 2), (["bogus"], 2), (["--help"], 0), (["-h"], 0)])
def test_run_sh_usage(argv, rc):
    # An empty argument ran the whole test path (${1:-test} reads "" as missing); --help exited 2. None of these
    # reaches the set-up (a venv, a build).
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "run.sh"), *argv], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == rc, r
    assert (r.stdout + r.stderr).strip() == "usage: bash scripts/run.sh demo|test|bench|setup"
