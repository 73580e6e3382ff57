"""Build of fastddpm and its extension fastddpm._C.

The CPU kernels are always built. The CUDA kernels are built when FASTDDPM_CUDA
is 1, or when it is "auto" (the default) and both a CUDA toolkit and a CUDA build
of torch are present; a GPU is not needed to build them. Environment:

  FASTDDPM_CUDA=auto|0|1     build the CUDA kernels (auto: when a toolkit is found)
  CUDA_HOME=/path            the CUDA toolkit (default: /usr/local/cuda, then nvcc on PATH)
  TORCH_CUDA_ARCH_LIST="8.0;9.0"  GPU architectures (default: 8.0;8.6;8.9;9.0)
  FASTDDPM_CPU_FLAGS="..."   one build of the CPU kernels with these flags (e.g. -march=native) instead of
                             the portable set: on x86-64 a baseline, an AVX2 and an AVX-512 build, the best
                             one this CPU runs chosen at import (as torch's own CPU_CAPABILITY dispatch is)
  FASTDDPM_CPU_VARIANTS=all|host  all portable builds (default), or only the one this CPU runs best (the
                             default of an editable `pip install -e .`, to keep the edit-build loop short)
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


# setup.py's flags for every C++ source (scripts/gpu_check.sh's bisect compiles with these plus the AVX2 set).
CXX_FLAGS = ["-O3", "-std=c++20", "-fvisibility=hidden", "-fopenmp"]

# The portable builds of the CPU kernels on x86-64, each its own module fastddpm._cpu_<name> (code compiled
# for one instruction set is never linked into another's module). fastddpm/ops/_library.py loads the best
# one that torch.backends.cpu.get_cpu_capability() allows; the sets are those of torch's AVX2 and AVX512
# capabilities, and csrc/include/fastddpm/cpu_vec.h picks ATen's vector width from them.
CPU_VARIANTS = {
    "default": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}


def _is_x86() -> bool:
    import platform

    return platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")


def _cpu_variants() -> tuple[str, dict[str, list[str]]]:
    """(how chosen, {build name: its flags}): "flags" (FASTDDPM_CPU_FLAGS), "all" or "host"."""
    flags = os.environ.get("FASTDDPM_CPU_FLAGS", "").split()
    if flags:
        return "flags", {"flags": flags}
    if not _is_x86():
        return "all", {"default": []}  # other architectures: the compiler's baseline only
    editable = any(a in ("editable_wheel", "develop") for a in sys.argv)
    which = os.environ.get("FASTDDPM_CPU_VARIANTS", "").strip().lower() or ("host" if editable else "all")
    if which not in ("all", "host"):
        raise SystemExit(f"FASTDDPM_CPU_VARIANTS: expected all or host, got {which!r}")
    if which == "all":
        return which, dict(CPU_VARIANTS)
    import torch

    cap = torch.backends.cpu.get_cpu_capability().upper()
    best = "avx512" if cap.startswith("AVX512") else ("avx2" if cap.startswith("AVX2") else "default")
    return which, {best: CPU_VARIANTS[best]}


def _variant_sources(name: str, sources: list[str]) -> list[str]:
    """build/cpu_variants/<name>/<op>.cpp, each including csrc/cpu/<op>.cpp: setuptools names an object after
    its source, so every build of a source needs a path of its own (and ninja then rebuilds only what
    changed). Rewritten only when its text changes, so an unchanged wrapper is not rebuilt."""
    out = []
    for src in sources:
        rel = os.path.join("build", "cpu_variants", name, os.path.basename(src))
        text = f'// Written by setup.py: the {name} build of {src}.\n#include "{os.path.join(ROOT, src)}"\n'
        full = os.path.join(ROOT, rel)
        try:
            with open(full) as f:
                same = f.read() == text
        except OSError:
            same = False
        if not same:
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full + ".tmp", "w") as f:
                f.write(text)
            os.replace(full + ".tmp", full)
        out.append(rel)
    return out


def _extensions():
    # Importing torch.utils.cpp_extension reads CUDA_HOME once, so decide first.
    with_cuda, why = _want_cuda()
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # -fopenmp: at::parallel_for is a header template over `#pragma omp parallel`; compiled without
    # it, every CPU kernel runs on one thread. The OpenMP runtime is torch's own libgomp.so.1
    # (same soname, so the process keeps one runtime and one thread pool).
    cxx = list(CXX_FLAGS)
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    # fastddpm._C: the schemas, the autograd kernels and the CUDA kernels; the CPU kernels are in the
    # fastddpm._cpu_<variant> modules.
    sources = sorted(glob.glob("csrc/ops.cpp") + glob.glob("csrc/autograd.cpp"))
    cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp"))
    cpu_mode, variants = _cpu_variants()
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
    cpu_exts = [
        CppExtension(f"fastddpm._cpu_{name}", _variant_sources(name, cpu_sources),
                     extra_compile_args={"cxx": cxx + flags}, **kwargs)
        for name, flags in variants.items()
    ]
    _log(f"CPU kernels ({cpu_mode}): " + "; ".join(f"fastddpm._cpu_{n} ({' '.join(f) or 'baseline flags'})"
                                                  for n, f in variants.items()))
    for s in sources + cpu_sources:
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
                _write_build_info(folder, with_cuda, why, archs, cpu_mode, variants)
            super().run()
            _log("built fastddpm._C with " + ("CPU + CUDA" if with_cuda else "CPU") + " kernels")

    return [ext, *cpu_exts], {"build_ext": Build.with_options(use_ninja=shutil.which("ninja") is not None)}


def _write_build_info(folder: str, with_cuda: bool, why: str, archs: str, cpu_mode: str,
                      variants: dict[str, list[str]]) -> None:
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
        "# the CPU kernel builds (fastddpm._cpu_<name>) and their flags; how they were chosen\n"
        f"CPU_VARIANTS = {dict((k, ' '.join(v)) for k, v in variants.items())!r}\n"
        f"CPU_VARIANTS_MODE = {cpu_mode!r}\n"
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
