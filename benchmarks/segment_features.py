"""Benchmark SEGMENT's per-cell measurements: bmseg.features against a per-cell baseline.

One synthetic tile of HSPC-sized discs and a few MK-sized ones, uint8 RGB pixels. Both sides
compute the same measurements (shape, per-channel mean / std / 10-50-90th percentiles, a
simplified contour, a gallery JPEG and a 224 px embedding crop per cell), in the same run:

- ours: ``bmseg.features`` (bincount moments and intensities, one sort per channel for the
  percentiles, one OpenCV contour pass, batched ``roi_align`` crops, native-size JPEGs);
- baseline: ``skimage.measure.regionprops`` with the intensity image, then per cell
  ``np.percentile``, ``skimage.measure.find_contours`` + ``approximate_polygon``, a crop
  resized to 224 px and to 128 px with OpenCV and JPEG-encoded: the straightforward loop.

    python benchmarks/segment_features.py --size 2000
"""

from __future__ import annotations

import argparse
import time

import cv2
import numpy as np


def synthetic_tile(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels (discs of 14-18 px radius on a 42 px grid, 1 in 200 an MK of 110 px) and RGB."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((size, size), np.int32)
    count = 0
    for y in range(40, size - 40, 42):
        for x in range(40, size - 40, 42):
            count += 1
            radius = 110 if rng.random() < 0.005 else int(rng.integers(14, 19))
            cv2.circle(labels, (x, y), radius, count, thickness=-1)
    present = np.unique(labels)[1:]
    lookup = np.zeros(count + 1, np.int32)
    lookup[present] = np.arange(1, len(present) + 1)
    rgb = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    return lookup[labels], rgb


def ours(labels: np.ndarray, rgb: np.ndarray) -> int:
    """bmseg.features as SEGMENT calls it; returns the number of cells."""
    from bmseg import features
    from bmseg.contract import GALLERY_CROP_PX

    count = int(labels.max())
    shape = features.shape_features(labels, count, 0.1725, 0, 0)
    features.intensity_stats(labels, rgb, ["R", "G", "B"], count)
    boxes = np.stack(
        [shape["bbox_x_px"], shape["bbox_y_px"], shape["bbox_w_px"], shape["bbox_h_px"]], axis=1
    )
    squares = features.crop_squares(boxes)
    features.gallery_jpegs(rgb, squares, GALLERY_CROP_PX)
    sampler = features.CropSampler(rgb)
    for start in range(0, count, 128):
        sampler.sample(squares[start : start + 128], 224)
    return count


def baseline(labels: np.ndarray, rgb: np.ndarray) -> int:
    """The per-cell loop over skimage regionprops; returns the number of cells."""
    from skimage.measure import approximate_polygon, find_contours, regionprops

    regions = regionprops(labels, intensity_image=rgb)
    for region in regions:
        _ = (
            region.area,
            region.centroid,
            region.perimeter,
            region.equivalent_diameter_area,
            region.axis_major_length,
            region.axis_minor_length,
            region.eccentricity,
            region.solidity,
        )
        values = region.image_intensity[region.image]
        values.mean(axis=0), values.std(axis=0), np.percentile(values, (10, 50, 90), axis=0)
        outline = max(find_contours(np.pad(region.image, 1).astype(float), 0.5), key=len)
        approximate_polygon(outline, 1.0)
        r0, c0, r1, c1 = region.bbox
        side = int(max(r1 - r0, c1 - c0) * 1.5)
        y, x = max(0, (r0 + r1 - side) // 2), max(0, (c0 + c1 - side) // 2)
        crop = rgb[y : y + side, x : x + side]
        cv2.resize(crop, (224, 224), interpolation=cv2.INTER_AREA)
        cv2.imencode(".jpg", cv2.resize(crop, (128, 128), interpolation=cv2.INTER_AREA))
    return len(regions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2000, help="tile side, px (2000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    labels, rgb = synthetic_tile(args.size, args.seed)
    ours(*synthetic_tile(200, args.seed))  # imports and first calls out of the timing
    timings = {}
    for name, run in (("ours", ours), ("baseline", baseline)):
        start = time.perf_counter()
        cells = run(labels, rgb)
        timings[name] = time.perf_counter() - start
        per_cell = 1e3 * timings[name] / cells
        print(f"{name:9s} {cells} cells  {timings[name]:7.2f} s  {per_cell:.2f} ms/cell")
    print(f"ratio     {timings['baseline'] / timings['ours']:.1f}x faster than the baseline")


if __name__ == "__main__":
    main()
