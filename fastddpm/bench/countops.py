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
