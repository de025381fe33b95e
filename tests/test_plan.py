"""PLAN: tissue detection against planted truth, the tile grid, outputs and bad input."""

from __future__ import annotations

import json
import logging
import math

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bmseg.cli import main
from bmseg.plan import default_margin, tile_grid
from bmseg.slide import Rect
from bmseg.synth import SyntheticLayout, write_synthetic_slide

# docs/data.md, {slide}.tiles.parquet
TILE_COLUMNS = {
    "slide_id": pa.string(),
    "tile_id": pa.string(),
    "row": pa.int32(),
    "col": pa.int32(),
    "core_x": pa.int64(),
    "core_y": pa.int64(),
    "core_w": pa.int64(),
    "core_h": pa.int64(),
    "read_x": pa.int64(),
    "read_y": pa.int64(),
    "read_w": pa.int64(),
    "read_h": pa.int64(),
    "tissue_fraction": pa.float32(),
    "pixel_size_um": pa.float64(),
}
SLIDE_KEYS = {
    "slide_id",
    "source",
    "pixel_size_um",
    "channels",
    "bounds",
    "modality",
    "tissue_area_mm2",
    "tile_size",
    "margin",
    "tiles_total",
    "tiles_kept",
}


def _plan(slide, out, *flags) -> tuple[pa.Table, dict]:
    assert main(["plan", str(slide), "--out", str(out), *map(str, flags)]) == 0
    stem = slide.stem
    return pq.read_table(out / f"{stem}.tiles.parquet"), json.loads(
        (out / f"{stem}.slide.json").read_text()
    )


def _recall_and_drop(table, info, truth_path, layout):
    """Share of cell-holding tiles kept, and of background-only tiles dropped."""
    grid = tile_grid(Rect(**info["bounds"]), info["tile_size"], info["margin"])
    kept = set(zip(table.column("row").to_pylist(), table.column("col").to_pylist(), strict=True))
    truth = pq.read_table(truth_path)
    cx = np.array(truth.column("centroid_x_px"))
    cy = np.array(truth.column("centroid_y_px"))
    with_cell, background = [], []
    for i in range(grid["row"].size):
        x, y = grid["core_x"][i], grid["core_y"][i]
        w, h = grid["core_w"][i], grid["core_h"][i]
        key = (grid["row"][i], grid["col"][i])
        if ((cx >= x) & (cx < x + w) & (cy >= y) & (cy < y + h)).any():
            with_cell.append(key in kept)
        if not layout.tissue_mask(x, y, w, h, step=4).any():
            background.append(key not in kept)
    return np.mean(with_cell), np.mean(background), len(with_cell), len(background)


@pytest.fixture(scope="module")
def planned(synthetic_slide, tmp_path_factory):
    out = tmp_path_factory.mktemp("plan")
    table, info = _plan(synthetic_slide[0], out, "--tile-size", 400, "--margin", 50)
    return out, table, info


def test_every_tile_with_a_cell_is_kept_and_background_is_dropped(synthetic_slide, planned):
    _, table, info = planned
    layout = SyntheticLayout(4000, 4000, seed=0)
    recall, drop, cell_tiles, background_tiles = _recall_and_drop(
        table, info, synthetic_slide[1], layout
    )
    assert cell_tiles >= 20 and background_tiles >= 10
    assert recall == 1.0
    assert drop >= 0.95


def test_fluorescence_tissue_is_found_too(tmp_path):
    slide = tmp_path / "fluo.czi"
    truth = write_synthetic_slide(slide, 2400, 2000, seed=5, modality="fluorescence")
    table, info = _plan(slide, tmp_path / "out", "--tile-size", 300, "--margin", 40)
    assert info["modality"] == "fluorescence"
    recall, drop, cell_tiles, background_tiles = _recall_and_drop(
        table, info, truth, SyntheticLayout(2400, 2000, seed=5, modality="fluorescence")
    )
    assert cell_tiles >= 10 and background_tiles >= 5
    assert recall == 1.0 and drop >= 0.95


def test_tissue_area_matches_the_planted_tissue(planned):
    _, _, info = planned
    layout = SyntheticLayout(4000, 4000, seed=0)
    true_mm2 = layout.tissue_mask(0, 0, 4000, 4000, step=4).mean() * (4000 * 0.1725 / 1000) ** 2
    assert info["tissue_area_mm2"] == pytest.approx(true_mm2, rel=0.03)


def test_outputs_follow_the_data_contract(planned):
    _, table, info = planned
    assert dict(zip(table.schema.names, table.schema.types, strict=True)) == TILE_COLUMNS
    assert set(info) >= SLIDE_KEYS
    assert info["slide_id"] == "synthetic" and info["source"] == "synthetic.czi"
    assert info["pixel_size_um"] == pytest.approx(0.1725)
    assert info["channels"] == [{"name": c, "dtype": "uint8"} for c in "RGB"]
    assert info["bounds"] == {"x": 0, "y": 0, "w": 4000, "h": 4000}
    assert (info["tile_size"], info["margin"], info["tiles_total"]) == (400, 50, 100)
    assert info["tiles_kept"] == table.num_rows
    rows = table.to_pylist()
    assert len({r["tile_id"] for r in rows}) == len(rows)
    for r in rows:
        assert r["tile_id"] == f"r{r['row']:04d}c{r['col']:04d}"
        assert (r["core_x"], r["core_y"]) == (r["col"] * 400, r["row"] * 400)
        assert r["read_x"] == max(r["core_x"] - 50, 0)
        assert r["read_x"] + r["read_w"] == min(r["core_x"] + r["core_w"] + 50, 4000)
        assert 0 < r["tissue_fraction"] <= 1 and r["pixel_size_um"] == pytest.approx(0.1725)
        assert r["slide_id"] == "synthetic"


def test_tissue_picture_shows_outline_and_tiles(planned):
    out, _, _ = planned
    image = cv2.imread(str(out / "synthetic.tissue.png"))[:, :, ::-1]
    assert 1000 <= max(image.shape[:2]) <= 1700
    green = (image[:, :, 1] > 140) & (image[:, :, 0] < 60) & (image[:, :, 2] < 110)
    blue = (image[:, :, 2] > 180) & (image[:, :, 0] < 110) & (image[:, :, 1] < 150)
    assert green.sum() > 1000 and blue.sum() > 1000


def test_grid_partitions_bounds_with_negative_origin():
    bounds = Rect(-1234, 5000, 2500, 1001)
    grid = tile_grid(bounds, 700, 300)
    cover = np.zeros((bounds.h, bounds.w), np.int32)
    for i in range(grid["row"].size):
        x, y = grid["core_x"][i] - bounds.x, grid["core_y"][i] - bounds.y
        cover[y : y + grid["core_h"][i], x : x + grid["core_w"][i]] += 1
        assert grid["read_x"][i] == max(grid["core_x"][i] - 300, bounds.x)
        assert grid["read_y"][i] + grid["read_h"][i] == min(
            grid["core_y"][i] + grid["core_h"][i] + 300, bounds.bottom
        )
    assert (cover == 1).all()
    assert grid["row"].max() == 1 and grid["col"].max() == 3


def test_default_margin_holds_the_largest_mk():
    margin = default_margin(0.1725)
    diameter_px = 2 * math.sqrt(2000 / math.pi) / 0.1725
    assert diameter_px <= margin <= diameter_px * 1.1
    assert default_margin(0.345) == pytest.approx(margin / 2, abs=1)
    assert default_margin(0.1725, 500) < margin


def test_real_file_in_stage_coordinates(shared_czi, tmp_path):
    table, info = _plan(
        shared_czi / "1_tileregion.czi", tmp_path, "--tile-size", 256, "--margin", 32
    )
    assert info["bounds"] == {"x": 118583, "y": 88865, "w": 1480, "h": 570}
    assert info["pixel_size_um"] == pytest.approx(0.4)
    assert info["tiles_total"] == 6 * 3
    assert min(table.column("core_x").to_pylist()) >= 118583
    assert (tmp_path / "1_tileregion.tissue.png").is_file()


def test_slide_without_tissue_gives_an_empty_table_and_a_warning(make_czi, tmp_path, caplog):
    rng = np.random.default_rng(3)
    blank = np.clip(rng.normal(242, 3, (1500, 1500, 3)), 0, 255).astype(np.uint8)
    slide = make_czi("blank.czi", [(0, 0, blank)], 0.1725)
    with caplog.at_level(logging.WARNING):
        table, info = _plan(slide, tmp_path / "out", "--tile-size", 500)
    assert "no tissue" in caplog.text
    assert table.num_rows == 0
    assert dict(zip(table.schema.names, table.schema.types, strict=True)) == TILE_COLUMNS
    assert info["tiles_kept"] == 0 and info["tiles_total"] == 9
    assert info["tissue_area_mm2"] == 0


def test_shared_calibration_fixes_the_threshold(synthetic_slide, tmp_path):
    calibration = tmp_path / "calibration.json"
    assert main(["calibrate-tissue", str(synthetic_slide[0]), "--out", str(calibration)]) == 0
    data = json.loads(calibration.read_text())
    assert data["modality"] == "brightfield" and data["threshold"] > 0
    _, info = _plan(synthetic_slide[0], tmp_path / "out", "--calibration", calibration)
    assert info["tissue_method"] == "calibration"
    assert info["tissue_threshold"] == pytest.approx(data["threshold"])


def _bad_plan(tmp_path, capsys, slide, *flags) -> str:
    out = tmp_path / "out"
    code = main(["plan", str(slide), "--out", str(out), *map(str, flags)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("bmseg plan: error: ")
    assert not out.exists() or not any(out.iterdir())
    return err[0]


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (("--tile-size", 0), "--tile-size"),
        (("--tile-size", -300), "--tile-size"),
        (("--tile-size", 500, "--margin", 501), "--margin"),
        (("--margin", -1), "--margin"),
        (("--min-tissue-fraction", 1.5), "--min-tissue-fraction"),
        (("--pixel-size-um", 0), "--pixel-size-um"),
        (("--slide-id", "a/b"), "--slide-id"),
        (("--calibration", "absent.json"), "--calibration"),
    ],
)
def test_bad_parameters(synthetic_slide, tmp_path, capsys, flags, named):
    assert named in _bad_plan(tmp_path, capsys, synthetic_slide[0], *flags)


def test_bad_slide_files(synthetic_slide, make_czi, tmp_path, capsys):
    fake = tmp_path / "fake.czi"
    fake.write_text("not a czi")
    assert "not a CZI file" in _bad_plan(tmp_path, capsys, fake)
    cut = tmp_path / "cut.czi"
    cut.write_bytes(synthetic_slide[0].read_bytes()[:200_000])
    assert "cut.czi" in _bad_plan(tmp_path, capsys, cut)
    assert "no such slide file" in _bad_plan(tmp_path, capsys, tmp_path / "absent.czi")
    unscaled = make_czi("unscaled.czi", [(0, 0, np.zeros((64, 64), np.uint8))], None)
    assert "--pixel-size-um" in _bad_plan(tmp_path, capsys, unscaled)


def test_calibration_for_another_modality_is_refused(synthetic_slide, tmp_path, capsys):
    calibration = tmp_path / "fluo.json"
    calibration.write_text(json.dumps({"version": 1, "modality": "fluorescence", "threshold": 2}))
    assert "fluorescence" in _bad_plan(
        tmp_path, capsys, synthetic_slide[0], "--calibration", calibration
    )


def test_plan_reads_the_slide_at_low_resolution_only(synthetic_slide, tmp_path, monkeypatch):
    from bmseg.slide import Slide

    zooms = []
    original = Slide.read

    def spy(self, x, y, w, h, zoom=1.0):
        zooms.append(zoom)
        return original(self, x, y, w, h, zoom)

    monkeypatch.setattr(Slide, "read", spy)
    _plan(synthetic_slide[0], tmp_path, "--tile-size", 1000)
    assert zooms and max(zooms) <= 0.5


def test_calibration_refuses_mixed_modalities(synthetic_slide, tmp_path, capsys):
    fluo = tmp_path / "fluo.czi"
    write_synthetic_slide(fluo, 1200, 1200, seed=1, modality="fluorescence")
    out = tmp_path / "calibration.json"
    assert main(["calibrate-tissue", str(synthetic_slide[0]), str(fluo), "--out", str(out)]) == 2
    assert "calibrate each modality" in capsys.readouterr().err
    assert not out.exists()
