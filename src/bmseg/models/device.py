"""Picking the compute device and the precision the models run at on it."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

from bmseg.errors import BmsegError
from bmseg.models.settings import DEVICE_CHOICES
from bmseg.timing import StageTimer

__all__ = ["StageTimer", "gpu_flavour", "inference", "resolve_device", "use_bf16"]

log = logging.getLogger(__name__)


def gpu_flavour() -> str:
    """``"ROCm"`` on HIP builds of torch (AMD GPUs appear as ``cuda`` devices), else ``"CUDA"``."""
    return "ROCm" if getattr(torch.version, "hip", None) else "CUDA"


def resolve_device(name: str = "auto") -> torch.device:
    """Turn ``--device auto|cpu|cuda`` into a torch device; never fall back silently.

    ``auto`` picks the GPU when torch sees one (CUDA, or ROCm through a HIP build of torch),
    else the CPU, and logs the choice. ``cuda`` without a usable GPU is an error.
    """
    if name not in DEVICE_CHOICES:
        choices = ", ".join(DEVICE_CHOICES)
        raise BmsegError(f"--device {name}: unknown device; pass one of {choices}")
    has_gpu = torch.cuda.is_available()
    if name == "cuda" and not has_gpu:
        raise BmsegError(
            "--device cuda: torch sees no CUDA or ROCm GPU here; "
            "run on a GPU node or pass --device cpu"
        )
    if name == "cpu" or not has_gpu:
        log.info("device: CPU (%s)", "requested" if name == "cpu" else "no GPU visible to torch")
        return torch.device("cpu")
    device = torch.device("cuda", torch.cuda.current_device())
    log.info("device: %s GPU %s (%s)", gpu_flavour(), device, torch.cuda.get_device_name(device))
    return device


def use_bf16(device: torch.device) -> bool:
    """Whether the models run under bfloat16 autocast on ``device`` (GPUs that support it)."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


@contextlib.contextmanager
def inference(device: torch.device) -> Iterator[None]:
    """No gradients, and bf16 autocast where the device supports it."""
    with torch.no_grad():
        if use_bf16(device):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                yield
        else:
            yield
