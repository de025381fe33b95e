"""Brightfield or fluorescence: decided from the channels' metadata, else from the image.

The channels' contrast method, illumination type and acquisition mode (CZI elements, OME
attributes) decide first; a file whose metadata is silent is decided from a small read of its
largest scene (:func:`modality_from_image`), and where that is not clear, by its pixel type.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from bmseg.slide.geometry import Rect

if TYPE_CHECKING:
    from bmseg.slide.base import Slide

MODALITY_PROBE_SIDE = 256  # px, longer side of the read that decides modality from the image
IMAGE_TAIL_SHARE = 0.15  # a tissue tail spans at least 15 % of the background's brightness

# ZEN / OME contrast methods, illumination types and acquisition modes, lower-cased, by the
# background they image on: bright (brightfield) or dark (fluorescence).
_BRIGHT_CONTRAST = {
    "brightfield",
    "phase",
    "dic",
    "polarizedlight",
    "hoffmanmodulation",
    "obliqueillumination",
}
_DARK_CONTRAST = {"fluorescence", "darkfield"}
_DARK_ILLUMINATION = {"epifluorescence", "fluorescence", "nonlinear"}
_DARK_ACQUISITION = {
    "laserscanningconfocalmicroscopy",
    "spinningdiskconfocal",
    "slitscanconfocal",
    "multiphotonmicroscopy",
    "totalinternalreflection",
    "tirf",
    "spim",
    "lightsheet",
    "airyscan",
    "structuredillumination",
    "fluorescencelifetime",
    "spectralimaging",
}


def modality_from_channel_metadata(channels: list[dict[str, str]]) -> tuple[str, str] | None:
    """``(modality, reason)`` from per-channel ``ContrastMethod``, ``IlluminationType`` and
    ``AcquisitionMode`` (CZI elements or OME attributes), or None when they are silent.

    A channel's contrast method decides; where it is absent or ``Other``, its illumination
    (transmitted light: brightfield), then its acquisition mode (confocal, light sheet...:
    fluorescence). Any fluorescence channel makes the slide fluorescence (a transmitted-light
    channel beside it is auxiliary); else any brightfield channel makes it brightfield.
    """
    verdicts: dict[str, str] = {}
    for channel in channels:
        contrast = channel.get("ContrastMethod", "").lower()
        illumination = channel.get("IlluminationType", "").lower()
        acquisition = channel.get("AcquisitionMode", "").lower()
        label = f"channel {channel.get('name', '?')!r}"
        if contrast in _DARK_CONTRAST:
            verdict = ("fluorescence", f"{label}: ContrastMethod {channel['ContrastMethod']}")
        elif contrast in _BRIGHT_CONTRAST:
            verdict = ("brightfield", f"{label}: ContrastMethod {channel['ContrastMethod']}")
        elif illumination == "transmitted":
            verdict = ("brightfield", f"{label}: IlluminationType Transmitted")
        elif illumination in _DARK_ILLUMINATION:
            verdict = ("fluorescence", f"{label}: IlluminationType {channel['IlluminationType']}")
        elif acquisition in _DARK_ACQUISITION:
            verdict = ("fluorescence", f"{label}: AcquisitionMode {channel['AcquisitionMode']}")
        elif acquisition == "brightfield":
            verdict = ("brightfield", f"{label}: AcquisitionMode BrightField")
        else:
            continue
        verdicts.setdefault(verdict[0], verdict[1])
    for modality in ("fluorescence", "brightfield"):
        if modality in verdicts:
            return modality, verdicts[modality]
    return None


def modality_from_image(slide: Slide) -> tuple[str, str]:
    """``(modality, source)`` from a small read of the largest scene (its middle half, where
    a section lies; files without a pyramid decode those subblocks): a bright background with
    a dark tail of tissue is brightfield, a dark background with a bright tail fluorescence.

    Compares the spread of the acquired pixels' brightness (mean over channels) below and
    above its median; when neither side is clearly longer (1.5 times the other and
    ``IMAGE_TAIL_SHARE`` of the median: not so on a blank or flat frame), the pixel type
    decides (RGB: brightfield).
    """
    scene = max(slide.scenes, key=lambda r: r.w * r.h)
    # the middle half of its rows: glass and tissue both show, half the subblocks are read
    band = Rect(scene.x, scene.y + scene.h // 4, scene.w, max(1, scene.h // 2))
    zoom = min(1.0, MODALITY_PROBE_SIDE / max(band.w, band.h))
    thumbnail = slide.read(band.x, band.y, band.w, band.h, zoom)
    pixels = thumbnail.reshape(-1, thumbnail.shape[2])
    if slide._fill_marks_gaps:  # leave out what was never acquired
        pixels = pixels[~np.all(pixels == slide.background.astype(pixels.dtype), axis=1)]
    brightness = pixels.astype(np.float64).mean(axis=1)
    if brightness.size:
        low, median, high = np.percentile(brightness, (0.5, 50, 99.5))
        dark_tail, bright_tail = median - low, high - median
        clear = IMAGE_TAIL_SHARE * max(median, 1.0)  # a tail shorter than this is noise
        if dark_tail > max(1.5 * bright_tail, clear):
            return "brightfield", "image"
        if bright_tail > max(1.5 * dark_tail, clear):
            return "fluorescence", "image"
    return ("brightfield" if slide._rgb else "fluorescence"), "pixel type"
