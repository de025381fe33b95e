"""Finding and reading gathered cell tables: the one way every later step finds its inputs.

PAGES, TRAIN, CLASSIFY, FINETUNE and REPORT all take "a gathered directory or its
``{slide}.cells.parquet`` files"; :func:`find_cell_tables` turns such arguments into table
paths and checks the columns the caller needs, so a directory is read the same way by each
step. The contour and code helpers read columns of those tables without a Python loop per cell.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bmseg.contract import CELLS_SUFFIX, EMBEDDING_COLUMN
from bmseg.errors import BmsegError
from bmseg.storage import check_complete

CELL_TABLES_GLOB = f"*{CELLS_SUFFIX}"
"""The gathered cell tables of a folder (``{slide}.cells.parquet``)."""
EMBEDDED_COLUMNS = ("cell_uid", "cell_type", EMBEDDING_COLUMN)
"""What TRAIN, CLASSIFY and FINETUNE need of a cell table beyond a model's features."""


def find_cell_tables(inputs: Sequence[Path], columns: Sequence[str] = ()) -> list[Path]:
    """Cell tables named by ``inputs``: gathered directories (their ``*.cells.parquet``, the
    directory checked complete) or table files; each must hold ``columns``."""
    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            check_complete(item)
            found = sorted(item.glob(CELL_TABLES_GLOB))
            if not found:
                raise BmsegError(
                    f"{item}: no {CELL_TABLES_GLOB} in this directory; pass the directory "
                    "bmseg gather wrote"
                )
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise BmsegError(
                f"{item}: no such file or directory; pass a gathered directory or its cell tables"
            )
    for path in files:
        require_columns(path, columns, "the cell table")
    return files


def require_columns(path: Path, wanted: Sequence[str], what: str) -> None:
    """BmsegError naming ``path`` when it is no Parquet file or lacks one of ``wanted``."""
    try:
        names = set(pq.read_schema(path).names)
    except (OSError, pa.ArrowException) as error:
        raise BmsegError(
            f"{path}: not a readable Parquet file ({error}); re-run the step"
        ) from error
    missing = [name for name in wanted if name not in names]
    if missing:
        raise BmsegError(
            f"{path}: {what} lacks column(s) {', '.join(missing)}; see docs/data.md for the schema"
        )


def table_uids(files: Sequence[Path]) -> set[str]:
    """Every cell uid in the tables."""
    uids: set[str] = set()
    for path in files:
        uids.update(pq.read_table(path, columns=["cell_uid"])["cell_uid"].to_pylist())
    return uids


def meta_columns(schema: pa.Schema) -> list[str]:
    """Every column but the embedding."""
    return [name for name in schema.names if name != EMBEDDING_COLUMN]


def dictionary_codes(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, list[str]]:
    """Integer codes and their values for a string column."""
    encoded = pc.dictionary_encode(column)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks()
    return encoded.indices.to_numpy(zero_copy_only=False), encoded.dictionary.to_pylist()


def flat_contours(meta: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Contour vertices as flat x and y arrays and per-cell offsets into them."""
    xs = meta["contour_x_px"].combine_chunks()
    ys = meta["contour_y_px"].combine_chunks()
    lengths = pc.list_value_length(xs).fill_null(0).to_numpy()
    if not np.array_equal(lengths, pc.list_value_length(ys).fill_null(0).to_numpy()):
        raise BmsegError("contour_x_px and contour_y_px differ in length; re-run SEGMENT")
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat_x = pc.list_flatten(xs).to_numpy(zero_copy_only=False).astype(np.float64)
    flat_y = pc.list_flatten(ys).to_numpy(zero_copy_only=False).astype(np.float64)
    return flat_x, flat_y, offsets
