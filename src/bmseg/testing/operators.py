"""Counting the operators torch is asked for: on a GPU each is a kernel launch or a view the
thread that drives the device pays for, so tests can hold code to a fixed number of them."""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode


class OperatorCount(TorchDispatchMode):
    """Counts the operators run inside it (below autograd, composites decomposed)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))
