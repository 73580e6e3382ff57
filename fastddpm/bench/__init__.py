"""The benchmark suite of `fastddpm bench` (and `python -m benchmarks.run`), inside the package so that it
runs from an installed fastddpm: timing helpers (timing), the GPU cost proxy (countops), per-op providers
(ops), the networks (models), sampling and training workloads (workloads), the cases and tables (suite).
The per-op scripts in the repository's benchmarks/ folder take their providers from here too.

Every entry point calls refuse_reference_run() first: a build whose fastddpm._C does not import would
otherwise time the torch reference under the name "fastddpm".
"""

import os


class ReferenceRunError(RuntimeError):
    """A benchmark would time the torch reference under fastddpm's name."""


def reference_reason(device: str = "cpu") -> str | None:
    """Why fastddpm's ops would run on the torch reference on ``device`` (None: they run fastddpm's
    kernels)."""
    import torch

    from ..info import OPS
    from ..ops import _dispatch, _library

    dev = torch.device(device)
    if dev.type == "cpu" and not _library.has_c():
        return f"the C++ extension fastddpm._C did not import ({_library.C_IMPORT_ERROR})"
    ref = [op for op, key in OPS.items() if _dispatch.resolve(key, "auto", dev, torch.float32) == "torch"]
    if ref:
        env = os.environ.get("FASTDDPM_BACKEND")
        via = f"FASTDDPM_BACKEND={env}" if env else "backend auto"
        return f"{via} runs {', '.join(ref)} on the torch reference on {dev.type}"
    return None


def refuse_reference_run(device: str = "cpu") -> None:
    """Raise ReferenceRunError rather than label a torch-reference run as fastddpm's."""
    from ..ops._library import REBUILD

    why = reference_reason(device)
    if why:
        raise ReferenceRunError(f"benchmark refused: {why}, so the rows labelled 'fastddpm' would time the "
                                f"torch reference, not fastddpm's kernels. To fix, {REBUILD}"
                                + (" (or unset FASTDDPM_BACKEND)" if os.environ.get("FASTDDPM_BACKEND") else ""))
