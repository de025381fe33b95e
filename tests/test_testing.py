"""The test helpers are faithful to what the pipeline writes.

Every downstream test (gather, train, classify, report, pages) reads cell tables fabricated by
the test helpers instead of running the models, so a fabricated table that lacked columns
SEGMENT writes would hide every defect those columns cause: the fabricated schema must be
SEGMENT's, column for column and type for type.
"""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from bmseg.cli import main
from bmseg.contract import CELLS_FILE, TILES_SUFFIX, cells_schema
from bmseg.segment import (
    SegmentOptions,
    hspc_windows,
    read_batch_table,
    segment_batch,
)
from bmseg.slide_args import match_slides
from bmseg.testing.cells import cells_table, random_cells
from bmseg.testing.oracle import MeanColourEmbedder, OracleSegmenter


@pytest.mark.parametrize(
    ("channels", "embedding_dim"),
    [(("R", "G", "B"), 2048), (("DAPI", "CD41-PE", "CD34"), 16)],
    ids=["brightfield", "fluorescence"],
)
def test_fabricated_cells_have_segments_schema(channels, embedding_dim):
    table = cells_table(
        [100.0, 900.0],
        [200.0, 400.0],
        [20.0, 80.0],
        slide_id="s1",
        tile_id="r0000c0000",
        cell_type=["HSPC", "MK"],
        channels=channels,
        embedding_dim=embedding_dim,
    )
    expected = cells_schema(channels, embedding_dim)
    assert table.schema.names == expected.names
    assert table.schema.equals(expected)


def test_random_cells_have_segments_schema():
    table = random_cells(50, embedding_dim=8, seed=3)
    expected = cells_schema(("R", "G", "B"), 8)
    assert table.schema.names == expected.names
    assert table.schema.equals(expected)


def test_fabricated_cells_have_the_schema_of_a_real_segment_run(synthetic_slide, tmp_path):
    """SEGMENT's own cells.parquet (oracle models, one tile of the synthetic CZI) and a
    fabricated table of the same channels and embedding size have one schema."""
    slide_path, truth_path = synthetic_slide
    truth = pq.read_table(truth_path)
    plans, batches = tmp_path / "plans", tmp_path / "batches"
    plan_args = ["plan", str(slide_path), "--out", str(plans), "--tile-size", "1200"]
    assert main(["-q", *plan_args, "--margin", "320", "--min-tissue-fraction", "0"]) == 0
    tiles_table = str(next(plans.glob(f"*{TILES_SUFFIX}")))
    assert main(["-q", "batch", tiles_table, "--out", str(batches), "--batch-size", "1"]) == 0
    number, tiles = read_batch_table(sorted(batches.glob("batch_*.parquet"))[0])
    options = SegmentOptions(progress=False)
    embedder = MeanColourEmbedder()
    segment_batch(
        tiles,
        match_slides([t.slide_id for t in tiles], [str(slide_path)]),
        OracleSegmenter("MK", truth, [t.read for t in tiles]),
        OracleSegmenter("HSPC", truth, hspc_windows(tiles, options.hspc_max_area_um2)),
        embedder,
        tmp_path / "out",
        options,
        {"batch": number, "device": "cpu"},
    )
    written = pq.read_schema(tmp_path / "out" / CELLS_FILE)
    assert pq.read_metadata(tmp_path / "out" / CELLS_FILE).num_rows > 0
    fabricated = random_cells(5, embedding_dim=embedder.dim).schema
    assert fabricated.names == written.names
    assert fabricated.equals(written)
