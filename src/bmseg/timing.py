"""Seconds per named stage: the one timer of bmseg (SEGMENT's stages and the models' own)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import torch


class StageTimer:
    """Seconds spent per named stage, summed over calls and threads.

    ``with timer("mk_masks"): ...`` adds that block's wall time to ``timer.seconds["mk_masks"]``,
    :meth:`add` adds seconds measured elsewhere (a reader thread's read time); :meth:`take`
    returns the totals so far and starts again. Given a CUDA ``device``, GPU work is waited for
    at each edge of a ``with`` block, so a stage is charged for the kernels it queued; without
    one (SEGMENT's host stages) nothing waits.
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()  # stages run on several threads

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.add(stage, time.perf_counter() - start)

    def add(self, stage: str, seconds: float) -> None:
        """Add ``seconds`` to ``stage``'s total."""
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def take(self) -> dict[str, float]:
        """The totals per stage since the last call, in seconds."""
        with self._lock:
            totals, self.seconds = self.seconds, {}
        return totals

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
