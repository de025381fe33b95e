"""Per-cell measurements of one tile, computed for all of its cells at once.

Everything here works on a tile's label image (0 background, cells ``1..N``) in tile-local
pixels and returns slide coordinates, so SEGMENT can write rows as they come. Areas, centroids,
the inertia ellipse and intensities come from ``np.bincount`` over the tile's pixels,
percentiles from one sort per channel, bboxes from ``scipy.ndimage.find_objects``, embedding
crops from one ``torchvision.ops.roi_align`` call on a GPU. Only the contour (and the perimeter
and convex hull taken from it), the JPEG encoding and, on the CPU, the crop resizing visit
cells one by one, in OpenCV.
Every column is documented in docs/cells.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
from scipy import ndimage
from torchvision.ops import roi_align

from bmseg.contract import INTENSITY_PERCENTILES, INTENSITY_STATS, intensity_columns

CONTOUR_TOLERANCE_PX = 1.0
"""Douglas-Peucker tolerance of the simplified contour, in slide pixels."""
CROP_PADDING = 0.25
"""Context around a cell: the crop square's side is the bbox's longer side times 1 + 2 * this."""
CROP_MIN_SIDE_PX = 32
GALLERY_JPEG_QUALITY = 85


def cell_centroids(labels: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean (x, y) pixel index of each label ``1..count``; NaN for a label with no pixels."""
    rows, cols = np.nonzero(labels)
    values = labels[rows, cols]
    pixels = np.bincount(values, minlength=count + 1)[1:].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = np.bincount(values, weights=cols, minlength=count + 1)[1:] / pixels
        cy = np.bincount(values, weights=rows, minlength=count + 1)[1:] / pixels
    return cx, cy


def _grouped_percentiles(
    values: np.ndarray, groups: np.ndarray, counts: np.ndarray, percentiles: Sequence[float]
) -> np.ndarray:
    """Linear-interpolated percentiles of ``values`` per group (groups ``1..len(counts)``).

    One sort of the (group, value) pairs gives every group's values in order; the percentile
    positions are then plain index arithmetic. Returns (len(percentiles), n_groups).
    """
    integer = np.issubdtype(values.dtype, np.integer)
    if integer and values.size and values.min() >= 0 and values.max() < 2**32:
        key = (groups.astype(np.int64) << 32) | values.astype(np.int64)
        ordered = (np.sort(key) & 0xFFFFFFFF).astype(np.float64)
    else:
        ordered = values[np.lexsort((values, groups))].astype(np.float64)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    result = np.full((len(percentiles), counts.size), np.nan)
    present = counts > 0
    for row, q in enumerate(percentiles):
        position = starts[present] + (counts[present] - 1) * (q / 100.0)
        low = np.floor(position).astype(np.int64)
        high = np.minimum(low + 1, starts[present] + counts[present] - 1)
        frac = position - low
        result[row, present] = ordered[low] * (1 - frac) + ordered[high] * frac
    return result


def intensity_stats(
    labels: np.ndarray, channels: np.ndarray, channel_names: Sequence[str], count: int
) -> dict[str, np.ndarray]:
    """Per-cell mean, std and percentiles of every channel of ``channels`` (H, W, C).

    Intensities are the slide's own values (not the RGB shown to the models).
    """
    mask = labels > 0
    groups = labels[mask]
    counts = np.bincount(groups, minlength=count + 1)[1:]
    safe_counts = np.maximum(counts, 1)
    columns: dict[str, np.ndarray] = {}
    for index, name in enumerate(channel_names):
        values = channels[..., index][mask]
        as_float = values.astype(np.float64)
        total = np.bincount(groups, weights=as_float, minlength=count + 1)[1:]
        squares = np.bincount(groups, weights=as_float * as_float, minlength=count + 1)[1:]
        mean = total / safe_counts
        std = np.sqrt(np.maximum(squares / safe_counts - mean * mean, 0.0))
        percentiles = _grouped_percentiles(values, groups, counts, INTENSITY_PERCENTILES)
        stats = {"mean": mean, "std": std}
        stats.update({f"p{q}": percentiles[row] for row, q in enumerate(INTENSITY_PERCENTILES)})
        for column, stat in zip(intensity_columns([name]), INTENSITY_STATS, strict=True):
            columns[column] = stats[stat].astype(np.float32)
    return columns


def _bboxes(labels: np.ndarray, count: int) -> np.ndarray:
    """(count, 4) tile-local ``x, y, w, h`` of labels ``1..count`` (all present)."""
    slices = ndimage.find_objects(labels, max_label=count)
    if any(found is None for found in slices):
        raise ValueError("labels must be consecutive 1..count, each present")
    bounds = np.array(
        [(cols.start, rows.start, cols.stop, rows.stop) for rows, cols in slices], dtype=np.int64
    ).reshape(-1, 4)
    return np.stack(
        [bounds[:, 0], bounds[:, 1], bounds[:, 2] - bounds[:, 0], bounds[:, 3] - bounds[:, 1]],
        axis=1,
    )


def _second_moments(labels: np.ndarray, count: int) -> dict[str, np.ndarray]:
    """Area, centroid and the inertia ellipse of each label, from pixel sums (np.bincount).

    Same definitions as scikit-image's regionprops: the axes are 4·sqrt of the eigenvalues of
    the inertia tensor ``[[mu02, -mu11], [-mu11, mu20]] / mu00``.
    """
    rows, cols = np.nonzero(labels)
    groups = labels[rows, cols]
    rows, cols = rows.astype(np.float64), cols.astype(np.float64)

    def total(weights: np.ndarray | None) -> np.ndarray:
        return np.bincount(groups, weights=weights, minlength=count + 1)[1:]

    area = total(None).astype(np.float64)
    cx, cy = total(cols) / area, total(rows) / area
    # Central moments per pixel, relative to the own centroid: no cancellation at large x, y.
    dx, dy = cols - cx[groups - 1], rows - cy[groups - 1]
    a, d, b = total(dx * dx) / area, total(dy * dy) / area, -total(dx * dy) / area
    half_sum, root = (a + d) / 2, np.sqrt(((a - d) / 2) ** 2 + b * b)
    major, minor = half_sum + root, np.maximum(half_sum - root, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        eccentricity = np.where(major > 0, np.sqrt(np.maximum(1 - minor / major, 0.0)), 0.0)
    return {
        "area": area,
        "cx": cx,
        "cy": cy,
        "major": 4 * np.sqrt(major),
        "minor": 4 * np.sqrt(minor),
        "eccentricity": eccentricity,
    }


def _outlines(
    labels: np.ndarray, bboxes: np.ndarray
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Perimeter (px), solidity and the simplified outer contour (tile px) of each label.

    The contour is OpenCV's outer boundary of the label's largest part through its boundary
    pixels' centres; the perimeter is its length, the solidity the ratio of its area to its
    convex hull's. One small ``findContours`` per cell on the cell's bbox.
    """
    perimeter = np.zeros(len(bboxes))
    solidity = np.ones(len(bboxes))
    contours: list[np.ndarray] = []
    for index, (x, y, w, h) in enumerate(bboxes):
        window = np.pad(labels[y : y + h, x : x + w] == index + 1, 1).view(np.uint8)
        found, _ = cv2.findContours(window, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        outline = max(found, key=len)
        perimeter[index] = cv2.arcLength(outline, True)
        hull_area = cv2.contourArea(cv2.convexHull(outline))
        if hull_area > 0:
            solidity[index] = cv2.contourArea(outline) / hull_area
        points = cv2.approxPolyDP(outline, CONTOUR_TOLERANCE_PX, True).reshape(-1, 2)
        contours.append(points + np.array([x - 1, y - 1]))
    return perimeter, solidity, contours


def shape_features(
    labels: np.ndarray, count: int, pixel_size_um: float, origin_x: int, origin_y: int
) -> dict[str, object]:
    """Centroid, bbox, area, shape descriptors and contour of labels ``1..count``.

    ``labels`` must hold every label ``1..count``; pixel ``(0, 0)`` is slide ``(origin_x,
    origin_y)``. Positions come back in slide px, lengths in µm (docs/cells.md).
    """
    bboxes = _bboxes(labels, count)
    moments = _second_moments(labels, count)
    perimeter_px, solidity, contours = _outlines(labels, bboxes)
    area_px = moments["area"]
    with np.errstate(invalid="ignore", divide="ignore"):
        circularity = np.where(perimeter_px > 0, 4 * np.pi * area_px / perimeter_px**2, np.nan)
    centroid_x = origin_x + moments["cx"]
    centroid_y = origin_y + moments["cy"]
    return {
        "centroid_x_px": centroid_x,
        "centroid_y_px": centroid_y,
        "centroid_x_um": centroid_x * pixel_size_um,
        "centroid_y_um": centroid_y * pixel_size_um,
        "bbox_x_px": origin_x + bboxes[:, 0],
        "bbox_y_px": origin_y + bboxes[:, 1],
        "bbox_w_px": bboxes[:, 2],
        "bbox_h_px": bboxes[:, 3],
        "area_px": area_px,
        "area_um2": area_px * pixel_size_um**2,
        "perimeter_um": perimeter_px * pixel_size_um,
        "equivalent_diameter_um": np.sqrt(4 * area_px / np.pi) * pixel_size_um,
        "major_axis_um": moments["major"] * pixel_size_um,
        "minor_axis_um": moments["minor"] * pixel_size_um,
        "eccentricity": moments["eccentricity"],
        "solidity": solidity,
        "circularity": circularity,
        "contour_x_px": [(c[:, 0] + origin_x).astype(np.float32) for c in contours],
        "contour_y_px": [(c[:, 1] + origin_y).astype(np.float32) for c in contours],
    }


def crop_squares(bboxes: np.ndarray) -> np.ndarray:
    """Square crop windows (N, 3) ``x, y, side`` centred on each (N, 4) ``x, y, w, h`` bbox."""
    bboxes = np.asarray(bboxes, dtype=np.float64).reshape(-1, 4)
    side = np.maximum(
        np.ceil(np.maximum(bboxes[:, 2], bboxes[:, 3]) * (1 + 2 * CROP_PADDING)), CROP_MIN_SIDE_PX
    )
    x = np.floor(bboxes[:, 0] + bboxes[:, 2] / 2 - side / 2)
    y = np.floor(bboxes[:, 1] + bboxes[:, 3] / 2 - side / 2)
    return np.stack([x, y, side], axis=1).astype(np.int64)


def _square_region(rgb: np.ndarray, x: int, y: int, side: int) -> np.ndarray:
    """The ``side``² square at tile ``(x, y)``: a view inside the tile, else black-padded."""
    height, width = rgb.shape[:2]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + side, width), min(y + side, height)
    if (x0, y0, x1, y1) == (x, y, x + side, y + side):
        return rgb[y:y1, x:x1]
    region = np.zeros((side, side, rgb.shape[2]), rgb.dtype)
    if x1 > x0 and y1 > y0:
        region[y0 - y : y1 - y, x0 - x : x1 - x] = rgb[y0:y1, x0:x1]
    return region


class CropSampler:
    """Cuts square windows out of one RGB tile and resamples them to one size.

    On a GPU all windows of a call go through one ``torchvision.ops.roi_align`` (adaptive
    sampling averages every source pixel under an output pixel); the tile is uploaded once.
    On the CPU that kernel costs ~9 ms per 224 px crop, so there each window is resized by
    OpenCV instead (area averaging when shrinking, bilinear when enlarging; ~0.05 ms). Outside
    the tile is black either way.
    """

    def __init__(self, rgb: np.ndarray, device: str = "cpu") -> None:
        self.rgb = rgb
        self.device = str(device)
        self._image = None

    def sample(self, squares: np.ndarray, size: int) -> np.ndarray:
        """(N, size, size, 3) uint8 crops of the (N, 3) ``x, y, side`` tile-local squares."""
        if len(squares) == 0:
            return np.zeros((0, size, size, 3), np.uint8)
        if self.device.startswith("cpu"):
            out = np.empty((len(squares), size, size, 3), np.uint8)
            for index, (x, y, side) in enumerate(squares):
                method = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
                region = _square_region(self.rgb, x, y, side)
                out[index] = cv2.resize(region, (size, size), interpolation=method)
            return out
        return self._roi_align(squares, size)

    def _roi_align(self, squares: np.ndarray, size: int) -> np.ndarray:
        with torch.inference_mode():
            if self._image is None:
                image = torch.from_numpy(np.ascontiguousarray(self.rgb)).to(self.device)
                self._image = image.permute(2, 0, 1).unsqueeze(0).float()
            boxes = torch.as_tensor(squares, dtype=torch.float32, device=self.device)
            rois = torch.cat(
                [
                    torch.zeros((len(squares), 1), device=self.device),
                    boxes[:, :2],
                    boxes[:, :2] + boxes[:, 2:3],
                ],
                dim=1,
            )
            crops = roi_align(self._image, rois, output_size=size, sampling_ratio=-1, aligned=True)
            crops = crops.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
            return crops.cpu().numpy()


def gallery_jpegs(
    rgb: np.ndarray, squares: np.ndarray, max_px: int, quality: int = GALLERY_JPEG_QUALITY
) -> tuple[list[bytes], np.ndarray]:
    """JPEG bytes of each (N, 3) ``x, y, side`` square of an RGB tile, and each JPEG's side.

    A square is kept at full resolution up to ``max_px`` and shrunk (area averaging) to
    ``max_px`` beyond, so small cells cost few bytes and large ones stay bounded; outside the
    tile is black. One slice, resize and encode per cell: the encoding is per image anyway.
    """
    params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    encoded: list[bytes] = []
    sizes = np.minimum(squares[:, 2], max_px).astype(np.int32) if len(squares) else np.zeros(0)
    for (x, y, side), size in zip(squares, sizes, strict=True):
        bgr = cv2.cvtColor(_square_region(rgb, x, y, side), cv2.COLOR_RGB2BGR)
        if size < side:
            bgr = cv2.resize(bgr, (int(size), int(size)), interpolation=cv2.INTER_AREA)
        ok, data = cv2.imencode(".jpg", bgr, params)
        if not ok:
            raise RuntimeError("OpenCV failed to encode a JPEG crop")
        encoded.append(data.tobytes())
    return encoded, sizes.astype(np.int32)
