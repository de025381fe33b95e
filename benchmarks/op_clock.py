"""The CPU time a thread spends inside torch's operators, for ``benchmarks/segment.py
--host-only``: on a CPU those operators are the compute a GPU would run as kernels, so what
is left of the thread's CPU time is the host work a GPU would leave on it.

Both sides are the thread's own CPU time (``time.thread_time``), not the clock: on a shared
machine a thread that waits for the GIL or is preempted spends no CPU time, so neither the
other threads nor other jobs inflate the figure. Operators are counted where a
``TorchDispatchMode`` sees them (below autograd, composite operators already decomposed), so
each is one kernel (or view) a GPU would be asked for.
"""

from __future__ import annotations

import sys
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class OpClock(TorchDispatchMode):
    """Counts the operators the thread that enters it calls and sums the thread's CPU time
    inside them, views (which launch no kernel on a GPU: their cost is host work there too)
    apart; with ``by_caller``, also counts them, and the CPU time since the operator before
    (the clock's own cost included), by the innermost bmseg function."""

    def __init__(self, by_caller: bool = False) -> None:
        super().__init__()
        self.ops = 0
        self.op_cpu_ns = 0
        self.views = 0
        self.view_cpu_ns = 0
        self.by_caller: Counter[str] | None = Counter() if by_caller else None
        self.gap_ns_by_caller: Counter[str] = Counter()
        self.view_ns_by_name: Counter[str] = Counter()
        self._last_end: int | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.thread_time_ns()
        out = func(*args, **(kwargs or {}))
        end = time.thread_time_ns()
        self.op_cpu_ns += end - start
        self.ops += 1
        view = _is_view(func, args, out)
        if view:
            self.views += 1
            self.view_cpu_ns += end - start
        if self.by_caller is not None:
            if view:
                self.view_ns_by_name[str(func)] += end - start
            caller = _bmseg_caller()
            self.by_caller[caller] += 1
            if self._last_end is not None:
                self.gap_ns_by_caller[caller] += start - self._last_end
            self._last_end = time.thread_time_ns()
        return out

    def __exit__(self, *exc):
        self._last_end = None
        return super().__exit__(*exc)


def _is_view(func, args, out) -> bool:
    """Whether the operator returned a view of its first tensor argument: a view operator
    that did not copy (``to``, ``reshape`` and ``contiguous`` may alias or copy)."""
    if not func.is_view:
        return False
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    result = out[0] if isinstance(out, (tuple, list)) and out else out
    if first is None or not isinstance(result, torch.Tensor):
        return False
    return result.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()


def _bmseg_caller() -> str:
    """``module:function`` of the innermost bmseg frame on the stack (or ``other``)."""
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.startswith("bmseg"):
            return f"{module}:{frame.f_code.co_name}"
        frame = frame.f_back
    return "other"
