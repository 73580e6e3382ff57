"""`fastddpm info`: versions, devices, and which backends run here (and why not)."""

from __future__ import annotations

import os
import platform

import torch

from . import __version__
from .ops import _dispatch, _library

# public op -> the name its backends are resolved under
OPS = {
    "q_sample": "q_sample",
    "ddpm_step": "ddpm_step",
    "ddim_step": "ddim_step",
    "dpmpp_step": "dpmpp_step",
    "group_norm_silu": "group_norm_silu_fwd",
    "attention": "attention",
}


def _version(mod: str) -> str:
    try:
        m = __import__(mod)
        return getattr(m, "__version__", "?")
    except Exception as exc:  # noqa: BLE001
        return f"not importable ({type(exc).__name__})"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
        return " ".join(x for x in ("avx2", "fma", "avx512f", "avx512bw", "amx_bf16") if x in flags) or "-"
    except OSError:
        return "?"


def report() -> str:
    """The text `fastddpm info` prints."""
    lines = [f"fastddpm {__version__}"]
    lines.append(f"python {platform.python_version()}, torch {torch.__version__} (CUDA build: {torch.version.cuda})")
    lines.append(f"triton {_version('triton')}, diffusers {_version('diffusers')}, numpy {_version('numpy')}")
    ncpu, nthr = os.cpu_count(), torch.get_num_threads()
    lines.append(f"cpu: {platform.machine()}, {ncpu} cores, threads {nthr}, {_cpu_flags()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
    else:
        lines.append("cuda: no device")
    if _library.has_c():
        try:
            from . import _build_info as bi

            built = f"CPU + CUDA (archs {bi.CUDA_ARCHS})" if bi.WITH_CUDA else f"CPU only ({bi.CUDA_REASON})"
        except ImportError:
            built = "unknown"
        lines.append(f"extension fastddpm._C: built with {built}")
        variants = _library.cpu_variants_built()
        built_cpu = ", ".join(f"{k} ({v})" if k == "flags" else k for k, v in variants.items()) or "unknown"
        cap = torch.backends.cpu.get_cpu_capability()
        if _library.CPU_VARIANT == "in fastddpm._C":
            lines.append("CPU kernels: inside fastddpm._C (a build from before the per-CPU builds; rebuild for them)")
        elif _library.CPU_VARIANT is not None:
            lines.append(f"CPU kernels: the {_library.CPU_VARIANT} build in use (built: {built_cpu}; torch's CPU "
                         f"capability {cap})")
        else:
            lines.append(f"CPU kernels: NOT loaded ({_library.CPU_LOAD_ERROR}; built: {built_cpu})")
    else:
        lines.append(f"extension fastddpm._C: NOT importable ({_library.C_IMPORT_ERROR})")
    interp = " (Triton interpreter on)" if _dispatch.triton_interpreting() else ""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    lines.append(f"backends per op{interp}:")
    for dev in devices:
        auto_env = os.environ.get("FASTDDPM_BACKEND")
        for op, key in OPS.items():
            avail = _dispatch.available_backends(key, dev)
            ok = [b for b, why in avail.items() if why is None]
            try:
                auto = _dispatch.resolve(key, "auto", dev, torch.float32)
            except Exception as exc:  # noqa: BLE001
                auto = f"error: {exc}"
            lines.append(f"  {op:16s} on {dev.type:4s}: auto -> {auto}; usable: {', '.join(ok)}")
            for b, why in avail.items():
                if why is not None:
                    lines.append(f"      {b}: {why}")
        if auto_env:
            lines.append(f"  (FASTDDPM_BACKEND={auto_env} replaces auto)")
    return "\n".join(lines)
