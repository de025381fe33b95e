"""Per-cell measurements of one tile, computed for all of its cells at once.

Everything here works on a tile's label image (0 background, cells ``1..N``) in tile-local
pixels and returns slide coordinates, so SEGMENT can write rows as they come. Shape comes from
``skimage.measure.regionprops_table``, intensities from ``np.bincount`` and one sort per
channel, crops from one ``torchvision.ops.roi_align`` call per tile. Only the contour
simplification and the JPEG encoding visit cells one by one (OpenCV has no batched form).
Every column is documented in docs/cells.md.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import cv2
import numpy as np
from skimage.measure import regionprops_table

INTENSITY_PERCENTILES = (10, 50, 90)
INTENSITY_STATS = ("mean", "std", *(f"p{q}" for q in INTENSITY_PERCENTILES))
CONTOUR_TOLERANCE_PX = 1.0
"""Douglas-Peucker tolerance of the simplified contour, in slide pixels."""
CROP_PADDING = 0.25
"""Context around a cell: the crop square's side is the bbox's longer side times 1 + 2 * this."""
CROP_MIN_SIDE_PX = 32
GALLERY_CROP_PX = 128
GALLERY_JPEG_QUALITY = 85


def channel_column_name(channel: str) -> str:
    """A channel name safe for a column name: runs of chars outside ``[A-Za-z0-9]`` as ``_``."""
    safe = re.sub(r"[^0-9A-Za-z]+", "_", channel).strip("_")
    return safe or "channel"


def intensity_columns(channel_names: Sequence[str]) -> list[str]:
    """The ``intensity_{stat}_{channel}`` column names for these channels, in table order."""
    return [
        f"intensity_{stat}_{channel_column_name(name)}"
        for name in channel_names
        for stat in INTENSITY_STATS
    ]


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
        for stat, column in stats.items():
            columns[f"intensity_{stat}_{channel_column_name(name)}"] = column.astype(np.float32)
    return columns


def shape_features(
    labels: np.ndarray, count: int, pixel_size_um: float, origin_x: int, origin_y: int
) -> dict[str, np.ndarray]:
    """Centroid, bbox (slide px), area and shape descriptors of labels ``1..count``.

    ``labels`` must hold every label ``1..count`` at least once. Lengths are in µm.
    """
    props = regionprops_table(
        labels,
        properties=(
            "label",
            "area",
            "centroid",
            "bbox",
            "perimeter",
            "equivalent_diameter_area",
            "axis_major_length",
            "axis_minor_length",
            "eccentricity",
            "solidity",
        ),
    )
    if props["label"].size != count or not np.array_equal(props["label"], np.arange(1, count + 1)):
        raise ValueError("labels must be consecutive 1..count, each present")
    area_px = props["area"].astype(np.float64)
    perimeter_px = props["perimeter"].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        circularity = np.where(perimeter_px > 0, 4 * np.pi * area_px / perimeter_px**2, np.nan)
    centroid_x = origin_x + props["centroid-1"]
    centroid_y = origin_y + props["centroid-0"]
    return {
        "centroid_x_px": centroid_x,
        "centroid_y_px": centroid_y,
        "centroid_x_um": centroid_x * pixel_size_um,
        "centroid_y_um": centroid_y * pixel_size_um,
        "bbox_x_px": (origin_x + props["bbox-1"]).astype(np.int64),
        "bbox_y_px": (origin_y + props["bbox-0"]).astype(np.int64),
        "bbox_w_px": (props["bbox-3"] - props["bbox-1"]).astype(np.int64),
        "bbox_h_px": (props["bbox-2"] - props["bbox-0"]).astype(np.int64),
        "area_px": area_px,
        "area_um2": area_px * pixel_size_um**2,
        "perimeter_um": perimeter_px * pixel_size_um,
        "equivalent_diameter_um": props["equivalent_diameter_area"] * pixel_size_um,
        "major_axis_um": props["axis_major_length"] * pixel_size_um,
        "minor_axis_um": props["axis_minor_length"] * pixel_size_um,
        "eccentricity": props["eccentricity"].astype(np.float64),
        "solidity": props["solidity"].astype(np.float64),
        "circularity": circularity,
    }


def simplified_contours(
    labels: np.ndarray, bboxes: np.ndarray, origin_x: int, origin_y: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Outer contour of each cell's largest part, simplified, in slide px (pixel centres).

    ``bboxes`` is (N, 4) tile-local ``x, y, w, h`` of labels ``1..N``. Returns per-cell x and
    y float32 arrays (closed implicitly: the last point connects to the first).
    """
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    for label, (x, y, w, h) in enumerate(bboxes, start=1):
        window = np.pad((labels[y : y + h, x : x + w] == label).astype(np.uint8), 1)
        found, _ = cv2.findContours(window, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        outline = max(found, key=cv2.contourArea)
        points = cv2.approxPolyDP(outline, CONTOUR_TOLERANCE_PX, True).reshape(-1, 2)
        xs.append((points[:, 0] + (origin_x + x - 1)).astype(np.float32))
        ys.append((points[:, 1] + (origin_y + y - 1)).astype(np.float32))
    return xs, ys


def crop_squares(bboxes: np.ndarray) -> np.ndarray:
    """Square crop windows (N, 3) ``x, y, side`` centred on each (N, 4) ``x, y, w, h`` bbox."""
    bboxes = np.asarray(bboxes, dtype=np.float64).reshape(-1, 4)
    side = np.maximum(
        np.ceil(np.maximum(bboxes[:, 2], bboxes[:, 3]) * (1 + 2 * CROP_PADDING)), CROP_MIN_SIDE_PX
    )
    x = np.floor(bboxes[:, 0] + bboxes[:, 2] / 2 - side / 2)
    y = np.floor(bboxes[:, 1] + bboxes[:, 3] / 2 - side / 2)
    return np.stack([x, y, side], axis=1).astype(np.int64)


class CropSampler:
    """Cuts square windows out of one RGB tile and resamples them, many windows per call.

    The tile goes to ``device`` once, on first use; ``torchvision.ops.roi_align`` with adaptive
    sampling averages every source pixel under an output pixel (no aliasing when shrinking)
    and fills with black outside the tile.
    """

    def __init__(self, rgb: np.ndarray, device: str = "cpu") -> None:
        self.rgb = rgb
        self.device = device
        self._image = None

    def sample(self, squares: np.ndarray, size: int) -> np.ndarray:
        """(N, size, size, 3) uint8 crops of the (N, 3) ``x, y, side`` tile-local squares."""
        import torch
        from torchvision.ops import roi_align

        if len(squares) == 0:
            return np.zeros((0, size, size, 3), np.uint8)
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


def encode_jpeg(crops: np.ndarray, quality: int = GALLERY_JPEG_QUALITY) -> list[bytes]:
    """JPEG bytes of each (N, H, W, 3) RGB uint8 crop."""
    params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    encoded = []
    for crop in crops:
        ok, data = cv2.imencode(".jpg", np.ascontiguousarray(crop[..., ::-1]), params)
        if not ok:
            raise RuntimeError("OpenCV failed to encode a JPEG crop")
        encoded.append(data.tobytes())
    return encoded
