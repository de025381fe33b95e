"""Gathered cell and crop tables in the docs/data.md schema, made for the pages and browser
tests and the pages benchmark.

For tests and benchmarks, not for production. Cells are wobbly closed contours in slide
coordinates; each crop is a real JPEG drawn like a brightfield bone-marrow crop (pink stroma,
purple cell, darker lobed nucleus, noise), with the cell's contour drawn in pure green so tests
can check that the page's overlay lands on it.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bmseg.contract import CELLS_SUFFIX, CROPS_SCHEMA, CROPS_SUFFIX, slide_file
from bmseg.testing.cells import cells_table

PIXEL_SIZE_UM = 0.1725
CONTOUR_POINTS = 48


def wobbly_contour(rng: np.random.Generator, cx: float, cy: float, radius: float) -> np.ndarray:
    """A closed, irregular cell outline around (cx, cy), (n, 2) slide px."""
    angles = np.linspace(0, 2 * np.pi, CONTOUR_POINTS, endpoint=False)
    wobble = 1 + sum(
        rng.uniform(-0.08, 0.08) * np.cos(k * angles + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)
    )
    return np.stack(
        [cx + radius * wobble * np.cos(angles), cy + radius * wobble * np.sin(angles)], 1
    )


SUBPIXEL_BITS = 4  # OpenCV draws at 1/16 px


def to_drawing_points(crop_points: np.ndarray) -> np.ndarray:
    """Crop points (pixel u spans [u, u+1)) as OpenCV fixed-point coordinates.

    OpenCV puts a point (u, v) at the centre of pixel (u, v), i.e. at crop point
    (u + 0.5, v + 0.5); drawing at 1/16 px keeps the half-pixel offset of SEGMENT's geometry.
    """
    return np.round((crop_points - 0.5) * (1 << SUBPIXEL_BITS)).astype(np.int32)


def draw_crop(
    rng: np.random.Generator, contour_crop: np.ndarray, size: int, cell_type: str, mark: bool
) -> bytes:
    """A brightfield-like crop with the cell filled; the contour in pure green when ``mark``.

    ``contour_crop``: the contour in crop points, as SEGMENT maps it (docs/cells.md, Crops).
    """
    low = cv2.resize(rng.normal(0, 1, (8, 8)).astype(np.float32), (size, size))
    base = np.array([228, 196, 214], np.float32)  # pink stroma (RGB)
    image = base + low[..., None] * np.array([10, 12, 8], np.float32)
    for _ in range(int(rng.integers(2, 6))):  # red blood cells around
        centre = (int(rng.integers(0, size)), int(rng.integers(0, size)))
        cv2.circle(image, centre, int(size * 0.06), (205, 120, 130), -1)
    polygon = to_drawing_points(contour_crop)
    cv2.fillPoly(image, [polygon], (176, 128, 190), shift=SUBPIXEL_BITS)
    centre = contour_crop.mean(0)
    lobes = 3 if cell_type == "MK" else 1
    radius = float(np.linalg.norm(contour_crop - centre, axis=1).mean())
    for k in range(lobes):
        offset = 0.25 * radius * np.array([np.cos(2.1 * k), np.sin(2.1 * k)]) * (lobes > 1)
        axes = (max(2, int(radius * 0.35)), max(2, int(radius * 0.28)))
        cv2.ellipse(
            image, tuple(int(v) for v in centre + offset), axes, 40 * k, 0, 360, (92, 52, 120), -1
        )
    image = cv2.GaussianBlur(image, (0, 0), 1.2)
    image += rng.normal(0, 5, image.shape).astype(np.float32)
    if mark:
        cv2.polylines(image, [polygon], True, (0, 255, 0), 2, shift=SUBPIXEL_BITS)
    rgb = np.clip(image, 0, 255).astype(np.uint8)
    ok, jpeg = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return jpeg.tobytes()


def make_slide(
    folder: Path,
    slide_id: str,
    counts: dict[str, int],
    seed: int = 0,
    mark_contours: bool = False,
    crop_size: int = 256,
) -> tuple[Path, Path]:
    """Write ``{slide}.cells.parquet`` and ``{slide}.crops.parquet`` (file names made safe).

    The cell table is :func:`bmseg.testing.cells.cells_table`'s, with the wobbly contours (and
    the bbox and area they give) in place of its circles.
    """
    rng = np.random.default_rng(seed)
    types, centres, radii, scores, contours, crops = [], [], [], [], [], []
    for cell_type, count in counts.items():
        for _ in range(count):
            radius_um = rng.uniform(12, 24) if cell_type == "MK" else rng.uniform(3, 5.5)
            radius = radius_um / PIXEL_SIZE_UM
            cx, cy = rng.uniform(1000, 60000, 2)
            contour = wobbly_contour(rng, cx, cy, radius)
            # MK crops cover ~3 radii and are stored downscaled (scale > 1); HSPC crops at scale 1.
            side = 3.2 * radius
            scale = max(1.0, side / crop_size)
            width = height = round(min(side, crop_size * scale) / scale)
            x0, y0 = int(cx - side / 2), int(cy - side / 2)
            contour_crop = (contour + 0.5 - [x0, y0]) / scale  # docs/cells.md, Crops
            jpeg = draw_crop(rng, contour_crop, width, cell_type, mark_contours)
            types.append(cell_type)
            centres.append((cx, cy))
            radii.append(radius)
            scores.append(rng.uniform(0.5, 1))
            contours.append(contour)
            crops.append((x0, y0, scale, width, height, jpeg))
    n = len(types)
    cx, cy = np.array(centres).T
    cell_table = cells_table(
        cx,
        cy,
        radii,
        slide_id=slide_id,
        tile_id="r0000c0000",
        cell_type=types,
        score=scores,
        pixel_size_um=PIXEL_SIZE_UM,
        contour_points=CONTOUR_POINTS,
        seed=seed,
    )
    xs, ys = np.array(contours).transpose(2, 0, 1)
    area_px = 0.5 * np.abs((xs * np.roll(ys, 1, 1)).sum(1) - (ys * np.roll(xs, 1, 1)).sum(1))
    offsets = pa.array(np.arange(0, (n + 1) * CONTOUR_POINTS, CONTOUR_POINTS, dtype=np.int32))
    geometry = {
        "bbox_x_px": pa.array(xs.min(1).astype(np.int64)),
        "bbox_y_px": pa.array(ys.min(1).astype(np.int64)),
        "bbox_w_px": pa.array(np.ptp(xs, 1).astype(np.int64) + 1),
        "bbox_h_px": pa.array(np.ptp(ys, 1).astype(np.int64) + 1),
        "area_px": pa.array(area_px),
        "area_um2": pa.array(area_px * PIXEL_SIZE_UM**2),
        "contour_x_px": pa.ListArray.from_arrays(offsets, pa.array(xs.astype(np.float32).ravel())),
        "contour_y_px": pa.ListArray.from_arrays(offsets, pa.array(ys.astype(np.float32).ravel())),
    }
    for name, column in geometry.items():
        cell_table = cell_table.set_column(cell_table.schema.get_field_index(name), name, column)
    x0, y0, scale, width, height, jpeg = zip(*crops, strict=True)
    crop_table = pa.Table.from_pydict(
        {
            "cell_uid": cell_table["cell_uid"],
            "x": pa.array(x0, pa.int64()),
            "y": pa.array(y0, pa.int64()),
            "scale": pa.array(scale, pa.float32()),
            "width": pa.array(width, pa.int32()),
            "height": pa.array(height, pa.int32()),
            "image": pa.array(jpeg, pa.binary()),
        },
        schema=CROPS_SCHEMA,
    )
    stem = "".join(c if c.isalnum() or c in "._-" else "_" for c in slide_id)
    folder.mkdir(parents=True, exist_ok=True)
    cells_path = folder / slide_file(stem, CELLS_SUFFIX)
    crops_path = folder / slide_file(stem, CROPS_SUFFIX)
    pq.write_table(cell_table, cells_path)
    pq.write_table(crop_table, crops_path)
    return cells_path, crops_path


def make_gathered(folder: Path, slides: dict[str, dict[str, int]], **kwargs) -> Path:
    """A gathered directory with one cell and crop table per slide."""
    for seed, (slide_id, counts) in enumerate(slides.items()):
        make_slide(folder, slide_id, counts, seed=seed, **kwargs)
    return folder
