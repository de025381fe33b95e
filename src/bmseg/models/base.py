"""The interface every segmentation and embedding backend implements.

SEGMENT calls only what is defined here, so the production models (SAM2, Cellpose-SAM,
ResNet-50) and the tests' oracle segmenter are interchangeable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

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


def exclude_claimed(claimed: Detections, other: Detections, max_lost: float = 0.5) -> Detections:
    """``other`` without the pixels ``claimed`` already owns: the rule between cell types.

    SEGMENT applies it as ``exclude_claimed(mk, hspc)``: MKs keep every pixel they segmented
    (they are the larger, rarer cells, and an HSPC-sized blob inside an MK is usually one of
    its nuclear lobes). A cell of ``other`` that loses more than ``max_lost`` of its area is
    dropped; the rest keep their remaining pixels. Labels are renumbered 1..n in the original
    order and scores follow them.
    """
    if claimed.labels.shape != other.labels.shape:
        raise ValueError(f"label images differ: {claimed.labels.shape} vs {other.labels.shape}")
    count = other.count
    flat = other.labels.ravel()
    lost = claimed.labels.ravel() > 0
    area = np.bincount(flat, minlength=count + 1)[1:]
    lost_area = np.bincount(flat[lost], minlength=count + 1)[1:]
    keep = lost_area <= max_lost * area
    lookup = np.zeros(count + 1, dtype=np.int32)
    lookup[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    labels = lookup[other.labels]
    labels[claimed.labels > 0] = 0
    return Detections(labels=labels, scores=other.scores[keep])
