"""The image the models see: a tile's slide pixels as 8-bit RGB.

Shared by SEGMENT (every tile it segments), the fine-tuning step and the demo models' training
(both must show the networks tiles exactly as SEGMENT does).
"""

from __future__ import annotations

import numpy as np

from bmseg.slide import intensity_ranges


def to_rgb8(
    pixels: np.ndarray,
    modality: str,
    bit_depth: int | None = None,
    ranges: dict | None = None,
) -> np.ndarray:
    """The (H, W, 3) uint8 RGB image the models see.

    Brightfield RGB is scaled from its full scale: ``2**bit_depth - 1`` when the file records
    its bit depth (12- or 14-bit scanners writing uint16), else the dtype's maximum (uint8
    passes through untouched). Fluorescence channels are stretched from the slide's
    ``ranges`` (slide.json ``intensity``: ``low``, ``high`` per channel, from PLAN's
    low-resolution read), or without them from the tile's own 1st to 99.5th percentile, to
    0..255, and mapped to R, G, B in slide order: one channel is replicated to grey, two fill
    R and G, more than three keep the first three.
    """
    if modality == "brightfield" and pixels.shape[-1] == 3:
        if pixels.dtype == np.uint8:
            return pixels
        full = 1.0 if pixels.dtype.kind == "f" else float(np.iinfo(pixels.dtype).max)
        if bit_depth and pixels.dtype.kind in "ui" and 2**bit_depth - 1 < full:
            full = float(2**bit_depth - 1)
        return np.clip(pixels.astype(np.float32) * (255.0 / full), 0, 255).round().astype(np.uint8)
    selected = pixels[..., :3].astype(np.float32)
    if ranges is None:
        ranges = intensity_ranges(selected[::4, ::4])
    count = selected.shape[-1]
    low = np.asarray(ranges["low"][:count], np.float32)
    high = np.asarray(ranges["high"][:count], np.float32)
    scale = 255.0 / np.maximum(high - low, 1e-6)
    stretched = np.clip((selected - low) * scale, 0, 255).round().astype(np.uint8)
    if stretched.shape[-1] == 1:
        return np.repeat(stretched, 3, axis=-1)
    if stretched.shape[-1] == 2:
        return np.concatenate([stretched, np.zeros_like(stretched[..., :1])], axis=-1)
    return stretched
