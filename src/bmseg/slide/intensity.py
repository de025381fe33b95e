"""The intensity range a slide's pixels are stretched from, measured once per slide by PLAN."""

from __future__ import annotations

import numpy as np

INTENSITY_PERCENTILES = (1.0, 99.5)
"""Intensity range (per channel) fluorescence is stretched from to the models' 0..255."""


def intensity_ranges(pixels: np.ndarray, where: np.ndarray | None = None) -> dict[str, list]:
    """Per channel, the :data:`INTENSITY_PERCENTILES` of ``pixels`` (H, W, C) where ``where``.

    PLAN computes it once per slide from its low-resolution read (slide.json ``intensity``),
    so every tile of a slide is shown to the models on one scale.
    """
    values = pixels.reshape(-1, pixels.shape[-1]).astype(np.float64)
    if where is not None and where.any():
        values = values[where.reshape(-1)]
    low, high = np.percentile(values, INTENSITY_PERCENTILES, axis=0)
    return {"low": [float(v) for v in low], "high": [float(v) for v in high]}
