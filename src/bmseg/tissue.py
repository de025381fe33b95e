"""Tissue detection on a low-resolution read: one method for brightfield and fluorescence.

The thumbnail becomes one *contrast* image, the log ratio of each pixel to the slide's empty
background, so that both modalities read "more tissue = larger value":

* brightfield: optical density, mean over R, G, B of ``ln(I0 / I)``, where ``I0`` is the
  background white (99th percentile of acquired pixels per channel);
* fluorescence: the largest over channels of ``ln((I + 1) / (B + 1))``, where ``B`` is the dark
  background (1st percentile of acquired pixels per channel).

Pixels equal to the reader's fill value in every channel were never acquired and take no part.
The references are pooled over a slide's scenes. The contrast is smoothed (Gaussian, 1.5
thumbnail px) and flat-fielded (a quadratic surface fitted to each scene's background is
subtracted, so that uneven illumination does not spread the glass into a ramp). Otsu's
threshold is taken on the histogram of its logarithm, pooled over the scenes: on a log scale
the faint tissue mode stays apart from the background mode even when a few very dark (or
bright) cells stretch the linear range, which pulls a linear Otsu cut into the tissue. A
slide without tissue has one mode, which Otsu still cuts in two; such a cut is rejected when
the two classes lie fewer than ``MIN_SEPARATION`` pooled standard deviations apart (log
scale), their mean contrasts differ by less than ``MIN_CONTRAST``, or by less than
``NOISE_SIGMAS`` times the glass's own noise. Specks smaller than ``MIN_COMPONENT_UM2`` are
dropped from the mask (dust), and pale holes inside tissue smaller than ``MAX_HOLE_UM2`` are
filled in.

A *calibration* (JSON, made by ``bmseg calibrate-tissue``) fixes the threshold for a cohort:
Otsu on the pooled contrast histograms of several slides of one modality, then used for each
slide instead of its own threshold, so that all slides are cut at the same contrast.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np

from bmseg.errors import BmsegError

log = logging.getLogger(__name__)

SMOOTH_SIGMA_PX = 1.5  # thumbnail pixels
MIN_SEPARATION = 3.0  # Otsu classes' log-mean difference over their pooled standard deviation
MIN_CONTRAST = 0.05  # tissue must differ from background by 5 % on average (log ratio)
LOG_RANGE = (float(np.log(0.005)), float(np.log(16.0)))  # contrast range of the histogram
MIN_COMPONENT_UM2 = 200.0  # smaller tissue specks are dust
MAX_HOLE_UM2 = 2000.0  # smaller pale holes inside tissue count as tissue
HISTOGRAM_BINS = 512  # log-spaced bins, 1.6 % wide
NOISE_SIGMAS = 4.0  # tissue must stand above the glass by this many of its noise SDs
FLAT_FIELD_MIN_PIXELS = 200  # fewer background pixels than this: no flat-field fit
FLAT_FIELD_MIN_SHARE = 0.05  # nor when the background is under 5 % of the scene
FLAT_FIELD_SAMPLE = 50_000  # background pixels the surface is fitted on, at most
NOISE_STRIDE = 2  # the glass's noise is measured on every 2nd pixel of every 2nd row
CALIBRATION_VERSION = 1


@dataclass(frozen=True)
class TissueMask:
    """A tissue mask on the thumbnail grid and how it was made."""

    mask: np.ndarray  # bool, thumbnail shape
    threshold: float  # contrast threshold used (nan when no tissue was found)
    method: str  # "otsu", "calibration" or "none"


def acquired_pixels(thumbnail: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Bool (h, w): pixels that differ from the reader's fill value in some channel."""
    return ~np.all(thumbnail == np.asarray(background).astype(thumbnail.dtype), axis=2)


def background_levels(
    thumbnails: list[np.ndarray], modality: str, background: np.ndarray
) -> np.ndarray:
    """Per channel, the empty-glass reference of all scenes together: the 99th percentile of
    the acquired pixels (brightfield white) or their 1st (fluorescence dark); NaN if none.

    Pooled over scenes, so that a small scene lying wholly in tissue is compared with the
    glass that the other scenes show.
    """
    channels = thumbnails[0].shape[2]
    pooled = [
        np.concatenate([t[:, :, c][acquired_pixels(t, background)] for t in thumbnails])
        for c in range(channels)
    ]
    q = 99 if modality == "brightfield" else 1
    return np.array([_percentile(v, q) if v.size else np.nan for v in pooled])


def contrast_image(
    thumbnail: np.ndarray,
    modality: str,
    background: np.ndarray,
    levels: np.ndarray | None = None,
) -> np.ndarray:
    """The log-ratio-to-background contrast of a (h, w, C) thumbnail; NaN where not acquired.

    ``levels`` are the per-channel references (:func:`background_levels`; by default those
    of this thumbnail alone). Pixels brighter than white (darker than the dark reference) get
    a negative contrast: the spread of the background around zero is what the no-tissue test
    measures its noise on.
    """
    acquired = acquired_pixels(thumbnail, background)
    if levels is None:
        levels = background_levels([thumbnail], modality, background)
    if not acquired.any() or not np.isfinite(levels).all():
        return np.full(thumbnail.shape[:2], np.nan, np.float32)
    brightfield = modality == "brightfield"
    planes = []
    for index in range(thumbnail.shape[2]):
        channel = thumbnail[:, :, index]
        level = float(levels[index])
        if brightfield:
            ratio = lambda v, level=level: np.log(max(level, 1) / np.maximum(v, 1))  # noqa: E731
        else:
            ratio = lambda v, level=level: np.log((v + 1) / (level + 1))  # noqa: E731
        planes.append(_per_value(channel, ratio))
    stack = np.stack(planes, axis=2)
    contrast = (stack.mean(axis=2) if brightfield else stack.max(axis=2)).astype(np.float32)
    contrast[~acquired] = np.nan
    return contrast


def _percentile(values: np.ndarray, q: float) -> float:
    """Percentile of a 1-D array: exact by counting for integer pixels, else on a subsample."""
    if np.issubdtype(values.dtype, np.integer):
        counts = np.bincount(values.ravel())
        rank = np.searchsorted(np.cumsum(counts), q / 100 * values.size)
        return float(min(rank, counts.size - 1))
    return float(np.percentile(values[:: max(1, values.size // 1_000_000)], q))


def _per_value(channel: np.ndarray, function) -> np.ndarray:
    """``function`` of every pixel, through a lookup table for 8- and 16-bit pixels."""
    if channel.dtype in (np.uint8, np.uint16):
        table = function(np.arange(np.iinfo(channel.dtype).max + 1, dtype=np.float32))
        return table.astype(np.float32)[channel]
    return function(channel.astype(np.float32)).astype(np.float32)


def scene_contrasts(
    thumbnails: list[np.ndarray], modality: str, background: np.ndarray
) -> list[np.ndarray]:
    """The contrast images that thresholds are computed on and applied to, one per scene.

    Contrast against the scenes' pooled glass reference, smoothed, then flat-fielded: a
    quadratic surface fitted to each scene's background (the pixels below a first, pooled Otsu
    cut) is subtracted, so that uneven illumination (vignetting, a tilted lamp) leaves the
    glass at zero contrast everywhere instead of spreading it into a ramp that Otsu would cut.
    """
    levels = background_levels(thumbnails, modality, background)
    contrasts = [_smooth(contrast_image(t, modality, background, levels)) for t in thumbnails]
    first = otsu_split(sum(contrast_histogram(c) for c in contrasts))
    if not np.isfinite(first.threshold):
        return contrasts
    return [_flatten(c, first.threshold) for c in contrasts]


def _flatten(contrast: np.ndarray, threshold: float) -> np.ndarray:
    """``contrast`` minus a quadratic surface fitted to its pixels at or below ``threshold``,
    plus the surface's median there: the glass's level stays, its slope goes.

    Fitted twice, the second time without the pixels whose residual exceeds 3 robust standard
    deviations (tissue edges below the cut); left as it is where too little background shows
    to fit a surface to (a scene lying wholly in tissue).
    """
    finite = np.isfinite(contrast)
    with np.errstate(invalid="ignore"):
        glass = finite & (contrast <= threshold)
    if glass.sum() < max(FLAT_FIELD_MIN_PIXELS, FLAT_FIELD_MIN_SHARE * finite.sum()):
        return contrast
    height, width = contrast.shape
    rows, cols = np.nonzero(glass)
    step = max(1, rows.size // FLAT_FIELD_SAMPLE)
    rows, cols = rows[::step], cols[::step]

    def design(r: np.ndarray, c: np.ndarray) -> np.ndarray:
        y = 2 * r / max(height - 1, 1) - 1
        x = 2 * c / max(width - 1, 1) - 1
        return np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=1)

    a, values = design(rows, cols), contrast[rows, cols].astype(np.float64)
    keep = np.ones(values.size, bool)
    for _ in range(2):
        coefficients, *_ = np.linalg.lstsq(a[keep], values[keep], rcond=None)
        residual = values - a @ coefficients
        spread = 1.4826 * np.median(np.abs(residual[keep] - np.median(residual[keep])))
        keep = np.abs(residual) <= 3 * max(spread, 1e-6)
    c0, cx, cy, cxx, cxy, cyy = coefficients.astype(np.float32)
    x = (2 * np.arange(width, dtype=np.float32) / max(width - 1, 1) - 1)[None, :]
    y = (2 * np.arange(height, dtype=np.float32) / max(height - 1, 1) - 1)[:, None]
    surface = c0 + cx * x + cy * y + cxx * x * x + cxy * x * y + cyy * y * y  # broadcast (h, w)
    level = float(np.median(a @ coefficients))  # the glass keeps its (positive) contrast level
    return (contrast - surface + np.float32(level)).astype(np.float32)


def background_noise(contrasts: list[np.ndarray], threshold: float) -> float:
    """Robust standard deviation of the glass's contrast (the pixels at or below
    ``threshold``), from the side away from tissue: ``1.4826 × median(m - c)`` over the glass
    pixels ``c`` below the glass's median ``m`` (on a quarter of the pixels: the smoothed
    contrast changes little from one pixel to the next); 0 when it cannot be measured."""
    if not np.isfinite(threshold):
        return 0.0
    values = [c[::NOISE_STRIDE, ::NOISE_STRIDE] for c in contrasts]
    values = [v[np.isfinite(v)] for v in values]
    glass = np.concatenate([v[v <= threshold] for v in values])
    if glass.size == 0:
        return 0.0
    middle = np.median(glass)
    below = middle - glass[glass < middle]
    return float(1.4826 * np.median(below)) if below.size else 0.0


def _smooth(contrast: np.ndarray) -> np.ndarray:
    """Gaussian smoothing that leaves un-acquired pixels (NaN) out of their neighbours' means."""
    valid = np.isfinite(contrast).astype(np.float32)
    filled = np.where(valid > 0, contrast, 0).astype(np.float32)
    blurred = cv2.GaussianBlur(filled, (0, 0), SMOOTH_SIGMA_PX)
    weight = cv2.GaussianBlur(valid, (0, 0), SMOOTH_SIGMA_PX)
    with np.errstate(invalid="ignore", divide="ignore"):
        smooth = blurred / weight
    smooth[valid == 0] = np.nan
    return smooth


def contrast_histogram(contrast: np.ndarray) -> np.ndarray:
    """Counts of the finite contrast values over :data:`LOG_RANGE` (log scale, clipped)."""
    values = contrast[np.isfinite(contrast)]
    logs = np.log(np.clip(values, *np.exp(LOG_RANGE)))
    counts, _ = np.histogram(logs, bins=HISTOGRAM_BINS, range=LOG_RANGE)
    return counts


@dataclass(frozen=True)
class Split:
    """Otsu's split of a contrast histogram into background and tissue."""

    threshold: float  # contrast, linear
    separation: float  # class means' difference over pooled standard deviation, log scale
    difference: float  # tissue class mean minus background class mean, linear contrast
    noise: float = 0.0  # robust SD of the glass's contrast (0: not measured)

    @property
    def has_tissue(self) -> bool:
        """Whether the split separates two real classes rather than cutting noise in two:
        classes far apart on the log scale, tissue darker (brighter) than the glass by
        ``MIN_CONTRAST`` and by ``NOISE_SIGMAS`` times the glass's noise."""
        return (
            self.separation >= MIN_SEPARATION
            and self.difference >= MIN_CONTRAST
            and self.difference >= NOISE_SIGMAS * self.noise
        )


def otsu_split(counts: np.ndarray) -> Split:
    """Otsu's threshold of a :func:`contrast_histogram` (or a pooled one), with its quality."""
    counts = counts.astype(np.float64)
    edges = np.linspace(*LOG_RANGE, counts.size + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    total = counts.sum()
    if total == 0:
        return Split(float("nan"), 0.0, 0.0)
    weight0 = np.cumsum(counts)
    weight1 = total - weight0
    sum0 = np.cumsum(counts * centres)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean0 = sum0 / weight0
        mean1 = (sum0[-1] - sum0) / weight1
        between = weight0 * weight1 * (mean0 - mean1) ** 2
    between[~np.isfinite(between)] = -1
    cut = int(np.argmax(between))
    if between[cut] <= 0:
        return Split(float("nan"), 0.0, 0.0)
    low, high = slice(0, cut + 1), slice(cut + 1, None)
    var0 = np.sum(counts[low] * (centres[low] - mean0[cut]) ** 2) / weight0[cut]
    var1 = np.sum(counts[high] * (centres[high] - mean1[cut]) ** 2) / weight1[cut]
    pooled = np.sqrt((var0 + var1) / 2)
    separation = float((mean1[cut] - mean0[cut]) / pooled) if pooled > 0 else float("inf")
    linear = np.exp(centres)
    difference = float(
        np.sum(counts[high] * linear[high]) / weight1[cut]
        - np.sum(counts[low] * linear[low]) / weight0[cut]
    )
    return Split(float(np.exp(edges[cut + 1])), separation, difference)


def detect_scene_tissue(
    contrasts: list[np.ndarray],
    um_per_thumbnail_px: list[float],
    calibration: dict | None = None,
) -> list[TissueMask]:
    """Tissue masks of a slide's scenes (:func:`scene_contrasts`), cut at one threshold:
    Otsu's on their pooled histogram, or the ``calibration``'s."""
    if calibration is not None:
        threshold, method = float(calibration["threshold"]), "calibration"
    else:
        split = slide_split(contrasts)
        threshold, method = split.threshold, "otsu"
        if not split.has_tissue:
            log.debug("no tissue: %s", split)
            return [TissueMask(np.zeros(c.shape, bool), float("nan"), "none") for c in contrasts]
    masks = []
    for contrast, um_per_px in zip(contrasts, um_per_thumbnail_px, strict=True):
        with np.errstate(invalid="ignore"):
            mask = (contrast > threshold).astype(np.uint8)
        pixel_um2 = um_per_px**2
        mask = _drop_small_components(mask, MIN_COMPONENT_UM2 / pixel_um2)
        masks.append(TissueMask(_fill_small_holes(mask, pixel_um2), threshold, method))
    if method == "otsu" and not any(m.mask.any() for m in masks):  # only specks were above
        return [TissueMask(m.mask, float("nan"), "none") for m in masks]
    return masks


def slide_split(contrasts: list[np.ndarray]) -> Split:
    """Otsu's split of the scenes' pooled contrast, with the glass's noise measured on them."""
    split = otsu_split(sum(contrast_histogram(c) for c in contrasts))
    return replace(split, noise=background_noise(contrasts, split.threshold))


def _drop_small_components(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    """``mask`` without its 8-connected components smaller than ``min_pixels``."""
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_pixels
    keep[0] = False
    return keep[labels]


def _fill_small_holes(mask: np.ndarray, pixel_um2: float) -> np.ndarray:
    """``mask`` with enclosed background holes under ``MAX_HOLE_UM2`` filled in."""
    holes = (~mask).astype(np.uint8)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(holes, connectivity=4)
    left, top = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
    right = left + stats[:, cv2.CC_STAT_WIDTH]
    bottom = top + stats[:, cv2.CC_STAT_HEIGHT]
    enclosed = (left > 0) & (top > 0) & (right < mask.shape[1]) & (bottom < mask.shape[0])
    fill = enclosed & (stats[:, cv2.CC_STAT_AREA] * pixel_um2 < MAX_HOLE_UM2)
    fill[0] = False
    return mask | fill[labels]


def load_calibration(path: str | Path, modality: str) -> dict:
    """Read a calibration file and check it is meant for ``modality``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        threshold = float(data["threshold"])
        calibrated_modality = data["modality"]
    except FileNotFoundError:
        raise BmsegError(
            f"--calibration {path}: no such file; make it with bmseg calibrate-tissue"
        ) from None
    except (ValueError, KeyError, TypeError) as error:
        raise BmsegError(
            f"--calibration {path}: not a tissue calibration ({error}); "
            "make it with bmseg calibrate-tissue"
        ) from None
    if calibrated_modality != modality:
        raise BmsegError(
            f"--calibration {path}: made for {calibrated_modality} slides, this one is "
            f"{modality}; calibrate each modality separately"
        )
    if not threshold > 0:
        raise BmsegError(f"--calibration {path}: threshold {threshold} must be positive")
    return data


def calibrate(contrasts: list[list[np.ndarray]], modality: str, sources: list[str]) -> dict:
    """One Otsu threshold for several slides' scene contrasts, pooled (each slide weighs
    alike)."""
    pooled = np.zeros(HISTOGRAM_BINS)
    for scenes in contrasts:
        counts = sum(contrast_histogram(c) for c in scenes).astype(np.float64)
        pooled += counts / max(counts.sum(), 1)
    split = otsu_split(pooled)
    noise = max(background_noise(scenes, split.threshold) for scenes in contrasts)
    split = replace(split, noise=noise)
    if not split.has_tissue:
        raise BmsegError(
            "calibrate-tissue: the slides show no clear tissue/background split "
            f"(separation {split.separation:.2f}); calibrate on slides that hold tissue"
        )
    return {
        "version": CALIBRATION_VERSION,
        "modality": modality,
        "threshold": split.threshold,
        "separation": split.separation,
        "slides": sources,
    }
