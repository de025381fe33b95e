"""Seconds per named stage without stalling the device: the one timer of bmseg (SEGMENT's
stages and the models' own).

The previous timer called ``torch.cuda.synchronize`` at every stage edge: a device-wide wait
that, from several threads at once, serialised them and charged each stage with whatever the
other threads had queued. On CUDA :class:`StageTimer` instead records a pair of CUDA events on
the calling thread's current stream at the edges (so a thread that drives the device on a
stream of its own is timed on that stream alone) and reads them only in :meth:`take`, waiting
for those events and nothing else. A stage's device time is then the time between its two
events on that stream. On the CPU a stage's time is its wall time. Host wall time per stage is
kept on every device (:meth:`take_host`), so host work on a device thread stays visible.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import torch


class StageTimer:
    """``with timer("mk_masks"): ...`` adds that block's time to stage ``mk_masks``;
    :meth:`add` adds seconds measured elsewhere (a reader thread's read time); :meth:`take`
    returns the totals so far (device time on CUDA, wall time on the CPU or without a device:
    SEGMENT's host stages) and starts again (SEGMENT records them per batch). Safe to use from
    several threads."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self._lock = threading.Lock()
        self._host: dict[str, float] = {}
        self._wall: dict[str, float] = {}  # the CPU's stage times
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        events = None
        if self.device is not None and self.device.type == "cuda":
            events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            events[0].record()
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            if events is not None:
                events[1].record()
            with self._lock:
                self._host[stage] = self._host.get(stage, 0.0) + elapsed
                if events is None:
                    self._wall[stage] = self._wall.get(stage, 0.0) + elapsed
                else:
                    self._pending.append((stage, *events))

    def add(self, stage: str, seconds: float) -> None:
        """Add ``seconds`` of wall time to ``stage``'s total (host and, on the CPU, device)."""
        with self._lock:
            self._host[stage] = self._host.get(stage, 0.0) + seconds
            self._wall[stage] = self._wall.get(stage, 0.0) + seconds

    def take(self) -> dict[str, float]:
        """Seconds per stage since the last call: device time on CUDA, wall time on the CPU."""
        with self._lock:
            totals, self._wall = self._wall, {}
            pending, self._pending = self._pending, []
        for stage, start, end in pending:
            end.synchronize()  # this stage's last queued work, not the whole device
            totals[stage] = totals.get(stage, 0.0) + start.elapsed_time(end) / 1000.0
        return totals

    def take_host(self) -> dict[str, float]:
        """Host wall seconds per stage (on every device) since the last call."""
        with self._lock:
            totals, self._host = self._host, {}
        return totals
