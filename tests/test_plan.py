"""PLAN: tissue detection against planted truth, the tile grid, outputs and bad input."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bmseg.cli import main
from bmseg.contract import SLIDE_RECORD_KEYS
from bmseg.plan import default_margin, tile_grid
from bmseg.slide import Rect
from bmseg.synth import (
    SyntheticLayout,
    blank_frame,
    describe_channels,
    section_image,
    write_frames_czi,
    write_synthetic_slide,
)
from bmseg.tissue_picture import area_text as _area_text

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


def test_slide_json_holds_the_contract_keys_in_order(planned):
    """bmseg.contract lists slide.json's keys for its readers: PLAN writes those, no other."""
    _, _, info = planned
    assert tuple(info) == SLIDE_RECORD_KEYS
    assert set(SLIDE_RECORD_KEYS) >= SLIDE_KEYS


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


# ------------------------------------------------ scenes, modality, blank frames, planes, picture


def _section_czi(tmp_path, name, frames, channels=None):
    path = write_frames_czi(tmp_path / name, frames, 0.5)
    if channels:
        describe_channels(path, channels)
    return path


def _planted_mm2(image: np.ndarray, background: float, tissue: float) -> float:
    """Area (mm², at 0.5 µm/px) of the pixels drawn nearer the tissue grey than the glass."""
    grey = image.mean(axis=2) if image.ndim == 3 else image.astype(np.float64)
    return float((np.abs(grey - tissue) < np.abs(grey - background)).sum()) * 0.25 / 1e6


def test_scenes_far_apart_are_planned_one_by_one(tmp_path):
    first = section_image(1200, 1600, 11, background=238, tissue=150, channels=3)
    second = section_image(900, 900, 12, background=238, tissue=150, channels=3)
    frames = [(0, 0, first, {"C": 0}, 0), (200_000, 3_000, second, {"C": 0}, 1)]
    path = _section_czi(tmp_path, "far.czi", frames, [{"ContrastMethod": "Brightfield"}])
    table, info = _plan(path, tmp_path / "out", "--tile-size", 300, "--margin", 30)
    # tiles over the two scenes only: 4 x 6 + 4 x 3 cores (the grid is anchored at the
    # bounds' corner, so the second scene's 900 px meet 4 rows: y 3000-3900 -> rows 10-12
    # plus the row it starts in), never the 200 000 px of stage between them
    assert info["tiles_total"] <= 6 * 4 + 4 * 4
    assert {s["index"] for s in info["scenes"]} == {0, 1}
    assert [s["bounds"] for s in info["scenes"]] == [
        {"x": 0, "y": 0, "w": 1600, "h": 1200},
        {"x": 200_000, "y": 3_000, "w": 900, "h": 900},
    ]
    for scene, image in zip(info["scenes"], (first, second), strict=True):
        assert scene["tissue_area_mm2"] == pytest.approx(_planted_mm2(image, 238, 150), rel=0.1)
        assert scene["tiles_kept"] > 0
    assert info["tissue_area_mm2"] == pytest.approx(
        sum(s["tissue_area_mm2"] for s in info["scenes"]), rel=1e-6
    )
    cores = np.array(table.column("core_x"))
    assert ((cores < 1600) | (cores >= 200_000 - 300)).all()
    picture = cv2.imread(str(tmp_path / "out" / "far.tissue.png"))[:, :, ::-1]
    green = (picture[:, :, 1] > 140) & (picture[:, :, 0] < 60) & (picture[:, :, 2] < 110)
    half = picture.shape[1] // 2  # one panel per scene, side by side, each outlined
    assert green[:, :half].sum() > 500 and green[:, half:].sum() > 500


def test_real_file_with_three_scenes(shared_czi, tmp_path):
    _, info = _plan(
        shared_czi / "S3_1Pos_2Mosaic_T1_Z1_CH1.czi", tmp_path, "--tile-size", 128, "--margin", 16
    )
    assert [s["bounds"] for s in info["scenes"]] == [
        {"x": 145, "y": 0, "w": 295, "h": 122},
        {"x": 0, "y": 213, "w": 64, "h": 64},
        {"x": 293, "y": 277, "w": 352, "h": 237},
    ]
    assert info["modality"] == "fluorescence" and info["modality_source"] == "metadata"
    assert info["plane"] == {"T": 0, "Z": 0, "H": 0}
    assert info["channels"] == [{"name": "DAPI", "dtype": "uint16"}]
    # the 6 x 5 grid of 128 px over the bounds has 30 cores; the scenes meet 3 (row 0, columns
    # 1-3), 2 (column 0, rows 1-2) and 12 (columns 2-5, rows 2-4) of them
    assert info["tiles_total"] == 17
    assert all(s["tissue_area_mm2"] > 0 for s in info["scenes"])


@pytest.mark.parametrize(
    ("name", "background", "tissue", "channels", "metadata", "modality", "source"),
    [
        ("grey_bf.czi", 235, 140, 1, "Brightfield", "brightfield", "metadata"),
        ("grey_bf_silent.czi", 235, 140, 1, None, "brightfield", "image"),
        ("dark_colour.czi", 10, 150, 3, "Fluorescence", "fluorescence", "metadata"),
        ("dark_colour_silent.czi", 10, 150, 3, None, "fluorescence", "image"),
    ],
)
def test_grey_brightfield_and_dark_colour_find_their_tissue(
    tmp_path, name, background, tissue, channels, metadata, modality, source
):
    image = section_image(1500, 1500, 21, background=background, tissue=tissue, channels=channels)
    described = [{"ContrastMethod": metadata}] if metadata else None
    path = _section_czi(tmp_path, name, [(0, 0, image, {"C": 0}, 0)], described)
    _, info = _plan(path, tmp_path / "out", "--tile-size", 500)
    assert (info["modality"], info["modality_source"]) == (modality, source)
    expected = _planted_mm2(image, background, tissue)
    assert info["tissue_area_mm2"] == pytest.approx(expected, rel=0.1)


def test_modality_flag_overrides_and_is_recorded(synthetic_slide, tmp_path):
    _, info = _plan(synthetic_slide[0], tmp_path, "--modality", "fluorescence")
    assert (info["modality"], info["modality_source"]) == ("fluorescence", "override")


@pytest.mark.parametrize(("gradient", "noise"), [(60, 4), (45, 3), (80, 6), (100, 2), (30, 10)])
def test_blank_frames_with_noise_and_illumination_gradients_hold_no_tissue(
    tmp_path, gradient, noise
):
    frame = blank_frame(3000, 3000, gradient, level=235, gradient=gradient, noise=noise)
    path = _section_czi(tmp_path, "blank.czi", [(0, 0, frame, {"C": 0}, 0)])
    _, info = _plan(path, tmp_path / "out", "--tile-size", 500)
    assert info["tissue_area_mm2"] == 0 and info["tiles_kept"] == 0
    assert info["tissue_method"] == "none"


def test_tissue_under_an_illumination_gradient_is_still_found(tmp_path):
    section = section_image(2400, 2400, 31, background=235, tissue=150, channels=3)
    shading = blank_frame(2400, 2400, 0, level=0, gradient=-60, noise=0).astype(np.int16)
    shaded = np.clip(section.astype(np.int16) - shading, 0, 255).astype(np.uint8)
    path = _section_czi(tmp_path, "shaded.czi", [(0, 0, shaded, {"C": 0}, 0)])
    _, info = _plan(path, tmp_path / "out", "--tile-size", 600)
    assert info["tissue_area_mm2"] == pytest.approx(_planted_mm2(section, 235, 150), rel=0.1)


def _z_stack(tmp_path) -> Path:
    """Three Z planes and two time points; tissue only in plane Z=2, T=1."""
    section = section_image(800, 800, 41, background=240, tissue=140, channels=3)
    empty = np.full_like(section, 240)
    frames = [
        (0, 0, section if (z, t) == (2, 1) else empty, {"Z": z, "T": t, "C": 0}, 0)
        for z in range(3)
        for t in range(2)
    ]
    return _section_czi(tmp_path, "stack.czi", frames, [{"ContrastMethod": "Brightfield"}])


def test_plane_is_recorded_warned_about_and_chosen(tmp_path, caplog):
    path = _z_stack(tmp_path)
    with caplog.at_level(logging.WARNING):
        _, info = _plan(path, tmp_path / "first", "--tile-size", 400)
    assert info["plane"] == {"T": 0, "Z": 0} and info["tissue_area_mm2"] == 0
    assert "Z has 3 planes" in caplog.text and "T has 2 planes" in caplog.text
    _, info = _plan(path, tmp_path / "chosen", "--tile-size", 400, "--plane", "Z=2,T=1")
    assert info["plane"] == {"T": 1, "Z": 2} and info["tissue_area_mm2"] > 0.02
    # brightfield stains darken: the minimum over Z shows what any plane shows
    _, info = _plan(path, tmp_path / "projected", "--tile-size", 400, "--plane", "T=1,Z=min")
    assert info["plane"] == {"T": 1, "Z": "min"} and info["tissue_area_mm2"] > 0.02


def test_bad_plane_is_a_one_line_error(tmp_path, capsys):
    assert "no Q dimension" in _bad_plan(tmp_path, capsys, _z_stack(tmp_path), "--plane", "Q=1")


def test_areas_print_significant_digits():
    assert [_area_text(a) for a in (0, 0.002134, 0.2134, 21.34, 1234.5)] == [
        "0",
        "0.00213",
        "0.213",
        "21.3",
        "1234",
    ]


def test_fluorescence_picture_tells_kept_from_dropped_cores(tmp_path):
    slide = tmp_path / "fluo.czi"
    write_synthetic_slide(slide, 2400, 2000, seed=5, modality="fluorescence")
    table, info = _plan(slide, tmp_path / "out", "--tile-size", 300, "--margin", 40)
    picture = cv2.imread(str(tmp_path / "out" / "fluo.tissue.png"))[:, :, ::-1].astype(int)
    scale = 1400 / 2400
    image = picture[52:]  # below the caption
    kept = set(zip(table.column("row").to_pylist(), table.column("col").to_pylist(), strict=True))
    grid = tile_grid(Rect(**info["bounds"]), 300, 40)
    kept_levels, dropped_levels = [], []
    for i in range(grid["row"].size):
        x0, y0 = (int(grid["core_x"][i] * scale) + 4, int(grid["core_y"][i] * scale) + 4)
        x1 = int((grid["core_x"][i] + grid["core_w"][i]) * scale) - 4
        y1 = int((grid["core_y"][i] + grid["core_h"][i]) * scale) - 4
        inside = image[y0:y1, x0:x1]
        red = inside[:, :, 0]  # the composite's stains (DAPI blue, CD41 green) hold little red
        if (grid["row"][i], grid["col"][i]) in kept:
            kept_levels.append(np.percentile(red, 10))
        else:
            dropped_levels.append(np.percentile(red, 90))
    assert kept_levels and dropped_levels
    # every pixel of a kept core, black glass included, is washed in a colour the stains do
    # not have; a dropped core stays black
    assert min(kept_levels) >= 60 and max(dropped_levels) <= 20
