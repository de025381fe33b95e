"""BATCH: pool the tissue tiles of all slides, sample a fraction, cut GPU-sized batches.

``bmseg batch TILE_TABLES... --out DIR`` reads the ``{slide}.tiles.parquet`` tables of PLAN and
writes ``batch_NNNN.parquet``: the tile columns plus ``batch`` and ``order``; beside each,
``batch_NNNN.slides.json`` lists the batch's slide ids (sorted), so that the pipeline hands each
SEGMENT task only the slides its batch reads.

Sampling gives every tile a key from a hash of ``(seed, slide_id, tile_id)`` and keeps the
``round(fraction x tiles)`` tiles with the smallest keys. The sample therefore depends on the
seed and the tiles alone (not on the order of the tables given), and with one seed a smaller
fraction's tiles are a subset of a larger fraction's: the 10 % labelled first are also
segmented again in the 100 % run. The kept tiles are ordered by slide id, then row, then
column, and cut into consecutive batches, so a batch reads few slides and neighbouring tiles.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bmseg.contract import (
    BATCH_TABLE_PATTERN,
    DEFAULT_BATCH_SIZE,
    SLIDE_LIST_SUFFIX,
    TILE_SCHEMA,
    check_id,
)
from bmseg.errors import BmsegError
from bmseg.storage import check_no_nulls, output_set, write_json, write_parquet

log = logging.getLogger(__name__)


def read_tile_tables(paths: Sequence[Path]) -> pa.Table:
    """All tile tables concatenated; a slide id found in two tables is an error."""

    tables = []
    owner: dict[str, Path] = {}
    for path in paths:
        if not path.is_file():
            raise BmsegError(f"{path}: no such tile table; pass the .tiles.parquet files of plan")
        try:
            table = pq.read_table(path)
        except Exception as error:
            raise BmsegError(
                f"{path}: not a readable Parquet tile table ({' '.join(str(error).split())}); "
                "pass the .tiles.parquet files of bmseg plan"
            ) from None
        missing = [name for name in TILE_SCHEMA.names if name not in table.column_names]
        if missing:
            raise BmsegError(
                f"{path}: not a tile table (no column {', '.join(missing)}); "
                "pass the .tiles.parquet files of bmseg plan"
            )
        table = table.select(TILE_SCHEMA.names).cast(TILE_SCHEMA)
        check_no_nulls(table, table.column_names, path, "re-run bmseg plan for this slide")
        for column in ("slide_id", "tile_id"):
            for value in pc.unique(table.column(column)).to_pylist():
                check_id(value, f"{path}: {column}")
        keys = pc.binary_join_element_wise(table["slide_id"], table["tile_id"], "/")
        if len(pc.unique(keys)) != table.num_rows:
            counts = pc.value_counts(keys).to_pylist()
            twice = sorted(c["values"] for c in counts if c["counts"] > 1)
            raise BmsegError(
                f"{path}: tile ids listed more than once ({', '.join(twice[:3])}); "
                "re-run bmseg plan for this slide"
            )
        for slide_id in sorted(set(table.column("slide_id").to_pylist())):
            if slide_id in owner:
                raise BmsegError(
                    f"{path}: slide id {slide_id!r} is also in {owner[slide_id]}; give each "
                    "slide once (re-plan one of them with another --slide-id)"
                )
            owner[slide_id] = path
        tables.append(table)
    return pa.concat_tables(tables) if tables else TILE_SCHEMA.empty_table()


def sample_keys(slide_ids: list[str], tile_ids: list[str], seed: int) -> np.ndarray:
    """A uniform pseudo-random key in [0, 1) per tile, fixed by seed, slide id and tile id."""
    keys = np.empty(len(tile_ids), np.float64)
    for index, (slide_id, tile_id) in enumerate(zip(slide_ids, tile_ids, strict=True)):
        digest = hashlib.blake2b(f"{seed}\0{slide_id}\0{tile_id}".encode(), digest_size=8)
        keys[index] = int.from_bytes(digest.digest(), "big") / 2**64
    return keys


def sample_batches(tiles: pa.Table, fraction: float, seed: int, batch_size: int) -> list[pa.Table]:
    """Sample ``fraction`` of ``tiles`` with ``seed`` and cut them into ordered batches."""
    slide_ids = tiles.column("slide_id").to_pylist()
    keys = sample_keys(slide_ids, tiles.column("tile_id").to_pylist(), seed)
    count = min(len(keys), max(1, round(fraction * len(keys)))) if len(keys) else 0
    chosen = np.sort(np.argsort(keys, kind="stable")[:count])
    sample = tiles.take(pa.array(chosen, pa.int64()))
    sample = sample.sort_by([("slide_id", "ascending"), ("row", "ascending"), ("col", "ascending")])
    batches = []
    for number, start in enumerate(range(0, sample.num_rows, batch_size)):
        batch = sample.slice(start, batch_size)
        batch = batch.append_column(
            pa.field("batch", pa.int32()), pa.array(np.full(batch.num_rows, number), pa.int32())
        )
        batch = batch.append_column(
            pa.field("order", pa.int32()), pa.array(np.arange(batch.num_rows), pa.int32())
        )
        batches.append(batch)
    return batches


def slide_list_path(batch_path: Path) -> Path:
    """``batch_NNNN.slides.json`` beside ``batch_NNNN.parquet``: the batch's slide ids."""
    return batch_path.with_suffix(SLIDE_LIST_SUFFIX)


def make_batches(
    tile_tables: Sequence[Path],
    out: Path,
    *,
    fraction: float = 1.0,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    require_tissue: bool = False,
) -> list[Path]:
    """BATCH: write ``batch_NNNN.parquet`` files (and their slide lists) to ``out``, as one
    output set (a rerun leaves only its own batches); return the tables' paths in ``out``.

    No tile at all is a warning, or with ``require_tissue`` (the pipeline's BATCH, which has
    nothing to hand SEGMENT then) an error saying why."""
    if not 0 < fraction <= 1:
        raise BmsegError(f"--fraction {fraction}: must lie in (0, 1], e.g. 0.1 for 10 % of tiles")
    if batch_size < 1:
        raise BmsegError(f"--batch-size {batch_size}: must be at least 1 tile")
    tile_tables, out = [Path(path) for path in tile_tables], Path(out)
    tiles = read_tile_tables(tile_tables)
    batches = sample_batches(tiles, fraction, seed, batch_size)
    if not batches and require_tissue:
        raise BmsegError(
            f"batch: no slide has a tissue tile in the {len(tile_tables)} tile tables, so "
            "there is nothing to segment: look at the slides' {slide}.tissue.png pictures, then "
            "lower bmseg plan's --min-tissue-fraction (the pipeline's --min_tissue_fraction) "
            "or check the slides"
        )
    if not batches:
        log.warning("batch: the %d tile tables hold no tiles; no batch written", len(tile_tables))
    written = []
    with output_set(out) as staging:
        for batch in batches:
            name = BATCH_TABLE_PATTERN.format(number=batch.column("batch")[0].as_py())
            path = write_parquet(batch, staging / name)
            write_json(sorted(set(batch.column("slide_id").to_pylist())), slide_list_path(path))
            written.append(out / name)
    sampled = sum(b.num_rows for b in batches)
    log.info(
        "batch: %d tiles from %d tables (%d slides); sampled %d (fraction %g, seed %d); "
        "wrote %d batches of up to %d tiles to %s",
        tiles.num_rows,
        len(tile_tables),
        len(set(tiles.column("slide_id").to_pylist())),
        sampled,
        fraction,
        seed,
        len(written),
        batch_size,
        out,
    )
    return written
