"""The test helpers are faithful to what the pipeline writes.

Every downstream test (gather, train, classify, report, pages) reads cell tables fabricated by
the test helpers instead of running the models, so a fabricated table that lacked columns
SEGMENT writes would hide every defect those columns cause: the fabricated schema must be
SEGMENT's, column for column and type for type.
"""

from __future__ import annotations

import pytest

from bmseg.contract import cells_schema
from bmseg.fake_cells import cells_table, random_cells


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
