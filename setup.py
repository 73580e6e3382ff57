"""Build of fastddpm and its extension fastddpm._C.

The CPU kernels are always built. The CUDA kernels are built when FASTDDPM_CUDA
is 1, or when it is "auto" (the default) and both a CUDA toolkit and a CUDA build
of torch are present; a GPU is not needed to build them. Environment:

  FASTDDPM_CUDA=auto|0|1     build the CUDA kernels (auto: when a toolkit is found)
  CUDA_HOME=/path            the CUDA toolkit (default: /usr/local/cuda, then nvcc on PATH)
  TORCH_CUDA_ARCH_LIST="8.0;9.0"  GPU architectures (default: 8.0;8.6;8.9;9.0)
  FASTDDPM_CPU_FLAGS="..."   extra C++ flags for the CPU kernels (default: -march=native)
  MAX_JOBS=N                 parallel compile jobs
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0"


def _log(msg: str) -> None:
    print(f"[fastddpm build] {msg}", file=sys.stderr, flush=True)


def _find_cuda_home() -> str | None:
    """The CUDA toolkit root, found without asking whether a GPU is present.

    The `nvcc` on PATH may be a wrapper script (as on the build hosts this project
    uses), whose directory is not the toolkit, so a real toolkit layout is required:
    bin/nvcc plus include/cuda_runtime.h.
    """

    def ok(root: str | None) -> bool:
        return bool(root) and os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isfile(
            os.path.join(root, "include", "cuda_runtime.h")
        )

    for var in ("CUDA_HOME", "CUDA_PATH"):
        if ok(os.environ.get(var)):
            return os.environ[var]
    if ok("/usr/local/cuda"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        # Resolve a wrapper script that execs the real compiler.
        try:
            with open(nvcc, "rb") as f:
                head = f.read(4096).decode("utf-8", "replace")
            for tok in head.split():
                if tok.endswith("/bin/nvcc") and ok(os.path.dirname(os.path.dirname(tok))):
                    return os.path.dirname(os.path.dirname(tok))
        except OSError:
            pass
        root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if ok(root):
            return root
    return None


def _want_cuda() -> tuple[bool, str]:
    mode = os.environ.get("FASTDDPM_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"FASTDDPM_CUDA: expected auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False, "FASTDDPM_CUDA=0"
    import torch

    cuda_home = _find_cuda_home()
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is not a CUDA build")
    if cuda_home is None:
        reasons.append("no CUDA toolkit found (set CUDA_HOME)")
    if reasons:
        if mode == "1":
            raise SystemExit("FASTDDPM_CUDA=1 but " + "; ".join(reasons))
        return False, "; ".join(reasons)
    os.environ["CUDA_HOME"] = cuda_home
    return True, f"toolkit {cuda_home}, torch CUDA {torch.version.cuda}"


def _extensions():
    # Importing torch.utils.cpp_extension reads CUDA_HOME once, so decide first.
    with_cuda, why = _want_cuda()
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cpu_flags = os.environ.get("FASTDDPM_CPU_FLAGS", "-march=native").split()
    # -fopenmp: at::parallel_for is a header template over `#pragma omp parallel`; compiled without
    # it, every CPU kernel runs on one thread. The OpenMP runtime is torch's own libgomp.so.1
    # (same soname, so the process keeps one runtime and one thread pool).
    cxx = ["-O3", "-std=c++20", "-fvisibility=hidden", "-fopenmp", *cpu_flags]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    sources = sorted(glob.glob("csrc/ops.cpp") + glob.glob("csrc/autograd.cpp") + glob.glob("csrc/cpu/*.cpp"))
    kwargs = dict(include_dirs=include_dirs, py_limited_api=False, extra_link_args=["-fopenmp"])
    if with_cuda:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        ext = CUDAExtension(
            "fastddpm._C",
            sources,
            define_macros=[("FASTDDPM_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cxx,
                "nvcc": ["-O3", "-std=c++20", "-lineinfo"],
            },
            **kwargs,
        )
        _log(f"building CPU and CUDA kernels ({why}; archs {archs})")
    else:
        ext = CppExtension("fastddpm._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)
        _log(f"building CPU kernels only: CUDA kernels skipped ({why})")
    for s in sources:
        _log(f"  source {s}")

    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else ""

    class Build(BuildExtension):
        def finalize_options(self):
            super().finalize_options()
            if getattr(self, "editable_mode", False):
                # setuptools gives every editable build a fresh temporary folder, so each `pip install -e .`
                # recompiled every source; in a fixed folder ninja recompiles only what changed.
                self.build_temp = os.path.join(ROOT, "build", "editable-temp")

        def run(self):
            # Written only when the extension is built (not by sdist or egg_info), next to the sources for
            # an in-place/editable build and into the build folder for a wheel (build_py copied the
            # package there before this command runs).
            targets = [os.path.join(ROOT, "fastddpm")]
            if not self.inplace and self.build_lib:
                targets.append(os.path.join(self.build_lib, "fastddpm"))
            for folder in targets:
                _write_build_info(folder, with_cuda, why, archs)
            super().run()
            _log("built fastddpm._C with " + ("CPU + CUDA" if with_cuda else "CPU") + " kernels")

    return [ext], {"build_ext": Build.with_options(use_ninja=shutil.which("ninja") is not None)}


def _write_build_info(folder: str, with_cuda: bool, why: str, archs: str) -> None:
    """Record what this build compiled, for `fastddpm info` and the tests (atomic write)."""
    import torch

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "_build_info.py")
    text = (
        '"""Written by setup.py: what the installed fastddpm._C was built with."""\n'
        f"WITH_CUDA = {with_cuda!r}\n"
        f"CUDA_REASON = {why!r}\n"
        f"CUDA_ARCHS = {archs!r}\n"
        f"CUDA_MODE = {os.environ.get('FASTDDPM_CUDA', 'auto').strip().lower()!r}\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
    )
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _git_free_version() -> str:
    ns: dict = {}
    with open(os.path.join(ROOT, "fastddpm", "_version.py")) as f:
        exec(f.read(), ns)
    return ns["__version__"]


if __name__ == "__main__":
    ext_modules, cmdclass = _extensions()
    setup(
        version=_git_free_version(),
        packages=find_packages(include=["fastddpm", "fastddpm.*"]) + ["fastddpm.triton_kernels"],
        package_dir={"fastddpm.triton_kernels": "triton_kernels"},
        package_data={"fastddpm": ["assets/*"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
