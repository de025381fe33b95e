"""Per-cell measurements: the vectorised computations agree with plain per-cell NumPy."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from skimage.measure import regionprops_table

from bmseg import features


@pytest.fixture
def tile() -> tuple[np.ndarray, np.ndarray]:
    """Three cells (a disc, a rectangle, an L shape) and random uint16 two-channel pixels."""
    labels = np.zeros((120, 160), np.int32)
    cv2.circle(labels, (40, 40), 20, 1, thickness=-1)
    labels[70:100, 20:90] = 2
    labels[10:60, 110:120] = 3
    labels[50:60, 120:150] = 3
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 5000, size=(120, 160, 2)).astype(np.uint16)
    return labels, pixels


def test_intensity_stats_match_per_cell_numpy(tile):
    labels, pixels = tile
    columns = features.intensity_stats(labels, pixels, ["DAPI", "CD 41"], 3)
    assert set(columns) == set(features.intensity_columns(["DAPI", "CD 41"]))
    for label in (1, 2, 3):
        for index, name in enumerate(("DAPI", "CD_41")):
            values = pixels[..., index][labels == label].astype(np.float64)
            stat = {
                k: columns[f"intensity_{k}_{name}"][label - 1] for k in features.INTENSITY_STATS
            }
            assert stat["mean"] == pytest.approx(values.mean(), rel=1e-5)
            assert stat["std"] == pytest.approx(values.std(), rel=1e-4)
            for q in features.INTENSITY_PERCENTILES:
                assert stat[f"p{q}"] == pytest.approx(np.percentile(values, q), rel=1e-5)


def test_float_intensities_use_the_general_sort(tile):
    labels, pixels = tile
    floats = pixels.astype(np.float32) / 7 - 100  # negative values too
    columns = features.intensity_stats(labels, floats, ["x"], 3)
    values = floats[..., 0][labels == 3]
    assert columns["intensity_p50_x"][2] == pytest.approx(np.median(values), rel=1e-5)


def test_shape_features_in_slide_coordinates_and_microns(tile):
    labels, _ = tile
    shape = features.shape_features(labels, 3, pixel_size_um=0.5, origin_x=1000, origin_y=2000)
    rows, cols = np.nonzero(labels == 2)
    assert shape["centroid_x_px"][1] == pytest.approx(1000 + cols.mean())
    assert shape["centroid_y_um"][1] == pytest.approx((2000 + rows.mean()) * 0.5)
    assert (shape["bbox_x_px"][1], shape["bbox_y_px"][1]) == (1020, 2070)
    assert (shape["bbox_w_px"][1], shape["bbox_h_px"][1]) == (70, 30)
    assert shape["area_um2"][1] == pytest.approx(70 * 30 * 0.25)
    # A disc is round and convex; the L shape is neither.
    assert shape["circularity"][0] > 0.85 and shape["solidity"][0] > 0.95
    assert shape["eccentricity"][0] < 0.2
    assert shape["solidity"][2] < 0.8 and shape["circularity"][2] < shape["circularity"][0]
    # Rectangle axes: a uniform w x h rectangle has axis lengths w / sqrt(3) * 2, h / sqrt(3) * 2.
    assert shape["major_axis_um"][1] == pytest.approx(70 / np.sqrt(3) * 2 * 0.5, rel=0.02)
    assert shape["minor_axis_um"][1] == pytest.approx(30 / np.sqrt(3) * 2 * 0.5, rel=0.05)
    assert shape["equivalent_diameter_um"][1] == pytest.approx(np.sqrt(4 * 2100 / np.pi) * 0.5)


def test_labels_must_be_consecutive(tile):
    labels, _ = tile
    with pytest.raises(ValueError):
        features.shape_features(np.where(labels == 2, 0, labels), 3, 0.5, 0, 0)


def test_shape_features_agree_with_scikit_image(tile):
    labels, _ = tile
    shape = features.shape_features(labels, 3, pixel_size_um=1.0, origin_x=0, origin_y=0)
    reference = regionprops_table(
        labels,
        properties=(
            "axis_major_length",
            "axis_minor_length",
            "eccentricity",
            "perimeter",
            "solidity",
        ),
    )
    assert shape["major_axis_um"] == pytest.approx(reference["axis_major_length"], rel=1e-9)
    assert shape["minor_axis_um"] == pytest.approx(reference["axis_minor_length"], rel=1e-9)
    assert shape["eccentricity"] == pytest.approx(reference["eccentricity"], abs=1e-9)
    # Perimeter and hull follow the outline through boundary pixel centres, as skimage's do.
    assert shape["perimeter_um"] == pytest.approx(reference["perimeter"], rel=0.06)
    assert shape["solidity"] == pytest.approx(reference["solidity"], rel=0.1)


def test_contours_trace_each_cell_in_slide_px(tile):
    labels, _ = tile
    shape = features.shape_features(labels, 3, 0.5, 1000, 2000)
    xs, ys = shape["contour_x_px"], shape["contour_y_px"]
    # The rectangle simplifies to its four corners (pixel centres).
    corners = sorted(zip(xs[1].tolist(), ys[1].tolist(), strict=True))
    assert corners == [(1020, 2070), (1020, 2099), (1089, 2070), (1089, 2099)]
    # Redrawing the simplified contours gives back the cells within the 1 px tolerance.
    for label, (x, y) in enumerate(zip(xs, ys, strict=True), start=1):
        canvas = np.zeros_like(labels, dtype=np.uint8)
        points = np.stack([x - 1000, y - 2000], axis=1).round().astype(np.int32)
        cv2.fillPoly(canvas, [points], 1)
        truth = labels == label
        overlap = (canvas.astype(bool) & truth).sum() / (canvas.astype(bool) | truth).sum()
        assert overlap > 0.9


def test_crops_are_squares_around_the_bbox_with_context():
    squares = features.crop_squares(np.array([[100, 200, 40, 20], [0, 0, 4, 4]]))
    x, y, side = squares[0]
    assert side == 60  # 40 * (1 + 2 * 0.25)
    assert x + side / 2 == pytest.approx(120, abs=1) and y + side / 2 == pytest.approx(210, abs=1)
    assert squares[1][2] == features.CROP_MIN_SIDE_PX


def test_crop_sampler_resamples_the_right_window():
    rgb = np.zeros((200, 200, 3), np.uint8)
    rgb[50:100, 60:110] = (255, 0, 0)  # a red square
    sampler = features.CropSampler(rgb)
    crops = sampler.sample(np.array([[60, 50, 50], [150, 150, 100]]), 16)
    assert crops.shape == (2, 16, 16, 3)
    assert (crops[0][..., 0] == 255).all() and not crops[0][..., 1:].any()
    # Outside the tile the crop is black.
    assert not crops[1].any()


def test_gallery_jpegs_keep_small_crops_whole_and_shrink_large_ones():
    rgb = np.zeros((300, 300, 3), np.uint8)
    rgb[100:140, 100:140] = (255, 0, 0)  # red square
    squares = np.array([[100, 100, 40], [0, 0, 300], [280, 280, 40]])
    jpegs, sides = features.gallery_jpegs(rgb, squares, max_px=128)
    assert sides.tolist() == [40, 128, 40]
    images = [cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR) for j in jpegs]
    assert [i.shape for i in images] == [(40, 40, 3), (128, 128, 3), (40, 40, 3)]
    assert images[0][5:-5, 5:-5, 2].min() > 240 and images[0][..., 0].max() < 20  # BGR red
    assert images[1][..., 2].mean() == pytest.approx(255 * 1600 / 90000, abs=3)
    # The square reaching past the tile's corner is black outside it.
    assert images[2].max() < 10


def test_gpu_crop_path_matches_the_cpu_path():
    # The roi_align path (taken on GPUs) run on CPU tensors against the OpenCV path.
    yy, xx = np.mgrid[0:300, 0:300]
    rgb = np.stack([xx % 256, yy % 256, (xx + yy) // 3 % 256], axis=-1).astype(np.uint8)
    squares = np.array([[10, 20, 90], [100, 120, 30], [250, 250, 80]])
    sampler = features.CropSampler(rgb)
    by_opencv = sampler.sample(squares, 45).astype(int)
    by_roi_align = sampler._roi_align(squares, 45).astype(int)
    assert by_roi_align.shape == by_opencv.shape == (3, 45, 45, 3)
    assert np.abs(by_roi_align[:2] - by_opencv[:2]).mean() < 2
    # Past the tile's edge both are black.
    assert not by_opencv[2, -5:, -5:].any() and not by_roi_align[2, -5:, -5:].any()
