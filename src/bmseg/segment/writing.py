"""Writing SEGMENT's outputs: one tile's rows to cells.parquet and crops.parquet and its label
images to masks.h5, streamed in tile order while later tiles are still being segmented."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from bmseg.contract import CROPS_SCHEMA, EMBEDDING_COLUMN
from bmseg.segment.cells import TileCells
from bmseg.storage import embedding_array


def write_tile(
    cells: TileCells,
    embeddings: np.ndarray,
    schema: pa.Schema,
    cells_out: Any,
    crops_out: Any,
    masks_out: Any,
) -> None:
    """Append one tile's rows to cells.parquet and crops.parquet and its labels to masks.h5."""
    tile, columns = cells.tile, cells.columns
    count = len(cells.squares)
    arrays = []
    for schema_field in schema:
        if schema_field.name == EMBEDDING_COLUMN:
            arrays.append(embedding_array(embeddings))
        elif schema_field.name in columns:
            arrays.append(pa.array(columns[schema_field.name], type=schema_field.type))
        else:
            arrays.append(pa.nulls(count, type=schema_field.type))
    cells_out.write_table(pa.Table.from_arrays(arrays, schema=schema))
    squares = cells.squares
    crops_out.write_table(
        pa.table(
            {
                "cell_uid": columns["cell_uid"],
                "x": squares[:, 0] + tile.read.x,
                "y": squares[:, 1] + tile.read.y,
                "scale": (squares[:, 2] / np.maximum(cells.jpeg_sides, 1)).astype(np.float32),
                "width": cells.jpeg_sides,
                "height": cells.jpeg_sides,
                "image": pa.array(cells.jpegs, type=pa.binary()),
            },
            schema=CROPS_SCHEMA,
        )
    )
    masks_out.add(
        tile.slide_id,
        tile.tile_id,
        cells.labels,
        tile.read.x,
        tile.read.y,
        hspc_labels=cells.hspc_labels,
    )
