"""``bmseg annotate serve`` started in its own process, for the annotation and browser tests."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path


def start_server(site: Path, labels: Path, port: int) -> tuple[subprocess.Popen, int]:
    """``bmseg annotate serve`` in its own process; returns it and the port it listens on."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bmseg.cli",
            "annotate",
            "serve",
            str(site),
            "--labels",
            str(labels),
            "--port",
            str(port),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    deadline = time.monotonic() + 60
    for line in process.stderr:
        found = re.search(r"at http://127\.0\.0\.1:(\d+)/", line)
        if found:  # keep reading its log so a full pipe never blocks the server
            threading.Thread(target=process.stderr.read, daemon=True).start()
            return process, int(found.group(1))
        if time.monotonic() > deadline:
            break
    process.kill()
    raise AssertionError("the server did not start")
