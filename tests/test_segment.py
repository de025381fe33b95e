"""SEGMENT end to end on synthetic CZI slides.

An oracle segmenter (it returns the planted cells of the tile it is given, drawn from the
slide's truth table) runs through exactly the code path of the production models, on a tiling
fine enough to cut many cells at tile seams: every planted cell must come out exactly once, in
the tile whose core holds its centroid, with truth's coordinates and areas.
"""

from __future__ import annotations

import collections
import json
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path

import cv2
import h5py
import hdf5plugin  # noqa: F401  (registers the LZ4 filter for h5py)
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bmseg import cli
from bmseg.contract import embedding_type
from bmseg.errors import BmsegError
from bmseg.models.base import Detections
from bmseg.pixels import to_rgb8
from bmseg.segment import (
    SegmentOptions,
    Tile,
    keep_owned,
    read_batch_table,
    segment_batch,
)
from bmseg.segment import (
    hspc_windows as segment_hspc_windows,
)
from bmseg.slide import Rect
from bmseg.slide_args import match_slides
from bmseg.storage import MANIFEST, embeddings_to_numpy, unique_cell_uids, write_parquet
from bmseg.synth import write_synthetic_slide
from bmseg.testing.oracle import MeanColourEmbedder, OracleSegmenter

TILE = 700
MARGIN = 320  # > the largest planted MK's diameter (~50 µm = 290 px)


def plan_batches(slide_path: Path, out: Path, tile: int = TILE, batch_size: int = 12) -> list[Path]:
    """Plan the slide with ``bmseg plan`` (every tile with any tissue) and batch all its tiles."""
    plans, batches = out / "plans", out / "batches"
    plan_args = ["-q", "plan", str(slide_path), "--out", str(plans), "--tile-size", str(tile)]
    plan_args += ["--margin", str(MARGIN), "--min-tissue-fraction", "0"]
    assert cli.main(plan_args) == 0
    tables = [str(p) for p in plans.glob("*.tiles.parquet")]
    batch_args = ["-q", "batch", *tables, "--out", str(batches), "--batch-size", str(batch_size)]
    assert cli.main(batch_args) == 0
    return sorted(batches.glob("batch_*.parquet"))


def hspc_windows(tiles: Sequence[Tile], options: SegmentOptions) -> list[Rect]:
    """The slide rectangles SEGMENT hands the HSPC segmenter: core + HSPC margin."""
    return segment_hspc_windows(tiles, options.hspc_max_area_um2)


@pytest.fixture(scope="module")
def slide(synthetic_slide) -> tuple[Path, pa.Table]:
    """The session's synthetic brightfield CZI and its truth table."""
    czi_path, truth_path = synthetic_slide
    return czi_path, pq.read_table(truth_path)


def run_oracle(slide_path, truth, out_dir, batch_path, **option_args):
    """segment_batch with oracle segmenters over the tiles of the batch table at ``batch_path``."""
    number, tiles = read_batch_table(batch_path)
    paths = match_slides([t.slide_id for t in tiles], [str(slide_path)])
    options = SegmentOptions(progress=False, **option_args)
    mk = OracleSegmenter("MK", truth, [t.read for t in tiles])
    hspc = OracleSegmenter("HSPC", truth, hspc_windows(tiles, options))
    embedder = MeanColourEmbedder()
    summary = segment_batch(
        tiles, paths, mk, hspc, embedder, out_dir, options, {"batch": number, "device": "cpu"}
    )
    return summary, tiles, embedder


def one_tile_batch(batch_path: Path, out: Path) -> Path:
    """The first tile of a batch table as a batch of its own."""
    return write_parquet(pq.read_table(batch_path).slice(0, 1), out)


def in_core(tile: Tile, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    core = tile.core
    return (x >= core.x) & (x < core.right) & (y >= core.y) & (y < core.bottom)


@pytest.fixture(scope="module")
def oracle_run(slide, tmp_path_factory):
    """Every batch of a fine tiling of the slide through the oracle; outputs of all batches."""
    slide_path, truth = slide
    work = tmp_path_factory.mktemp("oracle")
    runs = []
    for batch_path in plan_batches(slide_path, work):
        out = work / batch_path.stem
        summary, tiles, embedder = run_oracle(
            slide_path, truth, out, batch_path, readers=2, gpu_batch_tiles=3
        )
        runs.append((out, summary, tiles, embedder))
    assert len(runs) >= 2
    return runs, truth


@pytest.fixture(scope="module")
def coarse_batch(slide, tmp_path_factory) -> Path:
    """One batch holding every 1200 px tile of the slide."""
    (batch_path,) = plan_batches(
        slide[0], tmp_path_factory.mktemp("coarse"), tile=1200, batch_size=100
    )
    return batch_path


def all_cells(runs) -> list[dict]:
    """Rows of every batch's cells.parquet."""
    return [row for out, *_ in runs for row in pq.read_table(out / "cells.parquet").to_pylist()]


def test_every_planted_cell_found_once_in_its_owner_tile(oracle_run):
    runs, truth = oracle_run
    cells = all_cells(runs)
    assert len(truth) >= 50  # the slide really has cells to find, MKs among them
    assert sum(t == "MK" for t in truth["cell_type"].to_pylist()) >= 4
    tile_of = {t.tile_id: t for _, _, tiles, _ in runs for t in tiles}
    assert len({c["cell_uid"] for c in cells}) == len(cells)
    straddling = 0
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
        assert (found["bbox_x_px"], found["bbox_y_px"]) == (
            planted["bbox_x_px"],
            planted["bbox_y_px"],
        )
        assert (found["bbox_w_px"], found["bbox_h_px"]) == (
            planted["bbox_w_px"],
            planted["bbox_h_px"],
        )
        owner = tile_of[found["tile_id"]]
        x, y = np.array([found["centroid_x_px"]]), np.array([found["centroid_y_px"]])
        assert in_core(owner, x, y)[0]
        # Many cells cross a core's edge: the tiling really exercises ownership.
        straddling += not (
            owner.core.x <= planted["bbox_x_px"]
            and planted["bbox_x_px"] + planted["bbox_w_px"] <= owner.core.right
            and owner.core.y <= planted["bbox_y_px"]
            and planted["bbox_y_px"] + planted["bbox_h_px"] <= owner.core.bottom
        )
    assert len(cells) == len(truth)
    assert straddling >= 10


def test_cell_table_columns_and_units(oracle_run):
    runs, _ = oracle_run
    out, _, tiles, _ = runs[0]
    schema = pq.read_schema(out / "cells.parquet")
    assert schema.field("embedding").type == embedding_type(2048)
    assert schema.field("contour_x_px").type == pa.list_(pa.float32())
    for column in ("intensity_mean_R", "intensity_p90_B", "intensity_std_G"):
        assert schema.field(column).type == pa.float32()
    # Shape columns are read without the embedding column chunk; nobody filters on embeddings.
    row_group = pq.ParquetFile(out / "cells.parquet").metadata.row_group(0)
    embedding_chunk = row_group.column(schema.get_field_index("embedding"))
    assert embedding_chunk.statistics is None
    assert not any("DICTIONARY" in e for e in embedding_chunk.encodings)
    shapes = pq.read_table(out / "cells.parquet", columns=["area_um2", "circularity"])
    assert shapes.column_names == ["area_um2", "circularity"]
    rows = all_cells(runs)
    pixel_size = tiles[0].pixel_size_um
    for row in rows:
        assert row["centroid_x_um"] == pytest.approx(row["centroid_x_px"] * pixel_size)
        assert row["area_um2"] == pytest.approx(row["area_px"] * pixel_size**2)
        # The planted shapes are near-elliptic: pi/4 * major * minor ~ area.
        ellipse = np.pi / 4 * row["major_axis_um"] * row["minor_axis_um"]
        assert ellipse == pytest.approx(row["area_um2"], rel=0.15)
        assert 0.5 < row["solidity"] <= 1.0
        # The simplified contour reaches the cell's bbox edges, slide px.
        xs, ys = np.array(row["contour_x_px"]), np.array(row["contour_y_px"])
        assert len(xs) >= 4
        right = row["bbox_x_px"] + row["bbox_w_px"] - 1
        bottom = row["bbox_y_px"] + row["bbox_h_px"] - 1
        assert abs(xs.min() - row["bbox_x_px"]) <= 1 and abs(xs.max() - right) <= 1
        assert abs(ys.min() - row["bbox_y_px"]) <= 1 and abs(ys.max() - bottom) <= 1
        assert 0 <= row["intensity_p10_R"] <= row["intensity_p50_R"] <= row["intensity_p90_R"]
    # Planted HSPCs are dark blue-violet, the MKs' cytoplasm pale: less red in HSPCs.
    mk_red = np.mean([r["intensity_mean_R"] for r in rows if r["cell_type"] == "MK"])
    hspc_red = np.mean([r["intensity_mean_R"] for r in rows if r["cell_type"] == "HSPC"])
    assert hspc_red < mk_red
    for out, summary, tiles, embedder in runs:
        # Embeddings came in batches, never one forward per cell.
        count = pq.read_metadata(out / "cells.parquet").num_rows
        assert sum(embedder.batches) == count
        assert len(embedder.batches) <= len(tiles)
        assert sum(summary["cells"].values()) == count


def test_masks_crops_and_batch_record(oracle_run):
    runs, _ = oracle_run
    for out, _, tiles, _ in runs:
        cells = pq.read_table(out / "cells.parquet").to_pylist()
        record = json.loads((out / "batch.json").read_text())
        assert f"batch_{record['batch']:04d}" == out.name
        assert [(t["slide_id"], t["tile_id"]) for t in record["tiles"]] == [
            (t.slide_id, t.tile_id) for t in tiles
        ]
        for entry in record["tiles"]:
            mine = [c["cell_type"] for c in cells if c["tile_id"] == entry["tile_id"]]
            assert (entry["n_mk"], entry["n_hspc"]) == (mine.count("MK"), mine.count("HSPC"))
        assert set(record["timings_s"]) == {"read", "mk", "hspc", "features", "embed", "write"}
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
                hspc_counts = np.bincount(
                    group["hspc_labels"][...].ravel(), minlength=len(mine) + 1
                )
                for cell in mine:
                    layer = counts if cell["cell_type"] == "MK" else hspc_counts
                    assert layer[cell["mask_label"]] == cell["area_px"]
        crops = {r["cell_uid"]: r for r in pq.read_table(out / "crops.parquet").to_pylist()}
        assert set(crops) == {c["cell_uid"] for c in cells}
        for cell in cells:
            crop = crops[cell["cell_uid"]]
            image = cv2.imdecode(np.frombuffer(crop["image"], np.uint8), cv2.IMREAD_COLOR)
            assert image.shape == (crop["height"], crop["width"], 3)
            side = crop["scale"] * crop["width"]
            # The crop square holds the whole cell, with context on every side.
            assert crop["x"] < cell["bbox_x_px"] and crop["y"] < cell["bbox_y_px"]
            assert crop["x"] + side > cell["bbox_x_px"] + cell["bbox_w_px"]
            assert crop["y"] + side > cell["bbox_y_px"] + cell["bbox_h_px"]
            # The embedding is of this cell's crop: same mean colour as the gallery image.
            embedded = np.frombuffer(cell["embedding"], "<f2")[:3].astype(np.float32)
            mean_rgb = image[..., ::-1].reshape(-1, 3).mean(axis=0)
            assert embedded == pytest.approx(mean_rgb, abs=6)


def test_area_filter_drops_out_of_range_mks(slide, coarse_batch, tmp_path):
    slide_path, truth = slide
    planted = sorted(r["area_um2"] for r in truth.to_pylist() if r["cell_type"] == "MK")
    # Limits between planted areas: the smallest and the largest MK fall outside.
    low, high = (planted[0] + planted[1]) / 2, (planted[-2] + planted[-1]) / 2
    out = tmp_path / "filtered"
    summary, *_ = run_oracle(
        slide_path,
        truth,
        out,
        coarse_batch,
        mk_min_area_um2=low,
        mk_max_area_um2=high,
        gpu_batch_tiles=2,
    )
    cells = pq.read_table(out / "cells.parquet", columns=["cell_type", "area_um2"]).to_pylist()
    mk_areas = sorted(c["area_um2"] for c in cells if c["cell_type"] == "MK")
    assert mk_areas == pytest.approx(planted[1:-1])
    hspcs = sum(r == "HSPC" for r in truth["cell_type"].to_pylist())
    assert summary["cells"] == {"MK": len(planted) - 2, "HSPC": hspcs}


def test_empty_tile_writes_valid_empty_outputs(slide, coarse_batch, tmp_path):
    slide_path, _ = slide
    no_cells = pa.table({"cell_type": pa.array([], pa.string())})
    out = tmp_path / "empty"
    table = one_tile_batch(coarse_batch, tmp_path / "one.parquet")
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


def test_hspcs_under_an_mk_are_kept_whole_with_their_overlap(slide, coarse_batch, tmp_path):
    # An MK-sized mask is not yet an MK (a cluster, a vessel, an adipocyte rim): HSPCs under it
    # stay, each measured on its whole mask, and record how much of them it covers.
    slide_path, _ = slide
    table = one_tile_batch(coarse_batch, tmp_path / "one.parquet")
    _, (tile,) = read_batch_table(table)
    x, y = tile.core.x + 300, tile.core.y + 300
    truth = square_cells(
        ("MK", x, y, 100),
        ("HSPC", x + 90, y + 20, 30),  # 10 of 30 columns under the MK
        ("HSPC", x + 40, y + 80, 30),  # 20 of 30 rows under the MK
        ("HSPC", x + 30, y + 30, 30),  # wholly inside it
        ("HSPC", x + 300, y + 300, 30),  # untouched
    )
    out = tmp_path / "overlaps"
    summary, _, _ = run_oracle(slide_path, truth, out, table)
    columns = ["cell_type", "area_px", "overlap_fraction", "mask_label"]
    cells = pq.read_table(out / "cells.parquet", columns=columns).to_pylist()
    found = sorted((c["cell_type"], c["area_px"], round(c["overlap_fraction"], 4)) for c in cells)
    assert found == [
        ("HSPC", 900.0, 0.0),
        ("HSPC", 900.0, round(1 / 3, 4)),
        ("HSPC", 900.0, round(2 / 3, 4)),
        ("HSPC", 900.0, 1.0),
        ("MK", 10000.0, round((300 + 600 + 900) / 10000, 4)),
    ]
    assert summary["cells"] == {"MK": 1, "HSPC": 4}
    with h5py.File(out / "masks.h5", "r") as masks:
        labels = masks[f"{tile.slide_id}/{tile.tile_id}/labels"][...]
        hspc_labels = masks[f"{tile.slide_id}/{tile.tile_id}/hspc_labels"][...]
    mk_label = next(c["mask_label"] for c in cells if c["cell_type"] == "MK")
    local_x, local_y = x - tile.read.x, y - tile.read.y
    assert (labels[local_y : local_y + 100, local_x : local_x + 100] == mk_label).all()
    for cell in cells:  # each cell's layer holds its whole mask
        layer = labels if cell["cell_type"] == "MK" else hspc_labels
        assert int((layer == cell["mask_label"]).sum()) == cell["area_px"]


def test_cells_rounding_to_one_centroid_pixel_get_distinct_uids(slide, coarse_batch, tmp_path):
    # A C-shaped HSPC and a square HSPC inside its opening: no shared pixel, one centroid pixel.
    slide_path, _ = slide
    table = one_tile_batch(coarse_batch, tmp_path / "one.parquet")
    _, (tile,) = read_batch_table(table)
    x, y = tile.core.x + 300, tile.core.y + 300
    c_shape = [(0, 0), (87, 0), (87, 36), (75, 36), (75, 12), (12, 12), (12, 75)]
    c_shape += [(75, 75), (75, 48), (87, 48), (87, 87), (0, 87)]
    square = [(24, 26), (60, 26), (60, 62), (24, 62)]
    truth = pa.Table.from_pylist(
        [
            {
                "cell_type": "HSPC",
                "contour_x_px": [x + u for u, _ in polygon],
                "contour_y_px": [y + v for _, v in polygon],
            }
            for polygon in (c_shape, square)
        ]
    )
    out = tmp_path / "uids"
    run_oracle(slide_path, truth, out, table)
    cells = pq.read_table(out / "cells.parquet").sort_by("mask_label").to_pylist()
    assert len(cells) == 2
    assert {(round(c["centroid_x_px"]), round(c["centroid_y_px"])) for c in cells} == {
        (x + 42, y + 44)
    }
    uid = f"{tile.slide_id}:HSPC:{x + 42}:{y + 44}"
    assert [c["cell_uid"] for c in cells] == [uid, f"{uid}:2"]
    crops = pq.read_table(out / "crops.parquet", columns=["cell_uid"])["cell_uid"]
    assert crops.to_pylist() == [uid, f"{uid}:2"]


def test_uids_of_a_later_tile_skip_those_already_written():
    taken = {"s:MK:5:5", "s:MK:5:5:2"}
    uids = unique_cell_uids(["s:MK:5:5", "s:HSPC:5:5", "s:HSPC:5:5"], taken)
    assert uids.tolist() == ["s:MK:5:5:3", "s:HSPC:5:5", "s:HSPC:5:5:2"]
    assert taken >= set(uids.tolist())


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


def test_brightfield_bit_depth_comes_from_the_metadata(shared_czi):
    # A 14-bit scanner writes uint16 whose white is 16383: scaled by the dtype it is 4x dark.
    from bmseg.slide import open_slide

    white = np.full((4, 4, 3), 16383, np.uint16)
    assert (to_rgb8(white, "brightfield", bit_depth=14) == 255).all()
    assert (to_rgb8(white, "brightfield") == 64).all()  # the dtype's full scale, no metadata
    assert (to_rgb8(white, "brightfield", bit_depth=16) == 64).all()
    with open_slide(shared_czi / "1_tileregion.czi", pixel_size_um=0.5) as slide:
        assert slide.bit_depth == 14  # ComponentBitCount in the Zeiss metadata


def test_fluorescence_is_stretched_on_the_slide_range_from_plan(tmp_path):
    # A tile with no CD41+ cell: stretched on its own it shows its noise at full contrast;
    # on the slide's range (PLAN's low-resolution read, slide.json) it stays dark.
    slide_path = tmp_path / "fluo.czi"
    write_synthetic_slide(slide_path, 2000, 2000, seed=2, modality="fluorescence")
    assert cli.main(["-q", "plan", str(slide_path), "--out", str(tmp_path)]) == 0
    info = json.loads((tmp_path / "fluo.slide.json").read_text())
    record = info["intensity"]
    assert record["channels"] == ["DAPI", "CD41"] and len(record["low"]) == 2
    assert record["high"][1] > 3000  # the MKs' CD41 sets the top of the range
    rng = np.random.default_rng(0)
    tissue_only = np.stack(
        [rng.normal(900, 40, (64, 64)), rng.normal(260, 40, (64, 64))], axis=-1
    ).astype(np.uint16)
    per_tile = to_rgb8(tissue_only, "fluorescence")
    per_slide = to_rgb8(tissue_only, "fluorescence", ranges=record)
    assert per_tile[..., 1].max() == 255 and per_slide[..., 1].max() < 40
    from bmseg.segment import read_plans

    assert read_plans([str(tmp_path / "fluo.slide.json")], ["fluo"]).intensity["fluo"]["low"] == (
        pytest.approx(record["low"])
    )
    bad = tmp_path / "bad.slide.json"
    bad.write_text(json.dumps({**info, "intensity": {**record, "low": [0.0]}}))
    with pytest.raises(BmsegError, match=r"bad\.slide\.json.*channels"):
        read_plans([str(bad)], ["fluo"])


def run_cli(*args: str) -> int:
    return cli.main(["segment", *map(str, args)])


def test_bad_inputs_are_one_line_errors_and_write_nothing(slide, coarse_batch, tmp_path, capsys):
    slide_path, _ = slide
    other = tmp_path / "other.czi"
    other.write_bytes(slide_path.read_bytes())
    table = pq.read_table(coarse_batch).slice(0, 2)
    batch = write_parquet(table, tmp_path / "batch_0001.parquet")
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
    outside = write_parquet(moved, tmp_path / "batch_0002.parquet")
    fails(outside, "--slides", slide_path, "--models", models, "--out", out, expect="outside")
    empty = table.set_column(
        table.schema.get_field_index("read_w"), "read_w", pa.array([0, 0], pa.int64())
    )
    empty_path = write_parquet(empty, tmp_path / "batch_0003.parquet")
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


@pytest.mark.parametrize("flag", ["compile", "measure_processes"])
def test_switches_are_a_flag_or_the_value_a_param_renders(flag: str):
    """``--compile`` and ``--measure-processes`` stand alone or take the true/false a pipeline
    param renders in SEGMENT's ext.args."""
    parser = cli.build_parser()
    base = ["segment", "b.parquet", "--slides", "s.czi", "--models", "m", "--out", "o"]
    option = "--" + flag.replace("_", "-")
    assert getattr(parser.parse_args(base), flag) is False
    assert getattr(parser.parse_args([*base, option]), flag) is True
    assert getattr(parser.parse_args([*base, option, "true"]), flag) is True
    assert getattr(parser.parse_args([*base, option, "false", "--readers", "1"]), flag) is False
    with pytest.raises(SystemExit):
        parser.parse_args([*base, option, "yes"])


def test_slide_files_match_batch_ids(tmp_path):
    a, b = tmp_path / "A.czi", tmp_path / "B.ome.tiff"
    assert match_slides(["A", "B"], [str(a), str(b)]) == {"A": a, "B": b}
    assert match_slides(["custom"], [f"custom={a}"]) == {"custom": a}


@pytest.fixture(scope="module")
def small_batch(slide, tmp_path_factory) -> Path:
    """One 400 px tile (600 px read window) of the slide, planned by bmseg plan."""
    work = tmp_path_factory.mktemp("small")
    (batch_path,) = plan_batches(slide[0], work, tile=400, batch_size=1000)
    return one_tile_batch(batch_path, work / "one_tile.parquet")


def test_real_models_end_to_end_write_valid_outputs(
    slide, small_batch, test_models_dir, tmp_path, monkeypatch
):
    from bmseg.segment import run

    loaded = []

    def load_and_look(*args, **kwargs):
        models = load_models(*args, **kwargs)
        net = models.hspc.cellpose.net
        loaded.append({type(m).__name__ for m in net.modules() if "Attention" in type(m).__name__})
        return models

    load_models = run.load_models
    monkeypatch.setattr(run, "load_models", load_and_look)
    out = tmp_path / "real"
    args = [small_batch, "--slides", slide[0], "--models", test_models_dir, "--out", out]
    flags = ["--device", "cpu", "--mk-points-per-side", "4", "--no-progress"]
    assert (
        run_cli(*args, *flags, "--attention", "stock", "--compile", "--hspc-embed-px", "112") == 0
    )
    assert loaded == [{"Attention"}]  # segment_anything's own, as --attention stock asks
    record = json.loads((out / "batch.json").read_text())
    assert (record["models"]["attention"], record["models"]["compiled"]) == ("stock", False)
    assert record["batch"] == pq.read_table(small_batch)["batch"][0].as_py()
    assert record["device"] == "cpu"
    assert record["models"]["manifest"]["random_init"] is True
    assert record["models"]["mk"]["points_per_side"] == 4
    assert record["settings"]["hspc_embed_px"] == 112
    # The models' own stages, as their timer measured them, beside the engine's.
    model_stages = record["model_timings_s"]
    assert {"sam2_encode", "mk_masks", "cellpose_net", "hspc_flows_to_masks"} <= set(model_stages)
    assert all(seconds >= 0 for seconds in model_stages.values())
    assert model_stages["sam2_encode"] + model_stages["mk_masks"] <= record["timings_s"]["mk"]
    cells = pq.read_table(out / "cells.parquet")
    assert cells.schema.field("embedding").type == embedding_type(2048)
    assert cells.num_rows == sum(record["cells"].values())
    crops = pq.read_table(out / "crops.parquet")
    assert crops.num_rows == cells.num_rows
    (tile,) = record["tiles"]
    with h5py.File(out / "masks.h5", "r") as masks:
        labels = masks[f"{tile['slide_id']}/{tile['tile_id']}/labels"][...]
    assert int(labels.max(initial=0)) == cells.num_rows
    if cells.num_rows:  # random weights may find nothing; what they find must be well-formed
        embeddings = embeddings_to_numpy(cells["embedding"])
        assert embeddings.shape == (cells.num_rows, 2048) and np.isfinite(embeddings).all()
    assert sorted(p.name for p in out.iterdir() if p.name != MANIFEST) == [
        "batch.json",
        "cells.parquet",
        "crops.parquet",
        "masks.h5",
    ]


def test_missing_or_corrupt_weights_are_one_line_errors(
    slide, small_batch, test_models_dir, tmp_path, capsys
):
    out = tmp_path / "out"
    models = tmp_path / "models"
    shutil.copytree(test_models_dir, models)
    weights = sorted(p for p in models.iterdir() if p.name.startswith("resnet50"))[0]
    base = [small_batch, "--slides", slide[0], "--models", models, "--out", out, "--device", "cpu"]
    if not torch.cuda.is_available():  # never a silent CPU run when a GPU was asked for
        assert run_cli(*base[:-1], "cuda") == 2
        message = capsys.readouterr().err.strip().splitlines()
        assert len(message) == 1 and "--device cuda" in message[0], message
    weights.write_bytes(weights.read_bytes()[:1000])
    assert run_cli(*base) == 2
    message = capsys.readouterr().err.strip().splitlines()
    assert len(message) == 1 and weights.name in message[0], message
    weights.unlink()
    assert run_cli(*base) == 2
    message = capsys.readouterr().err.strip().splitlines()
    assert len(message) == 1 and weights.name in message[0] and "fetch" in message[0], message
    assert not out.exists()


class FailingSegmenter(OracleSegmenter):
    """The oracle, until its second call: then it fails like a crashed model."""

    def segment(self, tiles: Sequence[np.ndarray], pixel_size_um: float) -> list[Detections]:
        if self.calls == 1:
            raise RuntimeError("device lost")
        return super().segment(tiles, pixel_size_um)


def test_a_failed_batch_leaves_no_outputs(slide, coarse_batch, tmp_path):
    slide_path, truth = slide
    _, tiles = read_batch_table(coarse_batch)
    windows = [t.read for t in tiles]
    out = tmp_path / "failed"
    with pytest.raises(RuntimeError, match="device lost"):
        segment_batch(
            tiles,
            match_slides([t.slide_id for t in tiles], [str(slide_path)]),
            OracleSegmenter("MK", truth, windows),
            FailingSegmenter("HSPC", truth, hspc_windows(tiles, SegmentOptions())),
            MeanColourEmbedder(),
            out,
            SegmentOptions(progress=False),
            {"batch": 0, "device": "cpu"},
        )
    assert list(out.iterdir()) == []


class ThreadRecordingSegmenter(OracleSegmenter):
    """The oracle, recording the thread each call comes from (SEGMENT's device thread)."""

    def __init__(self, *args, threads: set[int]) -> None:
        super().__init__(*args)
        self.threads = threads

    def segment(self, tiles: Sequence[np.ndarray], pixel_size_um: float) -> list[Detections]:
        self.threads.add(threading.get_ident())
        return super().segment(tiles, pixel_size_um)


@pytest.mark.parametrize("measure_processes", [False, True], ids=["threads", "processes"])
def test_host_work_runs_off_the_thread_that_calls_the_segmenters(
    slide, coarse_batch, tmp_path, monkeypatch, measure_processes
):
    # The thread that drives the device only calls the networks: uid suffixing and every
    # write happen on other threads; validating their labels, placing the HSPC window and
    # measuring on the worker threads, or in other processes (never here, where these
    # stand-ins would record it).
    from bmseg.segment import engine
    from bmseg.storage import MaskWriter

    slide_path, truth = slide
    _, tiles = read_batch_table(coarse_batch)
    device_threads: set[int] = set()
    host_threads: dict[str, set[int]] = collections.defaultdict(set)

    def recorded(name: str, function):
        def call(*args, **kwargs):
            host_threads[name].add(threading.get_ident())
            return function(*args, **kwargs)

        return call

    for name in ("checked", "write_tile", "unique_cell_uids", "measure_tile", "_placed"):
        monkeypatch.setattr(engine, name, recorded(name, getattr(engine, name)))
    monkeypatch.setattr(MaskWriter, "add", recorded("masks.h5", MaskWriter.add))
    options = SegmentOptions(progress=False, gpu_batch_tiles=2, measure_processes=measure_processes)
    summary = segment_batch(
        tiles,
        match_slides([t.slide_id for t in tiles], [str(slide_path)]),
        ThreadRecordingSegmenter("MK", truth, [t.read for t in tiles], threads=device_threads),
        ThreadRecordingSegmenter(
            "HSPC", truth, hspc_windows(tiles, options), threads=device_threads
        ),
        MeanColourEmbedder(),
        tmp_path / "out",
        options,
        {"batch": 0, "device": "cpu"},
    )
    assert device_threads == {threading.get_ident()}
    measuring = {"checked", "_placed", "measure_tile"}
    written = {"write_tile", "unique_cell_uids", "masks.h5"}
    assert set(host_threads) == written if measure_processes else written | measuring
    for name, threads in host_threads.items():
        assert not threads & device_threads, f"{name} ran on the device thread"
    cells = pq.read_table(tmp_path / "out" / "cells.parquet", columns=["tile_id"])
    written = list(dict.fromkeys(cells["tile_id"].to_pylist()))
    tile_order = [t["tile_id"] for t in summary["tiles"] if t["n_mk"] + t["n_hspc"]]
    assert written == tile_order == [t.tile_id for t in tiles if t.tile_id in set(written)]
    assert sum(summary["cells"].values()) == len(truth)
    assert summary["measure_cpu_s"] > 0
    assert summary["settings"]["measure_processes"] is measure_processes


class WrongShapeSegmenter(OracleSegmenter):
    """The oracle with its label images cut short by a row: a broken backend."""

    def segment(self, tiles: Sequence[np.ndarray], pixel_size_um: float) -> list[Detections]:
        found = super().segment(tiles, pixel_size_um)
        return [Detections(labels=d.labels[1:], scores=d.scores) for d in found]


@pytest.mark.parametrize("measure_processes", [False, True], ids=["threads", "processes"])
def test_a_segmenter_breaking_the_interface_fails_the_batch(
    slide, coarse_batch, tmp_path, measure_processes
):
    # Checked where it is measured (a worker thread or process): the error still arrives.
    slide_path, truth = slide
    _, tiles = read_batch_table(coarse_batch)
    options = SegmentOptions(progress=False, measure_processes=measure_processes)
    out = tmp_path / "broken"
    with pytest.raises(RuntimeError, match="hspc segmenter returned labels of shape"):
        segment_batch(
            tiles,
            match_slides([t.slide_id for t in tiles], [str(slide_path)]),
            OracleSegmenter("MK", truth, [t.read for t in tiles]),
            WrongShapeSegmenter("HSPC", truth, hspc_windows(tiles, options)),
            MeanColourEmbedder(),
            out,
            options,
            {"batch": 0, "device": "cpu"},
        )
    assert list(out.iterdir()) == []


def test_a_failed_write_stops_the_batch_and_leaves_no_outputs(
    slide, coarse_batch, tmp_path, monkeypatch
):
    # Writes run on the writer thread: its error still reaches the caller, files deleted.
    from bmseg.segment import engine

    slide_path, truth = slide
    _, tiles = read_batch_table(coarse_batch)
    written = []

    def write_then_fail(*args, **kwargs):
        if written:
            raise OSError(28, "No space left on device")
        written.append(args)
        return engine_write_tile(*args, **kwargs)

    engine_write_tile = engine.write_tile
    monkeypatch.setattr(engine, "write_tile", write_then_fail)
    out = tmp_path / "failed"
    with pytest.raises(OSError, match="No space left"):
        segment_batch(
            tiles,
            match_slides([t.slide_id for t in tiles], [str(slide_path)]),
            OracleSegmenter("MK", truth, [t.read for t in tiles]),
            OracleSegmenter("HSPC", truth, hspc_windows(tiles, SegmentOptions())),
            MeanColourEmbedder(),
            out,
            SegmentOptions(progress=False),
            {"batch": 0, "device": "cpu"},
        )
    assert len(written) == 1 and list(out.iterdir()) == []


class HostCrops:
    """The embedder of the engine's host path: crops cut on the host, ``embed`` only."""

    def __init__(self, embedder) -> None:
        self.dim, self.crop_size, self._embedder = embedder.dim, embedder.crop_size, embedder

    def embed(self, crops: np.ndarray) -> np.ndarray:
        return self._embedder.embed(crops)


def test_resnet_cuts_its_own_crops_and_embeds_as_the_host_path(
    slide, coarse_batch, test_models_dir, tmp_path
):
    # The make-test ResNet-50 (random weights) through the engine three ways: host crops,
    # embed_squares on the CPU (OpenCV crops), embed_squares by roi_align (the GPU's way).
    from bmseg.models.base import SquareEmbedder
    from bmseg.models.embedder import ResNetEmbedder
    from bmseg.models.layout import read_manifest, weight_path
    from bmseg.models.loading import load_resnet50
    from bmseg.timing import StageTimer

    slide_path, truth = slide
    table = pq.read_table(coarse_batch)
    busiest = int(np.argmax(table["tissue_fraction"].to_numpy()))
    batch = write_parquet(table.slice(busiest, 1), tmp_path / "batch_0001.parquet")
    manifest = read_manifest(test_models_dir)
    cpu = torch.device("cpu")
    net = load_resnet50(weight_path(test_models_dir, manifest.resnet50_weights), cpu)
    resnet = ResNetEmbedder(net, cpu, StageTimer(cpu), crop_size=64, batch_size=8)
    on_device = ResNetEmbedder(net, cpu, StageTimer(cpu), 64, 8, device_crops=True)
    assert isinstance(resnet, SquareEmbedder) and not isinstance(HostCrops(resnet), SquareEmbedder)
    calls = []
    resnet.embed_squares = lambda *args, f=resnet.embed_squares: calls.append(1) or f(*args)
    embedded = {}
    for name, embedder in (("host", HostCrops(resnet)), ("squares", resnet), ("roi", on_device)):
        number, tiles = read_batch_table(batch)
        options = SegmentOptions(progress=False, embed_batch=8)
        segment_batch(
            tiles,
            match_slides([t.slide_id for t in tiles], [str(slide_path)]),
            OracleSegmenter("MK", truth, [t.read for t in tiles]),
            OracleSegmenter("HSPC", truth, hspc_windows(tiles, options)),
            embedder,
            tmp_path / name,
            options,
            {"batch": number, "device": "cpu"},
        )
        table = pq.read_table(tmp_path / name / "cells.parquet")
        embedded[name] = embeddings_to_numpy(table["embedding"]).astype(np.float32)
    assert calls, "the engine called embed_squares"
    host = embedded["host"]
    assert len(host) >= 5 and not np.allclose(host[0], host[1], atol=1e-2)
    # OpenCV crops both ways: the same numbers, up to float16 storage.
    np.testing.assert_allclose(embedded["squares"], host, rtol=1e-2, atol=1e-3)
    # roi_align and OpenCV's area resampling differ by rounding on a few pixels: each cell's
    # embedding stays nearest its own host embedding, and close to it.
    roi = embedded["roi"]
    distances = np.linalg.norm(roi[:, None] - host[None], axis=2)
    assert (distances.argmin(axis=1) == np.arange(len(host))).all()
    relative = np.linalg.norm(roi - host, axis=1) / np.linalg.norm(host, axis=1)
    assert relative.max() < 0.05, relative.max()


def test_fluorescence_slide_end_to_end(tmp_path):
    slide_path = tmp_path / "fluo.czi"
    truth = pq.read_table(
        write_synthetic_slide(slide_path, 2000, 2000, seed=2, modality="fluorescence")
    )
    (batch_path,) = plan_batches(slide_path, tmp_path, tile=1000, batch_size=100)
    out = tmp_path / "out"
    summary, _, _ = run_oracle(slide_path, truth, out, batch_path)
    cells = pq.read_table(out / "cells.parquet")
    assert cells.num_rows == len(truth) == sum(summary["cells"].values()) > 0
    rows = cells.to_pylist()
    # Raw uint16 intensities per named channel: HSPCs bright in DAPI, MKs bright in CD41.
    hspc = [r for r in rows if r["cell_type"] == "HSPC"]
    assert min(r["intensity_mean_DAPI"] for r in hspc) > 1000
    assert max(r["intensity_mean_CD41"] for r in hspc) < 2000
    for mk in (r for r in rows if r["cell_type"] == "MK"):
        assert mk["intensity_mean_CD41"] > 3000


def test_a_batch_spanning_two_slides(slide, tmp_path):
    slide_path, truth = slide
    twin = tmp_path / "twin.czi"
    shutil.copyfile(slide_path, twin)
    plans, batches = tmp_path / "plans", tmp_path / "batches"
    for path in (slide_path, twin):
        plan = ["-q", "plan", str(path), "--out", str(plans), "--tile-size", "1500"]
        assert cli.main([*plan, "--min-tissue-fraction", "0"]) == 0
    tables = sorted(str(p) for p in plans.glob("*.tiles.parquet"))
    assert cli.main(["-q", "batch", *tables, "--out", str(batches), "--batch-size", "100"]) == 0
    (batch_path,) = batches.glob("batch_*.parquet")
    _, tiles = read_batch_table(batch_path)
    out = tmp_path / "out"
    # The twin is the same image under another id: the oracle draws the same truth in both.
    windows = [t.read for t in tiles]
    summary = segment_batch(
        tiles,
        match_slides([t.slide_id for t in tiles], [str(slide_path), str(twin)]),
        OracleSegmenter("MK", truth, windows),
        OracleSegmenter("HSPC", truth, hspc_windows(tiles, SegmentOptions())),
        MeanColourEmbedder(),
        out,
        SegmentOptions(progress=False, readers=3, gpu_batch_tiles=2),
        {"batch": 0, "device": "cpu"},
    )
    cells = pq.read_table(out / "cells.parquet", columns=["cell_uid", "slide_id"]).to_pylist()
    by_slide = collections.Counter(c["slide_id"] for c in cells)
    assert by_slide == {"synthetic": len(truth), "twin": len(truth)}
    uids = {c["cell_uid"] for c in cells if c["slide_id"] == "twin"}
    assert uids == {u.replace("synthetic:", "twin:", 1) for u in truth["cell_uid"].to_pylist()}
    with h5py.File(out / "masks.h5", "r") as masks:
        assert set(masks) == {"synthetic", "twin"}
        assert sum(len(masks[s]) for s in masks) == len(tiles) == len(summary["tiles"])


@pytest.fixture(scope="module")
def marrow_slide(tmp_path_factory) -> Path:
    """A 1600² synthetic slide at marrow density, by `bmseg synth --density marrow`."""
    slide_path = tmp_path_factory.mktemp("marrow") / "marrow.czi"
    assert cli.main(["-q", "synth", str(slide_path), "--width", "1600", "--height", "1600",
                     "--seed", "3", "--density", "marrow"]) == 0  # fmt: skip
    return slide_path


def test_marrow_density_slide_every_cell_once(marrow_slide, tmp_path):
    # `bmseg synth --density marrow`: cells packed as in marrow, touching, MKs among them.
    from scipy import ndimage

    slide_path = marrow_slide
    truth = pq.read_table(slide_path.with_name("marrow.truth.parquet"))
    types = collections.Counter(truth["cell_type"].to_pylist())
    assert types["MK"] >= 1 and types["HSPC"] >= 500
    # Packed: per 3000² px of tissue as many cells as marrow holds (~7 000), and touching.
    from bmseg.synth import SyntheticLayout

    tissue = SyntheticLayout(1600, 1600, 3, density="marrow").tissue_mask(0, 0, 1600, 1600, 4)
    per_tile = len(truth) / (tissue.mean() * 1600**2) * 3000**2
    assert per_tile > 5000
    labels = np.zeros((1600, 1600), np.int32)
    for index, row in enumerate(truth.to_pylist(), start=1):
        contour = np.stack([row["contour_x_px"], row["contour_y_px"]], axis=1).astype(np.int32)
        cv2.drawContours(labels, [contour.reshape(-1, 1, 2)], -1, index, thickness=-1)
    grown = ndimage.grey_dilation(labels, size=(5, 5))
    touching = np.unique(grown[(labels > 0) & (grown != labels)])
    assert len(touching) > 0.5 * len(truth)  # most cells lie within 2 px of a neighbour
    (batch_path,) = plan_batches(slide_path, tmp_path, tile=800, batch_size=100)
    out = tmp_path / "out"
    summary, _, _ = run_oracle(slide_path, truth, out, batch_path, gpu_batch_tiles=2)
    cells = pq.read_table(out / "cells.parquet", columns=["cell_uid", "area_px"])
    assert sorted(cells["cell_uid"].to_pylist()) == sorted(truth["cell_uid"].to_pylist())
    assert summary["cells"] == {"MK": types["MK"], "HSPC": types["HSPC"]}


def test_segment_runs_on_a_marrow_density_tile_with_default_settings(
    marrow_slide, test_models_dir, tmp_path
):
    # The real models (test checkpoints) at their default settings: windows, derived prompts.
    (batch_path,) = plan_batches(marrow_slide, tmp_path, tile=600, batch_size=1000)
    table = pq.read_table(batch_path)
    busiest = int(np.argmax(table["tissue_fraction"].to_numpy()))
    batch = write_parquet(table.slice(busiest, 1), tmp_path / "batch_0001.parquet")
    out = tmp_path / "real"
    args = [batch, "--slides", marrow_slide, "--models", test_models_dir, "--out", out]
    plans = ["--plans", tmp_path / "plans" / "marrow.slide.json"]
    assert run_cli(*args, *plans, "--device", "cpu", "--no-progress") == 0
    record = json.loads((out / "batch.json").read_text())
    assert record["models"]["mk"]["points_per_side"] is None  # derived from the smallest MK
    assert record["models"]["hspc"]["refine"] is False
    assert (record["models"]["attention"], record["models"]["compiled"]) == ("sdpa", False)
    cells = pq.read_table(out / "cells.parquet")
    assert cells.num_rows == sum(record["cells"].values())
    assert "overlap_fraction" in cells.column_names


def test_segment_reads_the_plane_and_modality_plan_chose(tmp_path: Path) -> None:
    """With --plans, SEGMENT's readers open each slide as PLAN did: the plane it read and the
    modality it decided, not the first plane and a guess of their own."""
    from bmseg.segment import TileReader, read_plans
    from bmseg.synth import write_frames_czi

    planes = [np.full((64, 64), value, np.uint8) for value in (10, 200)]
    czi_path = write_frames_czi(
        tmp_path / "stack.czi",
        [(0, 0, image, {"Z": z, "C": 0}, 0) for z, image in enumerate(planes)],
        pixel_size_um=0.5,
    )
    info = {"slide_id": "stack", "modality": "brightfield", "plane": {"Z": 1}}
    (tmp_path / "stack.slide.json").write_text(json.dumps(info))
    plans = read_plans([str(tmp_path / "stack.slide.json")], ["stack"])
    assert plans.choices == {"stack": {"modality": "brightfield", "plane": {"Z": 1}}}

    reader = TileReader({"stack": czi_path}, {"stack": 0.5}, 1, plans.intensity, plans.choices)
    try:
        slide = reader._slide("stack")
        assert slide.modality == "brightfield"
        assert int(slide.read(0, 0, 8, 8).max()) == 200, "the plane PLAN read (Z=1)"
    finally:
        reader.close()

    bad = tmp_path / "bad.slide.json"
    bad.write_text(json.dumps({**info, "plane": ["Z", 1]}))
    with pytest.raises(BmsegError, match=r"bad\.slide\.json.*plane"):
        read_plans([str(bad)], ["stack"])


class OutOfMemorySegmenter(OracleSegmenter):
    """The oracle, until its second call: then the GPU runs out of memory."""

    def segment(self, tiles: Sequence[np.ndarray], pixel_size_um: float) -> list[Detections]:
        if self.calls == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().segment(tiles, pixel_size_um)


def test_gpu_out_of_memory_exits_for_a_retry_with_fewer_tiles_and_writes_nothing(
    slide, coarse_batch, tmp_path, monkeypatch, capsys
):
    from bmseg.contract import GPU_OUT_OF_MEMORY_EXIT
    from bmseg.models.loading import ModelSet
    from bmseg.segment import run
    from bmseg.timing import StageTimer

    slide_path, truth = slide
    _, tiles = read_batch_table(coarse_batch)
    cpu = torch.device("cpu")

    def stub_models(*args, **kwargs) -> ModelSet:
        return ModelSet(
            mk=OracleSegmenter("MK", truth, [t.read for t in tiles]),
            hspc=OutOfMemorySegmenter("HSPC", truth, hspc_windows(tiles, SegmentOptions())),
            embedder=MeanColourEmbedder(),
            device=cpu,
            timer=StageTimer(cpu),
        )

    monkeypatch.setattr(run, "load_models", stub_models)
    out = tmp_path / "out"
    args = [coarse_batch, "--slides", slide_path, "--models", tmp_path, "--out", out]
    assert run_cli(*args, "--gpu-batch-tiles", "4", "--no-progress") == GPU_OUT_OF_MEMORY_EXIT
    message = capsys.readouterr().err.strip().splitlines()
    assert len(message) == 1 and "--gpu-batch-tiles 2" in message[0], message
    assert not out.exists()


def test_holes_left_by_a_segmenter_are_filled_when_its_output_is_checked() -> None:
    """The HSPC segmenter leaves Cellpose's hole filling (SciPy) to SEGMENT's CPU workers:
    ``checked``, which runs there, fills a hole enclosed by one cell on a copy, and leaves
    the holes of output that asks for none."""
    from bmseg.models.base import Detections
    from bmseg.segment.cells import checked

    labels = np.zeros((40, 40), np.int32)
    labels[5:35, 5:35] = 1
    labels[15:20, 15:20] = 0  # enclosed by cell 1 only
    labels[0:5, 0:10] = 2  # background between cell 2 and the border stays
    scores = np.array([0.9, 0.8], np.float32)

    filled = checked(Detections(labels, scores, fill_holes=True), (40, 40), "hspc")
    kept = checked(Detections(labels, scores), (40, 40), "hspc")

    assert (filled.labels[15:20, 15:20] == 1).all() and not filled.fill_holes
    assert (labels[15:20, 15:20] == 0).all()  # the segmenter's array is not written
    assert (kept.labels[15:20, 15:20] == 0).all()
    assert np.array_equal(filled.labels[labels > 0], labels[labels > 0])
    assert (filled.labels[35:, :] == 0).all()
