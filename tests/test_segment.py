"""SEGMENT end to end on synthetic CZI slides.

An oracle segmenter (it returns the planted cells of the tile it is given, drawn from the
slide's truth table) runs through exactly the code path of the production models, on a tiling
fine enough to cut many cells at tile seams: every planted cell must come out exactly once, in
the tile whose core holds its centroid, with truth's coordinates and areas.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import cv2
import h5py
import hdf5plugin  # noqa: F401  (registers the LZ4 filter for h5py)
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bmseg import cli
from bmseg.models.base import Detections
from bmseg.segment import (
    SegmentOptions,
    Tile,
    check_tiles,
    keep_owned,
    match_slides,
    read_batch_table,
    segment_batch,
    to_rgb8,
)
from bmseg.slide import Rect, open_slide

TILE = 700
MARGIN = 320  # > the largest planted MK's diameter (~50 µm = 290 px)


def grid_batch(slide_path: Path, batch: int = 1, tile: int = TILE, margin: int = MARGIN):
    """A batch table covering the whole slide with a grid of cores, as docs/data.md lays out."""
    with open_slide(slide_path) as slide:
        bounds, slide_id, pixel_size = slide.bounds, slide.slide_id, slide.pixel_size_um
    rows = []
    for row, y in enumerate(range(bounds.y, bounds.bottom, tile)):
        for col, x in enumerate(range(bounds.x, bounds.right, tile)):
            core = Rect(x, y, min(tile, bounds.right - x), min(tile, bounds.bottom - y))
            grown = Rect(x - margin, y - margin, core.w + 2 * margin, core.h + 2 * margin)
            read = grown.intersection(bounds)
            rows.append(
                {
                    "slide_id": slide_id,
                    "tile_id": f"r{row:04d}c{col:04d}",
                    "row": row,
                    "col": col,
                    **{f"core_{k}": v for k, v in core.as_dict().items()},
                    **{f"read_{k}": v for k, v in read.as_dict().items()},
                    "tissue_fraction": 1.0,
                    "pixel_size_um": pixel_size,
                    "batch": batch,
                    "order": len(rows),
                }
            )
    return pa.Table.from_pylist(rows)


def write_table(table: pa.Table, path: Path) -> Path:
    pq.write_table(table, path)
    return path


class OracleSegmenter:
    """Returns the truth cells of one type drawn into each tile it is given.

    SEGMENT calls a segmenter on the batch's tiles in order, once each, so the oracle learns
    each tile's read window by walking the batch table alongside.
    """

    def __init__(self, cell_type: str, truth: pa.Table, windows: Sequence[Rect]):
        self.cell_type = cell_type
        rows = [r for r in truth.to_pylist() if r["cell_type"] == cell_type]
        self._contours = [
            np.stack([r["contour_x_px"], r["contour_y_px"]], axis=1).astype(np.int32) for r in rows
        ]
        self._windows = iter(windows)
        self.calls = 0

    def segment(self, tiles: Sequence[np.ndarray], pixel_size_um: float) -> list[Detections]:
        self.calls += 1
        found = []
        for tile in tiles:
            window = next(self._windows)
            assert tile.shape == (window.h, window.w, 3) and tile.dtype == np.uint8
            labels = np.zeros(tile.shape[:2], np.int32)
            count = 0
            for contour in self._contours:
                local = contour - (window.x, window.y)
                if (local.max(axis=0) < 0).any() or (
                    local.min(axis=0) >= (window.w, window.h)
                ).any():
                    continue
                count += 1
                cv2.drawContours(labels, [local.reshape(-1, 1, 2)], -1, count, thickness=-1)
            found.append(Detections(labels=labels, scores=np.linspace(1.0, 0.5, count)))
        return found


class MeanColourEmbedder:
    """A cheap embedder: the crop's mean R, G, B, then zeros."""

    dim = 2048
    crop_size = 32

    def __init__(self) -> None:
        self.batches: list[int] = []

    def embed(self, crops: np.ndarray) -> np.ndarray:
        assert crops.shape[1:] == (32, 32, 3) and crops.dtype == np.uint8
        self.batches.append(len(crops))
        out = np.zeros((len(crops), self.dim), np.float32)
        out[:, :3] = crops.reshape(len(crops), -1, 3).mean(axis=1)
        return out


@pytest.fixture(scope="module")
def slide(synthetic_slide) -> tuple[Path, pa.Table]:
    """The session's synthetic brightfield CZI and its truth table."""
    czi_path, truth_path = synthetic_slide
    return czi_path, pq.read_table(truth_path)


def run_oracle(slide_path, truth, out_dir, batch_table, **option_args):
    """segment_batch with oracle segmenters over the tiles of ``batch_table``."""
    batch_path = write_table(batch_table, out_dir.parent / f"{out_dir.name}.batch.parquet")
    number, tiles = read_batch_table(batch_path)
    paths = match_slides([t.slide_id for t in tiles], [str(slide_path)])
    windows = [t.read for t in tiles]
    mk, hspc = OracleSegmenter("MK", truth, windows), OracleSegmenter("HSPC", truth, windows)
    embedder = MeanColourEmbedder()
    options = SegmentOptions(progress=False, **option_args)
    summary = segment_batch(
        tiles, paths, mk, hspc, embedder, out_dir, options, {"batch": number, "device": "cpu"}
    )
    return summary, tiles, embedder


def in_core(tile: Tile, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    core = tile.core
    return (x >= core.x) & (x < core.right) & (y >= core.y) & (y < core.bottom)


@pytest.fixture(scope="module")
def oracle_run(slide, tmp_path_factory):
    slide_path, truth = slide
    out = tmp_path_factory.mktemp("oracle") / "batch_0001"
    summary, tiles, embedder = run_oracle(
        slide_path, truth, out, grid_batch(slide_path), readers=2, gpu_batch_tiles=3
    )
    return out, summary, tiles, embedder, truth


def test_every_planted_cell_found_once_in_its_owner_tile(oracle_run):
    out, _, tiles, _, truth = oracle_run
    cells = pq.read_table(out / "cells.parquet", columns=None).to_pylist()
    assert len(truth) >= 50  # the slide really has cells to find, MKs among them
    assert sum(t == "MK" for t in truth["cell_type"].to_pylist()) >= 4
    # Many cells straddle a seam: the tiling really exercises ownership.
    tile_of = {t.tile_id: t for t in tiles}
    straddling = 0
    by_uid = {c["cell_uid"]: c for c in cells}
    assert len(by_uid) == len(cells)
    for planted in truth.to_pylist():
        matches = [
            c
            for c in cells
            if c["cell_type"] == planted["cell_type"]
            and abs(c["centroid_x_px"] - planted["centroid_x_px"]) < 0.5
            and abs(c["centroid_y_px"] - planted["centroid_y_px"]) < 0.5
        ]
        assert len(matches) == 1, planted["cell_uid"]
        (found,) = matches
        assert found["cell_uid"] == planted["cell_uid"]
        assert found["area_px"] == pytest.approx(planted["area_px"], rel=0.02)
        assert found["area_um2"] == pytest.approx(planted["area_um2"], rel=0.02)
        assert found["bbox_x_px"] == planted["bbox_x_px"]
        assert found["bbox_w_px"] == planted["bbox_w_px"]
        owner = tile_of[found["tile_id"]]
        x, y = np.array([found["centroid_x_px"]]), np.array([found["centroid_y_px"]])
        assert in_core(owner, x, y)[0]
        straddling += not (
            owner.core.x <= planted["bbox_x_px"]
            and planted["bbox_x_px"] + planted["bbox_w_px"] <= owner.core.right
            and owner.core.y <= planted["bbox_y_px"]
            and planted["bbox_y_px"] + planted["bbox_h_px"] <= owner.core.bottom
        )
    assert len(cells) == len(truth)
    assert straddling >= 10


def test_cell_table_columns_and_units(oracle_run):
    out, summary, tiles, embedder, _ = oracle_run
    table = pq.read_table(out / "cells.parquet")
    schema = table.schema
    assert schema.field("embedding").type == pa.list_(pa.float16(), 2048)
    assert schema.field("contour_x_px").type == pa.list_(pa.float32())
    for column in ("intensity_mean_R", "intensity_p90_B", "intensity_std_G"):
        assert schema.field(column).type == pa.float32()
    # Shape columns are read without the embedding column chunk.
    shapes = pq.read_table(out / "cells.parquet", columns=["area_um2", "circularity"])
    assert shapes.num_rows == table.num_rows
    rows = table.to_pylist()
    pixel_size = tiles[0].pixel_size_um
    for row in rows:
        assert row["centroid_x_um"] == pytest.approx(row["centroid_x_px"] * pixel_size)
        assert row["area_um2"] == pytest.approx(row["area_px"] * pixel_size**2)
        # An ellipse's axes bound its area: pi/4 * major * minor ~ area.
        ellipse = np.pi / 4 * row["major_axis_um"] * row["minor_axis_um"]
        assert ellipse == pytest.approx(row["area_um2"], rel=0.15)
        assert 0.5 < row["solidity"] <= 1.0
        # The simplified contour lies on the cell's bbox edges, slide px.
        xs, ys = np.array(row["contour_x_px"]), np.array(row["contour_y_px"])
        assert len(xs) >= 4
        right, bottom = (
            row["bbox_x_px"] + row["bbox_w_px"] - 1,
            row["bbox_y_px"] + row["bbox_h_px"] - 1,
        )
        assert abs(xs.min() - row["bbox_x_px"]) <= 1 and abs(xs.max() - right) <= 1
        assert abs(ys.min() - row["bbox_y_px"]) <= 1 and abs(ys.max() - bottom) <= 1
        assert 0 <= row["intensity_p10_R"] <= row["intensity_p50_R"] <= row["intensity_p90_R"]
    # Planted HSPCs are darker (blue-violet) than the MKs' pale cytoplasm in red.
    mk_red = np.mean([r["intensity_mean_R"] for r in rows if r["cell_type"] == "MK"])
    hspc_red = np.mean([r["intensity_mean_R"] for r in rows if r["cell_type"] == "HSPC"])
    assert hspc_red < mk_red
    # Embeddings came in batches, never one forward per cell.
    assert sum(embedder.batches) == len(rows)
    assert len(embedder.batches) <= len(tiles)
    assert summary["cells"] == {
        "MK": sum(r["cell_type"] == "MK" for r in rows),
        "HSPC": sum(r["cell_type"] == "HSPC" for r in rows),
    }


def test_masks_crops_and_batch_record(oracle_run):
    out, _, tiles, _, _ = oracle_run
    cells = pq.read_table(out / "cells.parquet").to_pylist()
    record = json.loads((out / "batch.json").read_text())
    assert record["batch"] == 1
    assert [(t["slide_id"], t["tile_id"]) for t in record["tiles"]] == [
        (t.slide_id, t.tile_id) for t in tiles
    ]
    assert set(record["timings_s"]) >= {"read", "mk", "hspc", "features", "embed", "write"}
    assert "pyarrow" in record["versions"]
    with h5py.File(out / "masks.h5", "r") as masks:
        for tile in tiles:
            group = masks[f"{tile.slide_id}/{tile.tile_id}"]
            labels = group["labels"][...]
            assert labels.dtype == np.uint32 and labels.shape == (tile.read.h, tile.read.w)
            assert (group.attrs["read_x"], group.attrs["read_y"]) == (tile.read.x, tile.read.y)
            mine = [c for c in cells if c["tile_id"] == tile.tile_id]
            counts = np.bincount(labels.ravel(), minlength=len(mine) + 1)
            assert len(counts) == len(mine) + 1
            for cell in mine:
                assert counts[cell["mask_label"]] == cell["area_px"]
    crops = {r["cell_uid"]: r for r in pq.read_table(out / "crops.parquet").to_pylist()}
    assert set(crops) == {c["cell_uid"] for c in cells}
    for cell in cells:
        crop = crops[cell["cell_uid"]]
        image = cv2.imdecode(np.frombuffer(crop["image"], np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
        assert image.shape == (crop["height"], crop["width"], 3)
        side = crop["scale"] * crop["width"]
        # The crop square holds the whole cell, with context on every side.
        assert crop["x"] < cell["bbox_x_px"] and crop["y"] < cell["bbox_y_px"]
        assert crop["x"] + side > cell["bbox_x_px"] + cell["bbox_w_px"]
        assert crop["y"] + side > cell["bbox_y_px"] + cell["bbox_h_px"]
        # The embedding is of this cell's crop: same mean colour as the gallery image.
        embedded = np.array(cell["embedding"][:3], dtype=np.float32)
        assert embedded == pytest.approx(image.reshape(-1, 3).mean(axis=0), abs=6)


def test_area_filter_drops_out_of_range_mks(slide, tmp_path):
    slide_path, truth = slide
    planted = sorted(r["area_um2"] for r in truth.to_pylist() if r["cell_type"] == "MK")
    # Limits between planted areas: the smallest and the largest MK fall outside.
    low, high = (planted[0] + planted[1]) / 2, (planted[-2] + planted[-1]) / 2
    out = tmp_path / "filtered"
    summary, *_ = run_oracle(
        slide_path,
        truth,
        out,
        grid_batch(slide_path, tile=1200),
        mk_min_area_um2=low,
        mk_max_area_um2=high,
        gpu_batch_tiles=2,
    )
    cells = pq.read_table(out / "cells.parquet", columns=["cell_type", "area_um2"]).to_pylist()
    mk_areas = sorted(c["area_um2"] for c in cells if c["cell_type"] == "MK")
    assert mk_areas == pytest.approx(planted[1:-1])
    hspcs = sum(r == "HSPC" for r in truth["cell_type"].to_pylist())
    assert summary["cells"] == {"MK": len(planted) - 2, "HSPC": hspcs}


def test_empty_tile_writes_valid_empty_outputs(slide, tmp_path):
    slide_path, _ = slide
    no_cells = pa.table({"cell_type": pa.array([], pa.string())})
    table = grid_batch(slide_path).slice(0, 1)
    out = tmp_path / "empty"
    summary, tiles, _ = run_oracle(slide_path, no_cells, out, table)
    cells = pq.read_table(out / "cells.parquet")
    assert cells.num_rows == 0 and "embedding" in cells.column_names
    assert pq.read_table(out / "crops.parquet").num_rows == 0
    with h5py.File(out / "masks.h5", "r") as masks:
        labels = masks[f"{tiles[0].slide_id}/{tiles[0].tile_id}/labels"][...]
    assert not labels.any()
    assert summary["cells"] == {"MK": 0, "HSPC": 0}
    assert summary["tiles"][0]["n_mk"] == 0


def square_cells(*cells: tuple[str, int, int, int]) -> pa.Table:
    """An oracle truth table of squares ``(cell_type, x, y, side)``, slide px."""
    rows = [
        {
            "cell_type": cell_type,
            "contour_x_px": [x, x + side - 1, x + side - 1, x],
            "contour_y_px": [y, y, y + side - 1, y + side - 1],
        }
        for cell_type, x, y, side in cells
    ]
    return pa.Table.from_pylist(rows)


def test_mk_pixels_win_and_swallowed_hspcs_go(slide, tmp_path):
    slide_path, _ = slide
    table = grid_batch(slide_path, tile=1200).slice(0, 1)
    truth = square_cells(
        ("MK", 300, 300, 100),
        ("HSPC", 390, 320, 30),  # 10 of 30 columns under the MK: keeps 20 x 30 px
        ("HSPC", 300, 380, 30),  # 20 of 30 rows under the MK: dropped
        ("HSPC", 600, 600, 30),  # untouched
    )
    out = tmp_path / "exclusive"
    summary, tiles, _ = run_oracle(slide_path, truth, out, table)
    cells = pq.read_table(out / "cells.parquet", columns=["cell_type", "area_px", "mask_label"])
    found = sorted((c["cell_type"], c["area_px"]) for c in cells.to_pylist())
    assert found == [("HSPC", 600.0), ("HSPC", 900.0), ("MK", 10000.0)]
    with h5py.File(out / "masks.h5", "r") as masks:
        labels = masks[f"{tiles[0].slide_id}/{tiles[0].tile_id}/labels"][...]
    mk_label = next(c["mask_label"] for c in cells.to_pylist() if c["cell_type"] == "MK")
    assert (labels[300:400, 300:400] == mk_label).all()
    assert summary["cells"] == {"MK": 1, "HSPC": 2}


def test_ownership_is_half_open_in_slide_coordinates():
    tile = Tile("s", "r0000c0000", Rect(110, 210, 10, 10), Rect(100, 200, 30, 30), 0.5)
    labels = np.zeros((30, 30), np.int32)
    labels[10, 10] = 1  # slide (110, 210): the core's first pixel
    labels[10, 20] = 2  # slide (120, 210): the first column past the core
    labels[19, 19] = 3  # slide (119, 219): the core's last pixel
    kept = keep_owned(Detections(labels, np.array([0.1, 0.2, 0.3], np.float32)), tile)
    assert kept.scores.tolist() == pytest.approx([0.1, 0.3])


def test_fluorescence_channels_become_rgb():
    rng = np.random.default_rng(0)
    pixels = rng.integers(100, 4000, size=(64, 64, 2)).astype(np.uint16)
    rgb = to_rgb8(pixels, "fluorescence")
    assert rgb.dtype == np.uint8 and rgb.shape == (64, 64, 3)
    assert not rgb[..., 2].any() and rgb[..., 0].max() == 255 and rgb[..., 0].min() == 0
    single = to_rgb8(pixels[..., :1], "fluorescence")
    assert (single[..., 0] == single[..., 2]).all()
    order = np.argsort(pixels[..., 0].ravel(), kind="stable")
    assert (np.diff(single[..., 0].ravel()[order].astype(int)) >= 0).all()
    brightfield = rng.integers(0, 255, size=(8, 8, 3)).astype(np.uint8)
    assert to_rgb8(brightfield, "brightfield") is brightfield
    assert to_rgb8(brightfield.astype(np.uint16) * 257, "brightfield") == pytest.approx(brightfield)


def run_cli(*args: str) -> int:
    return cli.main(["segment", *map(str, args)])


def test_bad_inputs_are_one_line_errors_and_write_nothing(slide, tmp_path, capsys):
    slide_path, _ = slide
    other = tmp_path / "other.czi"
    other.write_bytes(slide_path.read_bytes())
    table = grid_batch(slide_path).slice(0, 2)
    batch = write_table(table, tmp_path / "batch_0001.parquet")
    out = tmp_path / "out"
    models = tmp_path / "models"

    def fails(*args, expect: str) -> None:
        assert run_cli(*args) == 2
        message = capsys.readouterr().err.strip().splitlines()
        assert len(message) == 1 and expect in message[0], message
        assert not out.exists()

    fails(
        batch,
        "--slides",
        other,
        "--models",
        models,
        "--out",
        out,
        expect="needs slide(s) synthetic",
    )
    fails(
        batch, "--slides", slide_path, slide_path, "--models", models, "--out", out, expect="twice"
    )
    moved = table.set_column(
        table.schema.get_field_index("read_x"), "read_x", pa.array([3990, 0], pa.int64())
    )
    outside = write_table(moved, tmp_path / "batch_0002.parquet")
    fails(outside, "--slides", slide_path, "--models", models, "--out", out, expect="outside")
    empty = table.set_column(
        table.schema.get_field_index("read_w"), "read_w", pa.array([0, 0], pa.int64())
    )
    empty_path = write_table(empty, tmp_path / "batch_0003.parquet")
    fails(empty_path, "--slides", slide_path, "--models", models, "--out", out, expect="empty")
    fails(
        tmp_path / "nope.parquet",
        "--slides",
        slide_path,
        "--models",
        models,
        "--out",
        out,
        expect="nope.parquet",
    )


def test_slide_files_match_batch_ids(tmp_path):
    a, b = tmp_path / "A.czi", tmp_path / "B.ome.tiff"
    assert match_slides(["A", "B"], [str(a), str(b)]) == {"A": a, "B": b}
    assert match_slides(["custom"], [f"custom={a}"]) == {"custom": a}


def test_check_tiles_accepts_the_plan_grid(slide, tmp_path):
    slide_path, _ = slide
    _, tiles = read_batch_table(write_table(grid_batch(slide_path), tmp_path / "b.parquet"))
    with open_slide(slide_path) as opened:
        check_tiles(tmp_path / "b.parquet", tiles, {opened.slide_id: opened})
