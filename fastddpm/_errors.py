"""How an error is told: one line of its message, and whether it is an allocation the machine could not make.

Shared by the command line (every error one line) and the library messages that quote another library's
error (load_state_dict's key lists, an out-of-memory message)."""

from __future__ import annotations

# What torch says when an allocation fails: "can't allocate memory" (CPU), "out of memory" (CUDA's
# torch.OutOfMemoryError is a RuntimeError saying so).
_OOM_TEXTS = ("can't allocate memory", "out of memory")


def one_line(exc: BaseException, limit: int | None = None) -> str:
    """``exc``'s message on one line (an OSError as "file: reason"), cut to ``limit`` characters with "..."."""
    msg = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        msg = f"{exc.filename}: {exc.strerror}"
    msg = " ".join(msg.split())
    return msg if limit is None or len(msg) <= limit else msg[:limit] + "..."


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation that failed (MemoryError, or torch's RuntimeError saying so)."""
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and any(s in str(exc) for s in _OOM_TEXTS))
