"""bmseg.timing.StageTimer: wall time per stage on the CPU; on CUDA one pair of events
per stage on the calling thread's stream, read in take(), never a device-wide synchronize
(a fake Event stands in for CUDA's here, with a clock the test controls); seconds added from
several threads sum."""

from __future__ import annotations

import threading
import time
from typing import ClassVar

import pytest
import torch

from bmseg.timing import StageTimer


def test_cpu_stages_sum_wall_time_across_threads_and_take_resets() -> None:
    timer = StageTimer(torch.device("cpu"))

    def work() -> None:
        for _ in range(3):
            with timer("embed"):
                time.sleep(0.01)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for thread in threads:
        thread.start()
    with timer("cellpose_net"):
        time.sleep(0.02)
    for thread in threads:
        thread.join()
    totals = timer.take()
    assert set(totals) == {"embed", "cellpose_net"}
    assert 0.06 <= totals["embed"] < 1.0 and 0.02 <= totals["cellpose_net"] < 1.0
    assert timer.take() == {}
    assert set(timer.take_host()) == {"embed", "cellpose_net"} and timer.take_host() == {}


class FakeEvent:
    """CUDA event stand-in: ``record`` stamps the fake clock, like an event on a stream."""

    clock_ms = 0.0
    waited: ClassVar[list[FakeEvent]] = []

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        self.stamp: float | None = None

    def record(self) -> None:
        self.stamp = FakeEvent.clock_ms

    def synchronize(self) -> None:
        FakeEvent.waited.append(self)

    def elapsed_time(self, end: FakeEvent) -> float:
        assert self.stamp is not None and end.stamp is not None
        return end.stamp - self.stamp


def test_cuda_stages_are_timed_by_events_without_device_wide_sync(monkeypatch) -> None:
    def device_wide(*args, **kwargs):
        raise AssertionError("torch.cuda.synchronize stalls every thread's work")

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", device_wide)
    FakeEvent.clock_ms, FakeEvent.waited = 0.0, []
    timer = StageTimer(torch.device("cuda"))
    with timer("sam2_encode"):
        FakeEvent.clock_ms += 250.0  # the device spends 250 ms on this stage's work
    with timer("embed"):
        FakeEvent.clock_ms += 40.0
    with timer("sam2_encode"):
        FakeEvent.clock_ms += 50.0
    assert FakeEvent.waited == []  # nothing waited for until the totals are read
    totals = timer.take()
    assert totals == pytest.approx({"sam2_encode": 0.3, "embed": 0.04})
    assert len(FakeEvent.waited) == 3  # each stage's end event, and only those
    assert timer.take() == {}


def test_totals_sum_blocks_and_added_seconds_from_several_threads() -> None:
    timer = StageTimer()
    threads = [threading.Thread(target=timer.add, args=("read", 0.25)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with timer("write"):
        time.sleep(0.01)
    totals = timer.take()
    assert totals["read"] == 2.0
    assert totals["write"] >= 0.01
    assert timer.take() == {}  # taking starts again
