"""GATHER: SEGMENT's batch outputs become per-slide results a lab reads.

Per slide: the cell table (cells kept by two tiles resolved), the gallery crops, a GeoJSON that
QuPath imports as detections; for the run: ``summary.csv`` (counts and densities per mm² of
segmented tissue, size quantiles), plots, and the batches' timing records. Tables are streamed
row group by row group and the 2048-d embeddings (float16 bytes) are copied by Arrow, never
touched by Python; kept cells' uids are made unique across batches (docs/data.md).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from bmseg.cell_tables import dictionary_codes
from bmseg.contract import (
    BATCH_FILE,
    BATCHES_RECORD,
    CELLS_FILE,
    CELLS_SUFFIX,
    CROPS_FILE,
    CROPS_SUFFIX,
    EMBEDDING_COLUMN,
    GATHER_RECORD,
    GEOJSON_SUFFIX,
    INTENSITY_STATS,
    REQUIRED_COLUMNS,
    SLIDE_RECORD_SUFFIX,
    TISSUE_PICTURE_SUFFIX,
    check_id,
    feature_columns,
    intensity_column_parts,
    slide_file,
)
from bmseg.errors import BmsegError, reading
from bmseg.qupath import write_geojson
from bmseg.seams import find_duplicates
from bmseg.slide_records import SlidePlan, read_plans
from bmseg.storage import (
    check_complete,
    check_no_nulls,
    output_set,
    parquet_writer,
    unique_cell_uids,
    write_bytes,
    write_json,
)
from bmseg.summaries import summarise, write_summary
from bmseg.versions import package_versions

log = logging.getLogger(__name__)

ROW_GROUP_ROWS = 32768


@dataclass(frozen=True)
class BatchInput:
    """One SEGMENT output directory."""

    directory: Path
    cells: Path
    crops: Path | None
    record: dict


def read_batch_inputs(directories: Sequence[Path]) -> list[BatchInput]:
    """Validate SEGMENT output directories: files present, schema complete, no tile twice."""
    batches: list[BatchInput] = []
    seen_tiles: dict[tuple[str, str], Path] = {}
    if len(set(map(Path.resolve, directories))) != len(directories):
        raise BmsegError("BATCH_DIRS: a directory is given twice; pass each batch output once")
    for directory in directories:
        check_complete(directory)
        cells = directory / CELLS_FILE
        record_path = directory / BATCH_FILE
        for required in (cells, record_path):
            if not required.is_file():
                raise BmsegError(f"{required}: missing; pass SEGMENT output directories")
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
            tiles = [
                (check_id(t["slide_id"], f"{record_path}: slide_id"),
                 check_id(t["tile_id"], f"{record_path}: tile_id"))
                for t in record["tiles"]
            ]  # fmt: skip
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise BmsegError(
                f"{record_path}: not a SEGMENT batch record ({error}); re-run SEGMENT"
            ) from error
        missing = [c for c in REQUIRED_COLUMNS if c not in pq.read_schema(cells).names]
        if missing:
            raise BmsegError(
                f"{cells}: columns {', '.join(missing)} missing; re-run SEGMENT with this bmseg"
            )
        for tile in tiles:
            if tile in seen_tiles:
                raise BmsegError(
                    f"{directory}: tile {tile[0]}/{tile[1]} also in {seen_tiles[tile]}; "
                    "pass each batch output once"
                )
            seen_tiles[tile] = directory
        crops = directory / CROPS_FILE
        batches.append(BatchInput(directory, cells, crops if crops.is_file() else None, record))
    return batches


def segmented_tissue_mm2(plan: SlidePlan, tile_ids: set[str]) -> float:
    """Tissue area of the tiles that were segmented, the denominator of every density.

    With PLAN's tile table: the sum of tissue share × core area over those tiles. Without it:
    the slide's tissue area scaled by the share of kept tiles that were segmented.
    """
    if plan.tiles_table is not None:
        tiles = pq.read_table(
            plan.tiles_table, columns=["tile_id", "core_w", "core_h", "tissue_fraction"]
        ).to_pandas()
        tiles = tiles[tiles["tile_id"].isin(tile_ids)]
        core_px = tiles["core_w"].to_numpy(np.float64) * tiles["core_h"].to_numpy(np.float64)
        tissue_px = float(np.sum(core_px * tiles["tissue_fraction"].to_numpy(np.float64)))
        return tissue_px * plan.pixel_size_um**2 / 1e6
    share = min(1.0, len(tile_ids) / plan.tiles_kept) if plan.tiles_kept > 0 else 1.0
    return plan.tissue_area_mm2 * share


def unified_schema(sources: Sequence[Path]) -> pa.Schema:
    """The one schema of a run's tables, whatever channels each slide has (docs/data.md).

    Per-channel intensity columns (``intensity_{stat}_{channel}``) are the union over all
    sources, grouped by channel and placed where the first source has its own; a slide without
    a channel gets nulls in that channel's columns. Channels come in the order of the sorted
    distinct channel lists, so the schema does not depend on the order of the batch folders.
    Every other column must be the same in every source (one SEGMENT version).
    """
    schemas = [pq.read_schema(path) for path in sources]

    def fixed(schema: pa.Schema) -> pa.Schema:
        return pa.schema([f for f in schema if intensity_column_parts(f.name) is None])

    base = fixed(schemas[0])
    intensities: dict[str, pa.Field] = {}
    channel_lists = set()
    for path, schema in zip(sources, schemas, strict=True):
        own = [f for f in schema if intensity_column_parts(f.name) is not None]
        clashing = [f.name for f in own if intensities.get(f.name, f).type != f.type]
        if not fixed(schema).equals(base) or clashing:
            raise BmsegError(
                f"{path}: columns differ from {sources[0]} beyond the per-channel "
                "intensities; re-run SEGMENT with one bmseg version"
            )
        intensities.update((f.name, f) for f in own)
        parts = (intensity_column_parts(f.name) for f in own)
        channel_lists.add(tuple(dict.fromkeys(channel for _, channel in parts)))
    channels = dict.fromkeys(c for listed in sorted(channel_lists) for c in listed)
    channel_order = {channel: index for index, channel in enumerate(channels)}

    def position(field: pa.Field) -> tuple[int, int]:
        stat, channel = intensity_column_parts(field.name)
        return channel_order[channel], INTENSITY_STATS.index(stat)

    first_names = schemas[0].names
    first_intensity = next(
        (i for i, n in enumerate(first_names) if intensity_column_parts(n) is not None), None
    )
    at = (
        len(base)
        if first_intensity is None
        else sum(intensity_column_parts(n) is None for n in first_names[:first_intensity])
    )
    fields = list(base)
    fields[at:at] = sorted(intensities.values(), key=position)
    return pa.schema(fields)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` in ``schema``'s column order, columns it lacks filled with nulls."""
    columns = [
        table[f.name].cast(f.type)
        if f.name in table.column_names
        else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def read_cell_metadata(cells_files: Sequence[Path], schema: pa.Schema) -> pa.Table:
    """Every column but the embedding of all files, in file and row order, in ``schema``."""
    wanted = pa.schema([f for f in schema if f.name != EMBEDDING_COLUMN])
    tables = []
    for path in cells_files:
        with reading(path, "re-run SEGMENT for this batch"):
            names = [n for n in pq.read_schema(path).names if n != EMBEDDING_COLUMN]
            table = pq.read_table(path, columns=names)
        check_no_nulls(table, REQUIRED_COLUMNS, path, "re-run SEGMENT for this batch")
        try:
            tables.append(conform(table, wanted))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
            raise BmsegError(
                f"{path}: column types differ from the other cell tables ({error}); "
                "re-run SEGMENT with one bmseg version"
            ) from error
    return pa.concat_tables(tables).combine_chunks()


def unique_kept_uids(meta: pa.Table, keep: np.ndarray) -> tuple[pa.Array, int]:
    """Every row's ``cell_uid``, kept cells made unique; and how many were renamed.

    SEGMENT's uids are unique within a batch; two distinct cells of different batches whose
    centroids round to the same pixel can still share one. Kept cells sharing a uid are taken
    by ``tile_id`` then ``mask_label`` (independent of the order of the batch folders): the
    first keeps it, the others get the next free ``:2``, ``:3``... as in SEGMENT.
    """
    uids = meta["cell_uid"].combine_chunks()
    kept_rows = np.flatnonzero(keep)
    codes = pc.dictionary_encode(uids.take(kept_rows)).indices.to_numpy()
    shared = np.bincount(codes)[codes] > 1
    if not shared.any():
        return uids, 0
    rows = kept_rows[shared]
    order = pc.sort_indices(
        meta.select(["cell_uid", "tile_id", "mask_label"]).take(rows),
        [("cell_uid", "ascending"), ("tile_id", "ascending"), ("mask_label", "ascending")],
    )
    rows = rows[order.to_numpy()]
    before = uids.take(rows).to_numpy(zero_copy_only=False)
    after = unique_cell_uids(before, set(uids.take(kept_rows[~shared]).to_pylist()))
    values = uids.to_numpy(zero_copy_only=False).copy()
    values[rows] = after
    return pa.array(values, pa.string()), int(np.count_nonzero(before != after))


class _SlideWriters:
    """One Parquet writer per slide (renamed into place when the ExitStack closes), buffered.

    Buffering to ``ROW_GROUP_ROWS`` keeps row groups large however the inputs are split.
    """

    def __init__(self, stack: contextlib.ExitStack, paths: dict[str, Path], schema: pa.Schema):
        self._schema = schema
        self._writers = {
            slide: stack.enter_context(parquet_writer(path, schema))
            for slide, path in paths.items()
        }
        self._pending: dict[str, list[pa.Table]] = {slide: [] for slide in paths}

    def write(self, slide: str, table: pa.Table) -> None:
        """Queue ``table`` for ``slide``; flush once a row group's worth is queued."""
        self._pending[slide].append(conform(table, self._schema))
        if sum(t.num_rows for t in self._pending[slide]) >= ROW_GROUP_ROWS:
            self._flush(slide)

    def _flush(self, slide: str) -> None:
        if self._pending[slide]:
            table = pa.concat_tables(self._pending[slide])
            self._writers[slide].write_table(table, row_group_size=ROW_GROUP_ROWS)
            self._pending[slide] = []

    def flush_all(self) -> None:
        """Write what is queued; the files are closed and renamed when the ExitStack closes."""
        for slide in self._writers:
            self._flush(slide)


def _stream_rows(
    sources: Sequence[Path],
    slide_per_row: Sequence[np.ndarray],
    uid_per_row: Sequence[pa.Array] | None,
    slides: list[str],
    out_paths: dict[str, Path],
    what: str,
) -> None:
    """Copy rows of ``sources`` into per-slide files; ``slide_per_row`` holds codes, -1 = drop.

    ``uid_per_row``, when given, replaces each source's ``cell_uid`` column. Every output has
    the sources' :func:`unified_schema`.
    """
    schema = unified_schema(sources)
    total_rows = sum(len(codes) for codes in slide_per_row)
    with (
        contextlib.ExitStack() as stack,
        tqdm(total=total_rows, unit="cells", desc=f"gather {what}", leave=False) as progress,
    ):
        writers = _SlideWriters(stack, out_paths, schema)
        for index, (source, codes) in enumerate(zip(sources, slide_per_row, strict=True)):
            parquet = pq.ParquetFile(source)
            start = 0
            for group in range(parquet.num_row_groups):
                table = parquet.read_row_group(group)
                chunk = codes[start : start + table.num_rows]
                if uid_per_row is not None:
                    uids = uid_per_row[index].slice(start, table.num_rows)
                    table = table.set_column(
                        table.schema.get_field_index("cell_uid"), "cell_uid", uids
                    )
                start += table.num_rows
                for code in np.unique(chunk[chunk >= 0]):
                    writers.write(slides[code], table.filter(pa.array(chunk == code)))
                progress.update(table.num_rows)
        writers.flush_all()


def gather(
    batch_dirs: Sequence[Path], plans_dir: Path, out: Path, *, min_overlap: float = 0.5
) -> Path:
    """``bmseg gather``: validate everything, then write per-slide tables and run summaries.

    ``batch_dirs`` are SEGMENT's output folders, ``plans_dir`` the folder PLAN wrote; two cells
    of different tiles whose contours overlap by ``min_overlap`` of the smaller are one cell
    (the higher score is kept). ``out`` receives, as one output set, per slide the cell and crop
    tables, the QuPath GeoJSON and PLAN's record and picture; for the run the summary, its
    plots, the batches' records and ``gather.json``. Returns ``out``.
    """
    if not 0.0 < min_overlap <= 1.0:
        raise BmsegError(f"--min-overlap {min_overlap}: must lie in (0, 1]")
    batches = read_batch_inputs(list(batch_dirs))
    tiles_by_slide: dict[str, set[str]] = {}
    for batch in batches:
        for tile in batch.record["tiles"]:
            tiles_by_slide.setdefault(tile["slide_id"], set()).add(tile["tile_id"])
    cells_files = [b.cells for b in batches]
    meta = read_cell_metadata(cells_files, unified_schema(cells_files))
    unknown = set(pc.unique(meta["slide_id"]).to_pylist()) - set(tiles_by_slide)
    if unknown:
        raise BmsegError(
            f"{batches[0].directory}: cells of slides {sorted(unknown)} but no tiles in any "
            "batch.json; pass complete SEGMENT outputs"
        )
    plans = read_plans(plans_dir, tiles_by_slide)
    log.info("read %d cells from %d batches, %d slides", meta.num_rows, len(batches), len(plans))

    dropped, compared = find_duplicates(meta, min_overlap)
    keep = np.ones(meta.num_rows, bool)
    keep[dropped] = False
    log.info(
        "compared %d cell pairs across tile seams; %d duplicates removed", compared, len(dropped)
    )

    read_uids = meta["cell_uid"].combine_chunks()
    uids, renamed = unique_kept_uids(meta, keep)
    if renamed:
        log.info("%d kept cells shared a cell_uid with another batch's: suffixed", renamed)
        meta = meta.set_column(meta.schema.get_field_index("cell_uid"), "cell_uid", uids)

    slides = sorted(plans)
    slide_code, slide_values = dictionary_codes(meta["slide_id"])
    slide_index = {s: i for i, s in enumerate(slides)}
    row_slide = np.array([slide_index[s] for s in slide_values], np.int64)[slide_code]
    per_slide_dropped = np.bincount(row_slide[dropped], minlength=len(slides))
    row_slide[~keep] = -1
    kept_meta = meta.filter(pa.array(keep))
    with output_set(out) as staging:
        _write_tables(batches, row_slide, read_uids, uids if renamed else None, slides, staging)
        _write_slide_files(kept_meta, plans, staging)
        tissue = pd.DataFrame(
            {
                "slide_id": slides,
                "pixel_size_um": [plans[s].pixel_size_um for s in slides],
                "tissue_area_mm2": [plans[s].tissue_area_mm2 for s in slides],
                "tiles_segmented": [len(tiles_by_slide[s]) for s in slides],
                "segmented_tissue_mm2": [
                    segmented_tissue_mm2(plans[s], tiles_by_slide[s]) for s in slides
                ],
                "duplicates_removed": per_slide_dropped,
            }
        ).set_index("slide_id")
        cells_frame = kept_meta.select(["slide_id", "cell_type", "area_um2"]).to_pandas()
        write_summary(summarise(cells_frame, tissue), cells_frame, staging)
        write_json(
            {"batches": [dict(b.record, directory=b.directory.name) for b in batches]},
            staging / BATCHES_RECORD,
        )
        write_json(
            {
                "cells_read": meta.num_rows,
                "cells_kept": kept_meta.num_rows,
                "pairs_compared": compared,
                "duplicates_removed": len(dropped),
                "uids_suffixed": renamed,
                "min_overlap": min_overlap,
                "slides": slides,
                "versions": package_versions(),
            },
            staging / GATHER_RECORD,
        )
    log.info(
        "wrote %d cells of %d slides, summary, GeoJSON and plots to %s",
        kept_meta.num_rows,
        len(slides),
        out,
    )
    return out


def _write_tables(
    batches: Sequence[BatchInput],
    row_slide: np.ndarray,
    read_uids: pa.Array,
    new_uids: pa.Array | None,
    slides: list[str],
    out: Path,
) -> None:
    """Per-slide cell and crop tables from the batches' rows, ``row_slide`` -1 = dropped.

    ``read_uids`` are the uids as the batches hold them, ``new_uids`` (when some were
    suffixed) the uids to write instead, both over all batches' rows in order.
    """
    batch_rows = np.cumsum([0] + [pq.ParquetFile(b.cells).metadata.num_rows for b in batches])
    batch_slices = [slice(int(start), int(stop)) for start, stop in itertools.pairwise(batch_rows)]
    _stream_rows(
        [b.cells for b in batches],
        [row_slide[rows] for rows in batch_slices],
        None if new_uids is None else [new_uids[rows] for rows in batch_slices],
        slides,
        {s: out / slide_file(s, CELLS_SUFFIX) for s in slides},
        "cells",
    )
    with_crops = [i for i, b in enumerate(batches) if b.crops is not None]
    if not with_crops:
        return
    # A crop belongs to the cell of its own batch with its (batch-unique) uid.
    crop_codes, crop_uids = [], []
    for i in with_crops:
        crop_of = pq.read_table(batches[i].crops, columns=["cell_uid"])["cell_uid"]
        local = pc.index_in(crop_of, value_set=read_uids[batch_slices[i]])
        local = local.fill_null(-1).to_numpy()
        rows = batch_rows[i] + local.clip(0)
        crop_codes.append(np.where(local >= 0, row_slide[rows], -1))
        if new_uids is not None:
            crop_uids.append(new_uids.take(rows))
    _stream_rows(
        [batches[i].crops for i in with_crops],
        crop_codes,
        None if new_uids is None else crop_uids,
        slides,
        {s: out / slide_file(s, CROPS_SUFFIX) for s in slides},
        "crops",
    )


def _write_slide_files(kept_meta: pa.Table, plans: dict[str, SlidePlan], out: Path) -> None:
    """Per slide: the QuPath GeoJSON of its kept cells, PLAN's record and tissue picture."""
    measurements = feature_columns(kept_meta.schema)
    for slide, plan in sorted(plans.items()):
        slide_meta = kept_meta.filter(pc.equal(kept_meta["slide_id"], slide))
        origin = (plan.origin_x, plan.origin_y)
        write_geojson(slide_meta, origin, measurements, out / slide_file(slide, GEOJSON_SUFFIX))
        write_bytes(plan.slide_json.read_bytes(), out / slide_file(slide, SLIDE_RECORD_SUFFIX))
        if plan.tissue_png is not None:
            picture = out / slide_file(slide, TISSUE_PICTURE_SUFFIX)
            write_bytes(plan.tissue_png.read_bytes(), picture)
