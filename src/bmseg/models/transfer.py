"""Host → device uploads through pinned (page-locked) staging buffers on CUDA.

A copy from pageable memory is staged by the driver through its own pinned buffer and blocks
the calling thread; from pinned memory it is one DMA the thread does not wait for
(``non_blocking=True``). Each thread keeps one pinned buffer per tile shape and reuses it,
waiting only for that buffer's previous upload to finish before overwriting it. On the CPU an
upload is the array itself as a tensor (no copy).
"""

from __future__ import annotations

import threading

import numpy as np
import torch

_staging = threading.local()


def _pinned(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.cuda.Event]:
    """This thread's pinned buffer of ``shape`` and ``dtype``, and the event its last upload
    recorded (waited for here, so the buffer is free to overwrite)."""
    buffers = getattr(_staging, "buffers", None)
    if buffers is None:
        buffers = _staging.buffers = {}
    key = (shape, dtype)
    if key not in buffers:
        buffers[key] = (torch.empty(shape, dtype=dtype, pin_memory=True), torch.cuda.Event())
    buffer, done = buffers[key]
    done.synchronize()
    return buffer, done


def upload(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """``array`` as a tensor on ``device``: on CUDA copied through a pinned buffer without
    blocking this thread (work queued after it on the thread's stream sees the data). A
    strided view (the HSPC window of a read window) is taken as it is: on the CPU nothing is
    copied, on CUDA the one copy into the pinned buffer gathers it."""
    host = torch.from_numpy(array)
    if device.type != "cuda":
        return host.to(device)
    buffer, done = _pinned(tuple(host.shape), host.dtype)
    buffer.copy_(host)
    on_device = buffer.to(device, non_blocking=True)
    done.record()
    return on_device
