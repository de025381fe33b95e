"""Small single frames for tests of odd acquisitions: tissue blobs on glass, empty fields."""

from __future__ import annotations

import cv2
import numpy as np

from bmseg.synthetic import smooth_noise


def section_image(
    height: int, width: int, seed: int, *, background: float, tissue: float, channels: int = 1
) -> np.ndarray:
    """A small field with a few blobs of "tissue" on an even background, uint8 (h, w[, 3]).

    ``background`` and ``tissue`` are grey levels: a bright background with darker tissue is a
    brightfield section, a dark one with brighter tissue a fluorescence (or dark-field) image.
    With ``channels=3`` the tissue is tinted (more red than blue), as stained tissue is.
    """
    rng = np.random.default_rng(seed)
    coarse = max(1, max(height, width) // 256)  # blobs drawn on a coarse grid, then enlarged
    small = (max(2, -(-height // coarse)), max(2, -(-width // coarse)))
    blobs = smooth_noise(small, max(small) / 12, rng)
    blobs = cv2.resize(blobs, (width, height), interpolation=cv2.INTER_LINEAR)
    inside = blobs > np.quantile(blobs[:: max(1, coarse), :: max(1, coarse)], 0.7)  # 30 % tissue
    image = np.where(inside, tissue, background).astype(np.float32)
    image += rng.normal(0, 2, image.shape)
    if channels == 3:
        tint = np.array([1.0, 0.8, 0.9], np.float32)
        image = np.where(inside[..., None], image[..., None] * tint, image[..., None] * [1, 1, 1])
    return np.clip(image, 0, 255).astype(np.uint8)


def blank_frame(
    height: int, width: int, seed: int, *, level: float, gradient: float, noise: float
) -> np.ndarray:
    """An empty field, uint8 (h, w, 3): ``level`` grey with an illumination fall-off of
    ``gradient`` grey levels from one corner to the opposite one (the vignetting of a
    widefield camera, a tilted lamp) and Gaussian camera noise of ``noise`` levels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = (xx / max(width - 1, 1) + yy / max(height - 1, 1)) / 2
    radial = ((xx / width - 0.5) ** 2 + (yy / height - 0.5) ** 2) * 2
    image = level - gradient * (0.7 * ramp + 0.3 * radial)
    image = image[..., None] + rng.normal(0, noise, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)
