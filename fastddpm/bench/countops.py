"""The GPU cost proxy a GPU-less machine can measure: operators dispatched and bytes they allocate.

On a GPU every aten operator that reaches a kernel is (at least) one launch, and every tensor it returns
is memory written and later read; counting both per denoising step or per training step predicts where a
fused implementation saves launches and traffic, independent of the machine's load.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class CountOps(TorchDispatchMode):
    """Counts aten ops and the bytes of the tensors they return (views and in-place ops excluded).

    ``ops`` counts every operator, views included; ``kernels`` leaves out the pure views (detach,
    expand, reshape without a copy, ...), which launch nothing on a GPU.
    """

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.kernels = 0
        self.bytes = 0
        self.names: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        name = str(func.overloadpacket)
        self.names[name] = self.names.get(name, 0) + 1
        schema = func._schema
        aliasing = any(r.alias_info is not None for r in schema.returns)
        if not aliasing or any(r.alias_info is not None and r.alias_info.is_write for r in schema.returns):
            self.kernels += 1
        if not aliasing:
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(o, torch.Tensor):
                    self.bytes += o.numel() * o.element_size()
        return out


def count(fn: Callable[[], object], grad: bool = False) -> CountOps:
    """Run ``fn`` once under CountOps (under no_grad unless ``grad``: a training step needs autograd)."""
    with torch.set_grad_enabled(grad), CountOps() as c:
        fn()
    return c


def flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call (torch.utils.flop_counter: matmuls and convolutions, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def _span_bytes(t: torch.Tensor) -> int:
    """Bytes of memory a tensor view covers (a broadcast stride-0 view counts its elements once)."""
    if t.numel() == 0:
        return 0
    span = 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()) if s > 1)
    return min(t.numel(), span) * t.element_size()


class Traffic(TorchDispatchMode):
    """Memory traffic of an unfused sequence, kernel by kernel: every operator that is not a pure view
    reads its tensor inputs and writes its outputs once, from and to memory (no cache reuse between
    kernels: what a GPU does for tensors larger than its cache). ``kernels``, ``read`` and ``written``
    sum over the block; ``per_op`` keeps (name, read, written) in order."""

    def __init__(self):
        super().__init__()
        self.kernels = 0
        self.read = 0
        self.written = 0
        self.per_op: list[tuple[str, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        rets = func._schema.returns
        view = any(r.alias_info is not None and not r.alias_info.is_write for r in rets)
        if view:
            return out
        seen, r = set(), 0
        for a in list(args) + list(kwargs.values()):
            for x in a if isinstance(a, (list, tuple)) else (a,):
                if isinstance(x, torch.Tensor) and id(x) not in seen:
                    seen.add(id(x))
                    r += _span_bytes(x)
        w = sum(_span_bytes(o) for o in (out if isinstance(out, (tuple, list)) else (out,))
                if isinstance(o, torch.Tensor))
        self.kernels += 1
        self.read += r
        self.written += w
        self.per_op.append((str(func.overloadpacket), r, w))
        return out


def traffic(fn: Callable[[], object], grad: bool = False) -> Traffic:
    with torch.set_grad_enabled(grad), Traffic() as t:
        fn()
    return t
