"""The interface every segmentation and embedding backend implements.

SEGMENT calls only what is defined here, so the production models (SAM2, Cellpose-SAM,
ResNet-50) and the tests' oracle segmenter are interchangeable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class Detections:
    """The cells one segmenter found in one tile, in that tile's pixel coordinates.

    ``labels`` is an (H, W) int32 image, 0 for background and ``i + 1`` for cell ``i``; a pixel
    belongs to at most one cell. ``scores`` holds one detection score per cell (``scores[i]`` for
    label ``i + 1``), higher meaning more confident, in [0, 1].
    """

    labels: np.ndarray
    scores: np.ndarray
    fill_holes: bool = False
    """Background a single cell encloses is still to be given to that cell (Cellpose's last
    step): left by the HSPC segmenter to SEGMENT's CPU workers, off the device thread."""

    @property
    def count(self) -> int:
        """Number of cells."""
        return int(self.scores.shape[0])


class Segmenter(Protocol):
    """Finds cells of one type in RGB tiles."""

    cell_type: str
    """``"MK"`` or ``"HSPC"``."""

    def segment(self, tiles: Sequence[np.ndarray], pixel_size_um: float) -> list[Detections]:
        """Segment a batch of (H, W, 3) uint8 RGB tiles; one :class:`Detections` per tile."""
        ...


class Embedder(Protocol):
    """Turns square RGB cell crops into fixed-length feature vectors."""

    dim: int
    crop_size: int

    def embed(self, crops: np.ndarray) -> np.ndarray:
        """Embed (N, crop_size, crop_size, 3) uint8 crops into an (N, dim) float32 array."""
        ...


@runtime_checkable
class SquareEmbedder(Embedder, Protocol):
    """An embedder that cuts its own crops from the tile, where it runs (on a GPU: on the
    device, no crops on the host). SEGMENT prefers this way in when an embedder offers it."""

    def embed_squares(
        self, rgb: np.ndarray, squares: np.ndarray, size: int | None = None
    ) -> np.ndarray:
        """Embed the (N, 3) ``x, y, side`` squares of an (H, W, 3) uint8 tile, resampled to
        ``size``² (the embedder's ``crop_size`` by default): (N, dim)."""
        ...
