"""Loading of the compiled extension (fastddpm._C: the schemas of csrc/ops.cpp, the CUDA kernels; the CPU
kernel build this CPU runs) and what was loaded (has_c, has_kernel).

Each op's fake (meta) implementation, so that torch.compile(fullgraph=True) traces through it, and its
autograd formula where training needs one, are registered next to its public function
(fastddpm/ops/<op>.py).
"""

from __future__ import annotations

import os
import warnings

import torch

# How to rebuild the extension against the torch now installed (an ABI change after a torch upgrade is the
# usual reason it stops importing).
REBUILD = ("rebuild it against the installed torch: pip install --no-build-isolation --no-deps "
           "--force-reinstall <fastddpm source folder or sdist> (in a source checkout: "
           "pip install --no-build-isolation --no-deps -e .)")


class ExtensionImportError(ImportError):
    """fastddpm._C did not import and FASTDDPM_REQUIRE_EXTENSION=1 asks for it."""


class ExtensionMissingWarning(RuntimeWarning):
    """fastddpm._C did not import: every op runs on the (slow) torch reference."""


def _require() -> bool:
    return os.environ.get("FASTDDPM_REQUIRE_EXTENSION", "") not in ("", "0")


# Set instead of raising when the `fastddpm` command itself imports the package: the package import runs
# before the command's code, so an error raised here would be a traceback, where the command prints
# this one line and exits with status 2.
REQUIRED_ERROR: str | None = None


def _is_cli() -> bool:
    import sys

    if os.path.splitext(os.path.basename(sys.argv[0] if sys.argv else ""))[0] == "fastddpm":
        return True  # the console script
    argv = getattr(sys, "orig_argv", [])  # python -m fastddpm: sys.argv[0] is still "-m" here
    return any(a == "-m" and b in ("fastddpm", "fastddpm.cli") for a, b in zip(argv, argv[1:]))


def _missing(msg: str, exc: BaseException | None = None) -> None:
    global REQUIRED_ERROR
    if _require():
        if _is_cli():
            REQUIRED_ERROR = msg + " (FASTDDPM_REQUIRE_EXTENSION=1 makes this an error)"
            return
        raise ExtensionImportError(msg + " (FASTDDPM_REQUIRE_EXTENSION=1 makes this an error)") from exc
    # Once per process: this module is imported once.
    warnings.warn(msg, ExtensionMissingWarning, stacklevel=3)


_C = None
C_IMPORT_ERROR: str | None = None
try:
    from .. import _C  # noqa: F811  (loads libfastddpm ops into torch.ops.fastddpm)
except Exception as exc:  # noqa: BLE001  (any failure: a missing library, an undefined symbol, ...)
    C_IMPORT_ERROR = " ".join(f"{type(exc).__name__}: {exc}".split())
    _missing(f"fastddpm: the C++ extension fastddpm._C did not import ({C_IMPORT_ERROR}); the CPU ops run on "
             f"the torch reference, several times slower. To fix, {REBUILD}", exc)


class CpuVariantError(RuntimeError):
    """FASTDDPM_CPU_VARIANT asks for a CPU kernel build this CPU cannot run, or that was not built."""


CPU_ORDER = ("avx512", "avx2", "default")  # best first


def cpu_variants_runnable() -> list[str]:
    """The portable CPU kernel builds this CPU runs, best first, after torch's own CPU capability (which
    honours ATEN_CPU_CAPABILITY)."""
    try:
        cap = torch.backends.cpu.get_cpu_capability().upper()
    except Exception:  # noqa: BLE001  (an unknown CPU: the baseline)
        cap = "DEFAULT"
    if cap.startswith("AVX512"):
        return list(CPU_ORDER)
    return ["avx2", "default"] if cap.startswith("AVX2") else ["default"]


def cpu_variants_built() -> dict[str, str]:
    """{build name: its flags} of the CPU kernel modules this install built (fastddpm/_build_info.py)."""
    try:
        from .. import _build_info as bi
    except ImportError:
        return {}
    return dict(getattr(bi, "CPU_VARIANTS", {}))


def choose_cpu_variant() -> str:
    """The CPU kernel build to load: a FASTDDPM_CPU_FLAGS build if that is what was built, else the best
    portable one this CPU runs, or the one FASTDDPM_CPU_VARIANT names (an error if this CPU cannot run it
    or it was not built)."""
    built = cpu_variants_built()
    runnable = cpu_variants_runnable()
    forced = os.environ.get("FASTDDPM_CPU_VARIANT", "").strip().lower()
    if forced:
        if forced not in (*CPU_ORDER, "flags"):
            raise CpuVariantError(f"FASTDDPM_CPU_VARIANT: expected one of {', '.join(CPU_ORDER)}, got {forced!r}")
        if forced != "flags" and forced not in runnable:
            raise CpuVariantError(
                f"FASTDDPM_CPU_VARIANT={forced}: this CPU cannot run it (torch's CPU capability "
                f"{torch.backends.cpu.get_cpu_capability()}; it runs {', '.join(runnable)})")
        if forced not in built:
            raise CpuVariantError(
                f"FASTDDPM_CPU_VARIANT={forced}: not built here (built: {', '.join(built) or 'none'}; an editable "
                f"build makes only the best one for this CPU unless FASTDDPM_CPU_VARIANTS=all)")
        return forced
    if "flags" in built:
        return "flags"
    for name in runnable:
        if name in built:
            return name
    raise CpuVariantError(f"no CPU kernel build this CPU runs (built: {', '.join(built) or 'none'}; "
                          f"this CPU runs {', '.join(runnable)})")


CPU_VARIANT: str | None = None  # the CPU kernel build in use
CPU_LOAD_ERROR: str | None = None


def _load_cpu_kernels() -> None:
    global CPU_VARIANT, CPU_LOAD_ERROR, REQUIRED_ERROR
    import importlib.util

    if torch._C._dispatch_has_kernel_for_dispatch_key("fastddpm::q_sample", "CPU"):
        CPU_VARIANT = "in fastddpm._C"  # a build from before the CPU kernels had modules of their own
        return
    try:
        name = choose_cpu_variant()
        spec = importlib.util.find_spec(f"fastddpm._cpu_{name}")
        if spec is None or not spec.origin:
            raise ImportError(f"fastddpm._cpu_{name} is listed in fastddpm/_build_info.py but not found")
        torch.ops.load_library(spec.origin)  # its TORCH_LIBRARY_IMPL(fastddpm, CPU) registers the kernels
    except CpuVariantError as exc:
        # The user's own setting: an error whatever FASTDDPM_REQUIRE_EXTENSION says (one line from the command).
        if _is_cli():
            REQUIRED_ERROR = f"fastddpm: {exc}"
            return
        raise
    except Exception as exc:  # noqa: BLE001
        CPU_LOAD_ERROR = " ".join(f"{type(exc).__name__}: {exc}".split())
        _missing(f"fastddpm: the CPU kernels did not load ({CPU_LOAD_ERROR}); the CPU ops run on the torch "
                 f"reference, several times slower. To fix, {REBUILD}", exc)
        return
    CPU_VARIANT = name


if _C is not None:
    _load_cpu_kernels()


def has_c() -> bool:
    """Whether fastddpm._C (the C++ kernels) imported."""
    return _C is not None


def _kernel_table() -> frozenset[tuple[str, str]]:
    # Read once at import (every C++ kernel registers when _C loads), so dispatch
    # decisions are plain set lookups that torch.compile traces without a graph break.
    if _C is None:
        return frozenset()
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastddpm::")]
    return frozenset(
        (n.split("::", 1)[1], key)
        for n in names
        for key in ("CPU", "CUDA")
        if torch._C._dispatch_has_kernel_for_dispatch_key(n, key)
    )


_KERNELS = _kernel_table()


def has_kernel(op: str, key: str) -> bool:
    """Whether op ``fastddpm::<op>`` has a C++ kernel for dispatch key ``key`` ("CPU", "CUDA")."""
    return (op, key) in _KERNELS
