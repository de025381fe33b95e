"""Stand-ins for the models that know the answer: an oracle segmenter and a cheap embedder.

For tests and benchmarks, not for production. Both follow the ``Segmenter`` / ``Embedder``
protocols of :mod:`bmseg.models.base`, so SEGMENT runs them through exactly the code path of
the production models: what comes out can be compared with the planted truth of a synthetic
slide (``bmseg synth``), cell for cell.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import pyarrow as pa

from bmseg.models.base import Detections
from bmseg.slide import Rect


class OracleSegmenter:
    """Returns the truth cells of one type drawn into each tile it is given.

    SEGMENT calls a segmenter on the batch's tiles in order, once each, so the oracle learns
    each tile's read window by walking the batch table alongside: ``windows`` are the slide
    rectangles of the tiles SEGMENT will hand it, in that order. ``truth`` is the truth table
    of :func:`bmseg.synth.write_synthetic_slide` (contours in slide px).
    """

    def __init__(self, cell_type: str, truth: pa.Table, windows: Sequence[Rect]):
        self.cell_type = cell_type
        rows = [r for r in truth.to_pylist() if r["cell_type"] == cell_type]
        self._contours = [
            np.stack([r["contour_x_px"], r["contour_y_px"]], axis=1).astype(np.int32) for r in rows
        ]
        self._windows = iter(windows)
        self.calls = 0

    def segment(self, tiles: Sequence[np.ndarray], pixel_size_um: float) -> list[Detections]:
        """One label image per tile: every truth cell reaching into its window, scores 1 to 0.5."""
        self.calls += 1
        found = []
        for tile in tiles:
            window = next(self._windows)
            assert tile.shape == (window.h, window.w, 3) and tile.dtype == np.uint8
            labels = np.zeros(tile.shape[:2], np.int32)
            count = 0
            for contour in self._contours:
                local = contour - (window.x, window.y)
                if (local.max(axis=0) < 0).any() or (
                    local.min(axis=0) >= (window.w, window.h)
                ).any():
                    continue
                count += 1
                cv2.drawContours(labels, [local.reshape(-1, 1, 2)], -1, count, thickness=-1)
            found.append(Detections(labels=labels, scores=np.linspace(1.0, 0.5, count)))
        return found


class MeanColourEmbedder:
    """A cheap embedder: the crop's mean R, G, B, then zeros (2048-d, as ResNet-50's)."""

    dim = 2048
    crop_size = 32

    def __init__(self) -> None:
        self.batches: list[int] = []

    def embed(self, crops: np.ndarray) -> np.ndarray:
        """(N, dim) float32 embeddings; records each batch's size in ``batches``."""
        assert crops.shape[1:] == (32, 32, 3) and crops.dtype == np.uint8
        self.batches.append(len(crops))
        out = np.zeros((len(crops), self.dim), np.float32)
        out[:, :3] = crops.reshape(len(crops), -1, 3).mean(axis=1)
        return out
