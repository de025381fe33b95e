"""Synthetic slides: a real CZI whose truth table matches the pixels actually planted."""

from __future__ import annotations

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from bmseg.cli import main
from bmseg.slide import Rect, open_slide
from bmseg.synth import MOSAIC_TILE, PIXEL_SIZE_UM, SyntheticLayout, write_synthetic_slide

# Brightfield colours: cells are far darker (G channel) than the pink tissue, whose R - G
# stands out from the grey background.
CELL_MAX_G = 155
TISSUE_MIN_RED_MINUS_GREEN = 20


@pytest.fixture(scope="module")
def truth(synthetic_slide):
    return pq.read_table(synthetic_slide[1]).to_pylist()


def _truth_mask(cell: dict, x0: int, y0: int, shape: tuple[int, int]) -> np.ndarray:
    """The truth contour filled on a canvas whose (0, 0) is slide (x0, y0)."""
    mask = np.zeros(shape, np.uint8)
    points = np.column_stack([cell["contour_x_px"], cell["contour_y_px"]]) - (x0, y0)
    cv2.fillPoly(mask, [np.round(points).astype(np.int32)], 1)
    cv2.polylines(mask, [np.round(points).astype(np.int32)], True, 1)
    return mask.astype(bool)


def test_the_slide_is_a_czi_mosaic_with_the_pixel_size(synthetic_slide):
    with open_slide(synthetic_slide[0]) as slide:
        assert slide.pixel_size_um == pytest.approx(PIXEL_SIZE_UM)
        assert slide.bounds == Rect(0, 0, 4000, 4000)
        assert slide.modality == "brightfield"
        assert [c.name for c in slide.channels] == ["R", "G", "B"]


def test_cell_types_and_sizes(truth):
    types = {cell["cell_type"] for cell in truth}
    assert types == {"MK", "HSPC"}
    mks = [cell for cell in truth if cell["cell_type"] == "MK"]
    hspcs = [cell for cell in truth if cell["cell_type"] == "HSPC"]
    assert len(mks) >= 4 and len(hspcs) >= 40
    assert all(200 <= cell["area_um2"] <= 2000 for cell in mks)
    diameters = [2 * np.sqrt(cell["area_um2"] / np.pi) for cell in hspcs]
    assert min(diameters) >= 6 and max(diameters) <= 10
    for cell in truth:
        assert cell["area_um2"] == pytest.approx(cell["area_px"] * PIXEL_SIZE_UM**2)
        assert cell["cell_uid"].endswith(
            f":{cell['cell_type']}:{round(cell['centroid_x_px'])}:{round(cell['centroid_y_px'])}"
        )


def test_truth_areas_and_centroids_match_the_planted_pixels(synthetic_slide, truth):
    """Segment each cell by colour in the written CZI; it must be the truth's mask."""
    straddling = 0
    with open_slide(synthetic_slide[0]) as slide:
        for cell in truth:
            x0, y0 = cell["bbox_x_px"] - 4, cell["bbox_y_px"] - 4
            w, h = cell["bbox_w_px"] + 8, cell["bbox_h_px"] + 8
            image = slide.read(x0, y0, w, h)
            dark = (image[:, :, 1] < CELL_MAX_G).astype(np.uint8)
            _, labels = cv2.connectedComponents(dark, connectivity=4)
            label = labels[round(cell["centroid_y_px"]) - y0, round(cell["centroid_x_px"]) - x0]
            assert label > 0
            rows, cols = np.nonzero(labels == label)
            assert rows.size == cell["area_px"]
            assert cols.mean() + x0 == pytest.approx(cell["centroid_x_px"], abs=1e-6)
            assert rows.mean() + y0 == pytest.approx(cell["centroid_y_px"], abs=1e-6)
            np.testing.assert_array_equal(labels == label, _truth_mask(cell, x0, y0, (h, w)))
            crosses_x = x0 // MOSAIC_TILE != (x0 + w) // MOSAIC_TILE
            crosses_y = y0 // MOSAIC_TILE != (y0 + h) // MOSAIC_TILE
            straddling += crosses_x or crosses_y
    assert straddling >= 1  # cells drawn across mosaic tile borders were checked too


def test_cells_lie_in_tissue_and_do_not_touch(synthetic_slide, truth):
    layout = SyntheticLayout(4000, 4000, seed=0)
    occupied = np.zeros((4000, 4000), np.uint8)
    with open_slide(synthetic_slide[0]) as slide:
        for cell in truth:
            x0, y0 = cell["bbox_x_px"] - 3, cell["bbox_y_px"] - 3
            w, h = cell["bbox_w_px"] + 6, cell["bbox_h_px"] + 6
            mask = _truth_mask(cell, x0, y0, (h, w))
            assert layout.tissue_mask(x0, y0, w, h)[mask].all()
            ring = cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
            image = slide.read(x0, y0, w, h).astype(int)
            pink = image[:, :, 0] - image[:, :, 1] > TISSUE_MIN_RED_MINUS_GREEN
            assert pink[ring & ~mask].mean() > 0.999  # drawn on tissue, not on background
            occupied[y0 : y0 + h, x0 : x0 + w] += mask
    assert occupied.max() == 1


def test_same_seed_same_slide_other_seed_other_slide(tmp_path):
    first = write_synthetic_slide(tmp_path / "a.czi", 1500, 1200, seed=7)
    second = write_synthetic_slide(tmp_path / "b.czi", 1500, 1200, seed=7)
    third = write_synthetic_slide(tmp_path / "c.czi", 1500, 1200, seed=8)
    cells = [pq.read_table(p).drop(["cell_uid"]) for p in (first, second, third)]
    assert cells[0].equals(cells[1])
    assert not cells[0].equals(cells[2])
    images = []
    for name in ("a", "b", "c"):
        with open_slide(tmp_path / f"{name}.czi") as slide:
            assert slide.bounds == Rect(0, 0, 1500, 1200)
            images.append(slide.read(0, 0, 1500, 1200))
    np.testing.assert_array_equal(images[0], images[1])
    assert not np.array_equal(images[0], images[2])


def test_fluorescence_option_via_the_command(tmp_path, capsys):
    out = tmp_path / "fluo.czi"
    assert main(["synth", str(out), "--width", "1800", "--height", "1600", "--seed", "2",
                 "--modality", "fluorescence"]) == 0  # fmt: skip
    truth = pq.read_table(tmp_path / "fluo.truth.parquet").to_pylist()
    with open_slide(out) as slide:
        assert slide.modality == "fluorescence"
        assert [(c.name, c.dtype) for c in slide.channels] == [
            ("DAPI", "uint16"),
            ("CD41", "uint16"),
        ]
        background = slide.read(0, 0, 1800, 1600)
        for cell in truth:
            value = background[round(cell["centroid_y_px"]), round(cell["centroid_x_px"])]
            if cell["cell_type"] == "HSPC":
                assert value[0] > 3000  # bright nucleus
            else:
                assert value[1] > 3000  # CD41-bright MK
    assert np.median(background[:, :, 0]) < 1500


def test_bad_synth_arguments_leave_nothing(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "slide.tif")]) == 2
    assert main(["synth", str(tmp_path / "s.czi"), "--width", "10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--width" in err[1]
    assert list(tmp_path.iterdir()) == []


def test_slide_is_rendered_one_mosaic_tile_at_a_time(tmp_path, monkeypatch):
    rendered = []
    original = SyntheticLayout.render

    def spy(self, rect):
        rendered.append(rect)
        return original(self, rect)

    monkeypatch.setattr(SyntheticLayout, "render", spy)
    write_synthetic_slide(tmp_path / "tiles.czi", 2500, 1300, seed=4)
    assert rendered and all(r.w <= MOSAIC_TILE and r.h <= MOSAIC_TILE for r in rendered)
    assert len({(r.x, r.y) for r in rendered}) == len(rendered)
