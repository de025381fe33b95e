"""GATHER on batch outputs made in SEGMENT's exact schema: seams, summaries, GeoJSON, errors."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bmseg.cli import main
from bmseg.contract import INTENSITY_STATS
from bmseg.qupath import CELL_UUID_NAMESPACE, cell_uuids
from bmseg.seams import find_duplicates
from bmseg.testing.cells import cells_table, write_batch, write_plan
from qupath_geojson import read_like_qupath

SMALL_EMBEDDING = 16


def _table(cx, cy, r, tile, cell_type="HSPC", score=None, slide="s1", seed=0):
    return cells_table(
        cx,
        cy,
        r,
        slide_id=slide,
        tile_id=tile,
        cell_type=cell_type,
        score=score,
        embedding_dim=SMALL_EMBEDDING,
        seed=seed,
    )


def _gather(tmp_path: Path, batches: list[list[pa.Table]], plans: dict[str, dict]) -> Path:
    dirs = [
        write_batch(tmp_path / f"batch_{i}", tables, batch=i) for i, tables in enumerate(batches)
    ]
    for slide, kwargs in plans.items():
        write_plan(tmp_path / "plans", slide, **kwargs)
    out = tmp_path / "gathered"
    args = ["gather", *map(str, dirs), "--plans", str(tmp_path / "plans"), "--out", str(out)]
    assert main(args) == 0
    return out


def test_seam_pairs_resolved_by_overlap_over_smaller_and_score(tmp_path):
    # Tile A owns x < 1000, tile B owns x >= 1000; each saw some cells of the other's margin.
    tile_a = _table(
        [996, 990, 960, 500, 980],
        [100, 300, 500, 500, 700],
        [20, 20, 40, 20, 20],
        "r0000c0000",
        cell_type=["HSPC", "HSPC", "MK", "HSPC", "HSPC"],
        score=[0.9, 0.6, 0.8, 0.7, 0.5],
    )
    tile_b = _table(
        # same cell as A's first (shifted 6 px, lower score) -> A's kept
        # same cell as A's second (higher score) -> B's kept
        # a small cell inside A's MK but an HSPC: other type, both kept
        # a neighbour of A's last that only touches it (overlap < 0.5 of the smaller) -> both kept
        [1002, 1003, 1001, 1012],
        [100, 302, 500, 700],
        [20, 20, 10, 20],
        "r0000c0001",
        score=[0.8, 0.9, 0.99, 0.99],
        seed=1,
    )
    out = _gather(tmp_path, [[tile_a], [tile_b]], {"s1": {"tissue_area_mm2": 1.0}})
    kept = set(
        pq.read_table(out / "s1.cells.parquet", columns=["cell_uid"])["cell_uid"].to_pylist()
    )
    assert kept == {
        "s1:HSPC:996:100",
        "s1:HSPC:1003:302",
        "s1:MK:960:500",
        "s1:HSPC:1001:500",
        "s1:HSPC:500:500",
        "s1:HSPC:980:700",
        "s1:HSPC:1012:700",
    }
    record = json.loads((out / "gather.json").read_text())
    assert record["duplicates_removed"] == 2
    crops = pq.read_table(out / "s1.crops.parquet", columns=["cell_uid"])["cell_uid"].to_pylist()
    assert set(crops) == kept and len(crops) == len(kept)


def _with_uids(table: pa.Table, uids: list[str]) -> pa.Table:
    return table.set_column(0, "cell_uid", pa.array(uids, pa.string()))


def test_equal_uids_of_distinct_cells_in_two_batches_are_suffixed(tmp_path):
    # Batch 0 already holds X and X:2 (SEGMENT suffixed the second); batch 1 a distinct cell
    # far away that also got X. A seam pair that rounds to one pixel keeps a single, plain uid.
    x = "s1:HSPC:100:100"
    tile_a = _table(
        [100, 300, 999.6], [100, 100, 100], [20, 20, 20], "r0000c0000", score=[0.7, 0.7, 0.9]
    )
    tile_a = _with_uids(tile_a, [x, f"{x}:2", "s1:HSPC:1000:100"])
    tile_b = _table([1000.3, 1500], [100, 900], [20, 20], "r0000c0001", score=[0.5, 0.7], seed=1)
    assert tile_b["cell_uid"].to_pylist()[0] == "s1:HSPC:1000:100"
    tile_b = _with_uids(tile_b, ["s1:HSPC:1000:100", x])
    dirs = [
        write_batch(tmp_path / f"batch_{i}", [t], batch=i) for i, t in enumerate([tile_a, tile_b])
    ]
    write_plan(tmp_path / "plans", "s1", tissue_area_mm2=1.0)
    results = []
    for order, name in ((dirs, "forward"), (dirs[::-1], "reversed")):
        out = tmp_path / name
        assert (
            main(
                ["gather", *map(str, order), "--plans", str(tmp_path / "plans"), "--out", str(out)]
            )
            == 0
        )
        cells = pq.read_table(out / "s1.cells.parquet", columns=["cell_uid", "centroid_x_px"])
        by_uid = dict(
            zip(cells["cell_uid"].to_pylist(), cells["centroid_x_px"].to_pylist(), strict=True)
        )
        assert len(by_uid) == cells.num_rows == 4
        assert by_uid == {x: 100, f"{x}:2": 300, "s1:HSPC:1000:100": 999.6, f"{x}:3": 1500}
        crops = pq.read_table(out / "s1.crops.parquet", columns=["cell_uid"])["cell_uid"]
        assert sorted(crops.to_pylist()) == sorted(by_uid)
        record = json.loads((out / "gather.json").read_text())
        assert record["uids_suffixed"] == 1 and record["duplicates_removed"] == 1
        results.append(by_uid)
    assert results[0] == results[1]


def test_duplicates_only_across_tiles_and_equal_scores_resolve_deterministically():
    same_tile = _table([100, 104], [100, 100], [20, 20], "r0000c0000", score=[0.5, 0.9])
    dropped, compared = find_duplicates(same_tile)
    assert len(dropped) == 0 and compared == 0
    tie = pa.concat_tables(
        [
            _table([100], [100], [20], "r0000c0000", score=[0.5]),
            _table([103], [100], [20], "r0000c0001", score=[0.5]),
        ]
    )
    first, _ = find_duplicates(tie)
    second, _ = find_duplicates(tie.take([1, 0]))
    dropped_uids = tie["cell_uid"].to_pylist()[first[0]]
    assert dropped_uids == tie.take([1, 0])["cell_uid"].to_pylist()[second[0]]


def test_many_cells_use_the_spatial_index_not_all_pairs():
    rng = np.random.default_rng(5)
    # 4 x 4 tiles of 1000 px, 1,600 cells on a jittered lattice: only seam cells are compared.
    grid = np.arange(25, 4000, 100, dtype=float)
    cx, cy = (g.ravel() + rng.uniform(-10, 10, g.size) for g in np.meshgrid(grid, grid))
    tiles = [f"r{int(y // 1000):04d}c{int(x // 1000):04d}" for x, y in zip(cx, cy, strict=True)]
    table = _table(cx, cy, np.full(cx.size, 60.0), tiles)
    dropped, compared = find_duplicates(table)
    assert len(dropped) == 0
    assert compared < 0.01 * cx.size * (cx.size - 1) / 2


def _lattice(slide: str, tile: str, origin: tuple[int, int], n_mk: int, n_hspc: int, seed: int):
    """Cells spaced 200 px apart inside one 2000 px tile: no two overlap."""
    rng = np.random.default_rng(seed)
    positions = np.arange(100, 2000, 200)
    gx, gy = np.meshgrid(positions + origin[0], positions + origin[1])
    count = n_mk + n_hspc
    radius = np.concatenate([rng.uniform(40, 90, n_mk), rng.uniform(8, 25, n_hspc)])
    types = ["MK"] * n_mk + ["HSPC"] * n_hspc
    return cells_table(
        gx.ravel()[:count],
        gy.ravel()[:count],
        radius,
        slide_id=slide,
        tile_id=tile,
        cell_type=types,
        embedding_dim=SMALL_EMBEDDING,
        seed=seed,
    )


def test_summary_counts_densities_and_quantiles_match_the_inputs(tmp_path):
    inputs = {
        "alpha": [
            _lattice("alpha", "r0000c0000", (0, 0), 7, 40, 1),
            _lattice("alpha", "r0000c0001", (2000, 0), 3, 20, 2),
        ],
        "beta": [_lattice("beta", "r0001c0000", (0, 2000), 5, 11, 3)],
    }
    batches = [[inputs["alpha"][0], inputs["beta"][0]], [inputs["alpha"][1]]]
    # beta's tile table says how much tissue its segmented tile holds (and one tile unsampled)
    write_plan(tmp_path / "plans", "beta", tissue_area_mm2=9.0, tiles_kept=2)
    pq.write_table(
        pa.table(
            {
                "tile_id": ["r0001c0000", "r0001c0001"],
                "core_w": [2000, 2000],
                "core_h": [2000, 2000],
                "tissue_fraction": pa.array([0.25, 1.0], pa.float32()),
            }
        ),
        tmp_path / "plans" / "beta.tiles.parquet",
    )
    out = _gather(tmp_path, batches, {"alpha": {"tissue_area_mm2": 3.0, "tiles_kept": 4}})
    import pandas as pd

    summary = pd.read_csv(out / "summary.csv").set_index("slide_id")
    assert summary.loc["alpha", "tiles_segmented"] == 2
    assert summary.loc["alpha", "segmented_tissue_mm2"] == pytest.approx(3.0 * 2 / 4)
    beta_mm2 = 0.25 * 2000 * 2000 * 0.1725**2 / 1e6
    assert summary.loc["beta", "segmented_tissue_mm2"] == pytest.approx(beta_mm2, rel=1e-5)
    for slide, tables in inputs.items():
        cells = pa.concat_tables(tables)
        types = np.array(cells["cell_type"].to_pylist())
        area = cells["area_um2"].to_numpy()
        for cell_type in ("MK", "HSPC"):
            expected = int((types == cell_type).sum())
            assert summary.loc[slide, f"{cell_type}_count"] == expected
            assert summary.loc[slide, f"{cell_type}_per_mm2"] == pytest.approx(
                expected / summary.loc[slide, "segmented_tissue_mm2"], rel=1e-5
            )
            for q in (10, 50, 90):
                assert summary.loc[slide, f"{cell_type}_area_um2_p{q}"] == pytest.approx(
                    np.percentile(area[types == cell_type], q), rel=1e-5
                )
    # embeddings travel unchanged, rows keep their order within each batch
    gathered = pq.read_table(out / "alpha.cells.parquet")
    expected = pa.concat_tables(inputs["alpha"])
    assert gathered["cell_uid"].to_pylist() == expected["cell_uid"].to_pylist()
    assert gathered["embedding"].combine_chunks().equals(expected["embedding"].combine_chunks())
    for name in ("density.png", "area_histograms.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    assert len(json.loads((out / "batches.json").read_text())["batches"]) == 2


def test_brightfield_and_fluorescence_slides_gather_into_one_schema(tmp_path):
    """Intensity columns are named after each slide's channels; a run's tables hold them all."""
    fluorescence = cells_table(
        [300, 900], [300, 300], [20, 60], slide_id="fl", tile_id="r0000c0000",
        cell_type=["HSPC", "MK"], embedding_dim=SMALL_EMBEDDING, channels=("DAPI", "CD41"),
    )  # fmt: skip
    brightfield = _table([500], [500], [25], "r0000c0000", slide="bf", seed=4)
    plans = {s: {"tissue_area_mm2": 1.0} for s in ("bf", "fl")}
    out = _gather(tmp_path, [[fluorescence], [brightfield]], plans)
    tables = {s: pq.read_table(out / f"{s}.cells.parquet") for s in ("bf", "fl")}
    assert tables["bf"].schema == tables["fl"].schema
    names = tables["bf"].schema.names
    intensity = [n for n in names if n.startswith("intensity_")]
    # channels grouped, slides' own channel order kept, stats in SEGMENT's order
    assert intensity == [
        f"intensity_{stat}_{channel}"
        for channel in ("DAPI", "CD41", "R", "G", "B")
        for stat in INTENSITY_STATS
    ]
    # where the slide's own intensities were: after the shape columns, before the score
    assert names.index("intensity_mean_DAPI") == brightfield.schema.names.index("intensity_mean_R")
    for own, other, table, source in (
        ("DAPI", "R", tables["fl"], fluorescence),
        ("R", "CD41", tables["bf"], brightfield),
    ):
        column = f"intensity_mean_{own}"
        assert table[column].to_pylist() == source[column].to_pylist()
        assert table[f"intensity_mean_{other}"].null_count == table.num_rows
    # the order of the batch folders does not change the schema
    (tmp_path / "again").mkdir()
    dirs = [str(tmp_path / f"batch_{i}") for i in (1, 0)]
    again = tmp_path / "again" / "out"
    assert main(["gather", *dirs, "--plans", str(tmp_path / "plans"), "--out", str(again)]) == 0
    assert pq.read_schema(again / "fl.cells.parquet") == tables["fl"].schema


def test_gather_refuses_tables_differing_beyond_the_intensities(tmp_path, capsys):
    other = _table([500], [500], [25], "r0000c0000", slide="s2").drop_columns(["solidity"])
    write_batch(tmp_path / "b0", [_table([5], [5], [3], "r0000c0000")])
    write_batch(tmp_path / "b1", [other], batch=1)
    for slide in ("s1", "s2"):
        write_plan(tmp_path / "plans", slide, tissue_area_mm2=1.0)
    dirs = [str(tmp_path / "b0"), str(tmp_path / "b1")]
    out = tmp_path / "out"
    code = main(["gather", *dirs, "--plans", str(tmp_path / "plans"), "--out", str(out)])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "beyond the per-channel intensities" in error
    assert not out.exists()


def test_geojson_follows_the_spec_and_reads_back_as_qupath_detections(tmp_path):
    table = _table([150.5, 400], [220.25, 90], [30, 12], "r0000c0000", cell_type=["MK", "HSPC"])
    # one cell without a usable contour, one measurement not finite
    degenerate = pa.concat_tables([table, _table([700], [700], [10], "r0000c0000", seed=3)])
    xs = degenerate["contour_x_px"].to_pylist()
    ys = degenerate["contour_y_px"].to_pylist()
    xs[2], ys[2] = [700.0], [700.0]
    solidity = degenerate["solidity"].to_numpy().copy()
    solidity[1] = np.nan
    for name, column in (
        ("contour_x_px", pa.array(xs, pa.list_(pa.float32()))),
        ("contour_y_px", pa.array(ys, pa.list_(pa.float32()))),
        ("solidity", pa.array(solidity)),
    ):
        degenerate = degenerate.set_column(degenerate.schema.get_field_index(name), name, column)
    out = _gather(
        tmp_path, [[degenerate]], {"s1": {"tissue_area_mm2": 1.0, "bounds": (-100, 50, 5000, 5000)}}
    )
    objects = read_like_qupath(out / "s1.cells.geojson")
    uids = degenerate["cell_uid"].to_pylist()
    # QuPath keeps a UUID id: the cell's, derived by uuid5 and so the same in every run
    assert [o.uuid for o in objects] == [uuid.uuid5(CELL_UUID_NAMESPACE, u) for u in uids]
    assert (
        uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/bmseg/bmseg/cell_uid")
        == CELL_UUID_NAMESPACE
    )  # documented in docs/results.md
    for index, found in enumerate(objects):
        assert found.object_type == "detection"
        assert found.name == uids[index] and found.metadata["cell_uid"] == uids[index]
        assert found.class_name == degenerate["cell_type"][index].as_py()
        assert found.class_color == {"MK": (220, 50, 47), "HSPC": (38, 139, 210)}[found.class_name]
        measurements = found.measurements
        assert measurements["area_um2"] == pytest.approx(degenerate["area_um2"][index].as_py())
        assert measurements["intensity_mean_R"] == pytest.approx(
            degenerate["intensity_mean_R"][index].as_py(), abs=1e-4
        )
        assert "centroid_x_px" not in measurements and "embedding" not in measurements
        if index < 2:  # contours shifted by the slide origin
            expected = np.stack([np.array(xs[index]) + 100, np.array(ys[index]) - 50], 1)
            np.testing.assert_allclose(np.array(found.ring[:-1]), expected, atol=0.01)
    assert np.isnan(objects[1].measurements["solidity"])  # kept by QuPath as NaN, not dropped
    box = np.array(objects[2].ring)
    x0 = degenerate["bbox_x_px"][2].as_py() + 100
    assert box[:, 0].min() == x0 and len(box) == 5


def test_cell_uuids_equal_the_standard_library_uuid5():
    uids = ["s1:MK:10:20", "slide é:HSPC:1:2:3", ""]
    found = cell_uuids(pa.array(uids)).to_pylist()
    assert found == [str(uuid.uuid5(CELL_UUID_NAMESPACE, u)) for u in uids]


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (lambda d: (d / "plans" / "s1.slide.json").unlink(), "s1.slide.json: missing"),
        (lambda d: (d / "b0" / "batch.json").unlink(), "batch.json: missing"),
        (lambda d: write_batch(d / "b1", [_table([5], [5], [3], "r0000c0000")]), "also in"),
        (
            lambda d: pq.write_table(
                pq.read_table(d / "b0" / "cells.parquet").drop_columns(["score"]),
                d / "b0" / "cells.parquet",
            ),
            "columns score missing",
        ),
    ],
)
def test_bad_input_one_line_error_and_no_output(tmp_path, capsys, break_it, message):
    write_batch(tmp_path / "b0", [_table([5], [5], [3], "r0000c0000")])
    write_plan(tmp_path / "plans", "s1", tissue_area_mm2=1.0)
    break_it(tmp_path)
    dirs = [str(p) for p in sorted(tmp_path.glob("b*"))]
    out = tmp_path / "out"
    code = main(["gather", *dirs, "--plans", str(tmp_path / "plans"), "--out", str(out)])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in error[-1]
    assert not out.exists()
