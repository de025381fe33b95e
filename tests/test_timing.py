"""The one stage timer: totals summed over blocks and threads, taken once."""

from __future__ import annotations

import threading
import time

from bmseg.timing import StageTimer


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
