"""GATHER: SEGMENT's batch outputs become per-slide results a lab reads.

Per slide: the cell table (cells kept by two tiles resolved), the gallery crops, a GeoJSON that
QuPath imports as detections; for the run: ``summary.csv`` (counts and densities per mm² of
segmented tissue, size quantiles), plots, and the batches' timing records. Tables are streamed
row group by row group and the 2048-d embeddings (float16 bytes) are copied by Arrow, never
touched by Python; kept cells' uids are made unique across batches (docs/data.md).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bmseg.contract import (
    BATCH_FILE,
    BATCHES_RECORD,
    CELL_TYPES,
    CELLS_FILE,
    CROPS_FILE,
    EMBEDDING_COLUMN,
    GATHER_RECORD,
    REJECTED_CLASS,
    REQUIRED_COLUMNS,
    SUMMARY_FILE,
    check_id,
    feature_columns,
)
from bmseg.errors import BmsegError, reading
from bmseg.storage import (
    atomic_path,
    check_complete,
    check_no_nulls,
    parquet_writer,
    unique_cell_uids,
    write_bytes,
    write_json,
    writes_output_set,
)
from bmseg.versions import package_versions

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

TYPE_COLOURS = {"MK": (220, 50, 47), "HSPC": (38, 139, 210)}
CLASS_COLOURS = {**TYPE_COLOURS, REJECTED_CLASS: (150, 150, 150)}
CELL_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/bmseg/bmseg/cell_uid")
"""Namespace of the version-5 UUIDs that identify cells in GeoJSON (docs/results.md)."""
AREA_QUANTILES = (10, 25, 50, 75, 90)
ROW_GROUP_ROWS = 32768
GEOJSON_CHUNK = 50000
# Numeric columns that locate a cell rather than describe it: never features or measurements.


@dataclass(frozen=True)
class BatchInput:
    """One SEGMENT output directory."""

    directory: Path
    cells: Path
    crops: Path | None
    record: dict


@dataclass(frozen=True)
class SlidePlan:
    """What GATHER needs from PLAN's ``{slide}.slide.json`` (and its neighbours)."""

    slide_id: str
    pixel_size_um: float
    origin_x: float
    origin_y: float
    tissue_area_mm2: float
    tiles_kept: int
    slide_json: Path
    tissue_png: Path | None
    tiles_table: Path | None


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


def read_plans(plans_dir: Path, slide_ids: Iterable[str]) -> dict[str, SlidePlan]:
    """Read ``{slide}.slide.json`` for every slide; a missing or incomplete one is an error."""
    plans: dict[str, SlidePlan] = {}
    for slide_id in sorted(slide_ids):
        path = plans_dir / f"{slide_id}.slide.json"
        if not path.is_file():
            raise BmsegError(f"{path}: missing; pass --plans the directory PLAN wrote")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            bounds = data["bounds"]
            plan = SlidePlan(
                slide_id=slide_id,
                pixel_size_um=float(data["pixel_size_um"]),
                origin_x=float(bounds["x"]),
                origin_y=float(bounds["y"]),
                tissue_area_mm2=float(data["tissue_area_mm2"]),
                tiles_kept=int(data.get("tiles_kept", 0)),
                slide_json=path,
                tissue_png=_existing(plans_dir / f"{slide_id}.tissue.png"),
                tiles_table=_existing(plans_dir / f"{slide_id}.tiles.parquet"),
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise BmsegError(f"{path}: not a PLAN slide record ({error}); re-run PLAN") from error
        plans[slide_id] = plan
    return plans


def _existing(path: Path) -> Path | None:
    return path if path.is_file() else None


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
    from bmseg.contract import INTENSITY_STATS, intensity_column_parts

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


def _codes(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, list[str]]:
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


def _overlap_over_smaller(
    first: int, second: int, contours: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> float:
    """Overlap of two cells' filled contours divided by the smaller area (rasterised)."""
    import cv2

    flat_x, flat_y, offsets = contours
    polygons = [
        np.stack([flat_x[offsets[i] : offsets[i + 1]], flat_y[offsets[i] : offsets[i + 1]]], 1)
        for i in (first, second)
    ]
    if min(len(p) for p in polygons) < 3:
        return 0.0
    stacked = np.concatenate(polygons)
    origin = np.floor(stacked.min(axis=0))
    size = np.ceil(stacked.max(axis=0) - origin).astype(int) + 2
    masks = []
    for polygon in polygons:
        mask = np.zeros((size[1], size[0]), np.uint8)
        cv2.fillPoly(mask, [np.rint(polygon - origin).astype(np.int32)], 1)
        masks.append(mask.astype(bool))
    smaller = min(int(m.sum()) for m in masks)
    return float(np.count_nonzero(masks[0] & masks[1])) / smaller if smaller else 0.0


def find_duplicates(meta: pa.Table, min_overlap: float = 0.5) -> tuple[np.ndarray, int]:
    """Rows to drop because another tile kept the same cell with a higher score.

    Two cells of one slide and type from different tiles are the same cell when their filled
    contours overlap by ``min_overlap`` of the smaller one. Candidates come from a spatial
    index: tiles whose cell envelopes meet, then the cells of one tile inside the other's
    envelope, then bounding boxes whose intersection could hold that overlap. Returns the
    row indices to drop and the number of pairs whose contours were compared.
    """
    slide_code, _ = _codes(meta["slide_id"])
    type_code, _ = _codes(meta["cell_type"])
    tile_code, _ = _codes(meta["tile_id"])
    x0 = meta["bbox_x_px"].to_numpy().astype(np.float64)
    y0 = meta["bbox_y_px"].to_numpy().astype(np.float64)
    x1 = x0 + meta["bbox_w_px"].to_numpy()
    y1 = y0 + meta["bbox_h_px"].to_numpy()
    area = meta["area_px"].to_numpy()
    score = meta["score"].to_numpy()
    uids = meta["cell_uid"].to_numpy(zero_copy_only=False)
    contours = flat_contours(meta)
    group = slide_code.astype(np.int64) * (int(type_code.max(initial=0)) + 1) + type_code
    drop: set[int] = set()
    compared = 0
    for group_id in np.unique(group):
        rows = np.flatnonzero(group == group_id)
        rows = rows[np.argsort(tile_code[rows], kind="stable")]
        tiles, starts = np.unique(tile_code[rows], return_index=True)
        if len(tiles) < 2:
            continue
        ends = np.append(starts[1:], len(rows))
        env = [np.minimum.reduceat(x0[rows], starts), np.minimum.reduceat(y0[rows], starts)]
        env += [np.maximum.reduceat(x1[rows], starts), np.maximum.reduceat(y1[rows], starts)]
        meets = (env[0][:, None] < env[2][None, :]) & (env[2][:, None] > env[0][None, :])
        meets &= (env[1][:, None] < env[3][None, :]) & (env[3][:, None] > env[1][None, :])
        for a, b in zip(*np.nonzero(np.triu(meets, 1)), strict=True):
            cells_a = rows[starts[a] : ends[a]]
            cells_b = rows[starts[b] : ends[b]]
            cells_a = cells_a[
                (x0[cells_a] < env[2][b])
                & (x1[cells_a] > env[0][b])
                & (y0[cells_a] < env[3][b])
                & (y1[cells_a] > env[1][b])
            ]
            cells_b = cells_b[
                (x0[cells_b] < env[2][a])
                & (x1[cells_b] > env[0][a])
                & (y0[cells_b] < env[3][a])
                & (y1[cells_b] > env[1][a])
            ]
            if not len(cells_a) or not len(cells_b):
                continue
            inter_w = np.minimum(x1[cells_a][:, None], x1[cells_b]) - np.maximum(
                x0[cells_a][:, None], x0[cells_b]
            )
            inter_h = np.minimum(y1[cells_a][:, None], y1[cells_b]) - np.maximum(
                y0[cells_a][:, None], y0[cells_b]
            )
            smaller = np.minimum(area[cells_a][:, None], area[cells_b])
            # Mask overlap never exceeds the boxes' intersection; 0.8 leaves room for rounding.
            possible = (inter_w > 0) & (inter_h > 0)
            possible &= inter_w * inter_h >= 0.8 * min_overlap * smaller
            for i, j in zip(*np.nonzero(possible), strict=True):
                first, second = int(cells_a[i]), int(cells_b[j])
                compared += 1
                if _overlap_over_smaller(first, second, contours) >= min_overlap:
                    first_wins = (score[first], uids[second]) > (score[second], uids[first])
                    drop.add(second if first_wins else first)
    return np.array(sorted(drop), dtype=np.int64), compared


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
    from tqdm import tqdm

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


def summarise(cells: pd.DataFrame, tissue: pd.DataFrame) -> pd.DataFrame:
    """One row per slide: tissue, counts, densities per mm² of segmented tissue, size quantiles.

    ``cells`` needs ``slide_id``, ``cell_type``, ``area_um2`` and optionally classifier
    ``{type}_label`` columns (then accepted counts and densities are added); ``tissue`` is
    indexed by slide and holds ``segmented_tissue_mm2`` and any other per-slide columns to keep.
    """
    summary = tissue.copy()
    for cell_type in CELL_TYPES:
        of_type = cells[cells["cell_type"] == cell_type]
        grouped = of_type.groupby("slide_id")
        count = grouped.size().reindex(summary.index, fill_value=0)
        summary[f"{cell_type}_count"] = count
        summary[f"{cell_type}_per_mm2"] = count / summary["segmented_tissue_mm2"]
        label_column = f"{cell_type.lower()}_label"
        if label_column in of_type:
            accepted = of_type[of_type[label_column].fillna(False).astype(bool)]
            accepted_count = accepted.groupby("slide_id").size()
            accepted_count = accepted_count.reindex(summary.index, fill_value=0)
            summary[f"{cell_type}_accepted"] = accepted_count
            summary[f"{cell_type}_accepted_per_mm2"] = (
                accepted_count / summary["segmented_tissue_mm2"]
            )
        for q in AREA_QUANTILES:
            summary[f"{cell_type}_area_um2_p{q}"] = grouped["area_um2"].quantile(q / 100)
    return summary.reset_index()


def density_plot_png(summary: pd.DataFrame) -> bytes:
    """Bar chart of cells per mm² of segmented tissue, per slide and cell type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slides = summary["slide_id"].astype(str).tolist()
    fig, axes = plt.subplots(
        1, len(CELL_TYPES), figsize=(5 * len(CELL_TYPES), 0.35 * len(slides) + 1.8)
    )
    for axis, cell_type in zip(axes, CELL_TYPES, strict=True):
        positions = np.arange(len(slides))
        colour = np.array(TYPE_COLOURS[cell_type]) / 255
        axis.barh(
            positions, summary[f"{cell_type}_per_mm2"], color=colour, alpha=0.35, label="detected"
        )
        if f"{cell_type}_accepted_per_mm2" in summary:
            axis.barh(
                positions,
                summary[f"{cell_type}_accepted_per_mm2"],
                color=colour,
                label="accepted by classifier",
            )
            axis.legend(loc="lower right", fontsize=8)
        axis.set_yticks(positions, slides, fontsize=8)
        axis.invert_yaxis()
        axis.set_xlabel("cells per mm² of segmented tissue")
        axis.set_title(cell_type)
    fig.tight_layout()
    return png_bytes(fig)


def area_histogram_png(cells: pd.DataFrame) -> bytes:
    """Histograms of cell area (µm², log scale) per cell type, all slides pooled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CELL_TYPES), figsize=(5 * len(CELL_TYPES), 3.2))
    for axis, cell_type in zip(axes, CELL_TYPES, strict=True):
        areas = cells.loc[cells["cell_type"] == cell_type, "area_um2"].to_numpy()
        areas = areas[np.isfinite(areas) & (areas > 0)]
        if len(areas):
            bins = np.geomspace(areas.min(), areas.max() * 1.0001, 50)
            axis.hist(areas, bins=bins, color=np.array(TYPE_COLOURS[cell_type]) / 255)
            axis.set_xscale("log")
        axis.set_title(f"{cell_type} (n = {len(areas):,})")
        axis.set_xlabel("area µm²")
        axis.set_ylabel("cells")
    fig.tight_layout()
    return png_bytes(fig)


def png_bytes(fig) -> bytes:
    """Render a matplotlib figure as PNG bytes and free it."""
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _number_strings(values: np.ndarray, decimals: int, non_finite: str = "null") -> pa.Array:
    """Numbers as JSON text, non-finite values as ``non_finite``."""
    array = pa.array(np.round(values.astype(np.float64), decimals))
    text = pc.cast(array, pa.string())
    return pc.if_else(pc.is_finite(array), text, pa.scalar(non_finite))


def cell_uuids(uids: pa.Array | pa.ChunkedArray) -> pa.Array:
    """RFC 4122 version-5 UUIDs of cell uids under :data:`CELL_UUID_NAMESPACE`, as strings.

    Equal to ``str(uuid.uuid5(CELL_UUID_NAMESPACE, uid))``: QuPath keeps a feature's ``id`` as
    the object's id only when it is a UUID, so the same cell gets the same id in every file
    and every run. One SHA-1 per cell; the bit setting and hex formatting are numpy.
    """
    import hashlib

    prefix = CELL_UUID_NAMESPACE.bytes
    values = uids.to_pylist()
    digests = b"".join(hashlib.sha1(prefix + u.encode("utf-8")).digest()[:16] for u in values)
    raw = np.frombuffer(digests, np.uint8).reshape(-1, 16).copy()
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x50  # version 5
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
    hexed = np.frombuffer(raw.tobytes().hex().encode("ascii"), np.uint8).reshape(-1, 32)
    text = np.full((len(values), 36), ord("-"), np.uint8)
    text[:, [i for i in range(36) if i not in (8, 13, 18, 23)]] = hexed
    offsets = np.arange(0, 36 * (len(values) + 1), 36, dtype=np.int32)
    return pa.StringArray.from_buffers(
        len(values), pa.py_buffer(offsets.tobytes()), pa.py_buffer(text.tobytes())
    )


def geojson_features(
    meta: pa.Table, origin: tuple[float, float], measurements: Sequence[str], classes: pa.Array
) -> pa.Array:
    """One GeoJSON Feature (JSON text) per cell, built column-wise by Arrow.

    The feature ``id`` is the cell's :func:`cell_uuids`; its ``name`` and ``metadata.cell_uid``
    are the cell uid (QuPath's measurements are numbers only), ``classes`` its classification.
    Coordinates are full-resolution pixels relative to the slide's top-left corner (slide
    coordinates minus the bounds origin), the frame QuPath shows when it opens the slide.
    Cells whose contour has fewer than three vertices get their bounding box as polygon.
    Non-finite measurements are written as the string ``"NaN"``, as QuPath writes them.
    """
    flat_x, flat_y, offsets = flat_contours(meta)
    lengths = np.diff(offsets)
    degenerate = lengths < 3
    if degenerate.any():
        x0 = meta["bbox_x_px"].to_numpy().astype(np.float64)
        y0 = meta["bbox_y_px"].to_numpy().astype(np.float64)
        x1 = x0 + meta["bbox_w_px"].to_numpy()
        y1 = y0 + meta["bbox_h_px"].to_numpy()
        lengths = np.where(degenerate, 4, lengths)
        new_offsets = np.concatenate([[0], np.cumsum(lengths)])
        keep = np.repeat(~degenerate, np.diff(offsets))
        new_x = np.empty(new_offsets[-1])
        new_y = np.empty(new_offsets[-1])
        target = np.repeat(~degenerate, lengths)
        new_x[target], new_y[target] = flat_x[keep], flat_y[keep]
        box_x = np.stack([x0, x1, x1, x0], 1)[degenerate].ravel()
        box_y = np.stack([y0, y0, y1, y1], 1)[degenerate].ravel()
        new_x[~target], new_y[~target] = box_x, box_y
        flat_x, flat_y, offsets = new_x, new_y, new_offsets
    points = pc.binary_join_element_wise(
        "[",
        _number_strings(flat_x - origin[0], 2),
        ",",
        _number_strings(flat_y - origin[1], 2),
        "]",
        "",
    )
    first_points = points.take(pa.array(offsets[:-1]))
    rings = pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), points), ",")
    colours = {t: ",".join(map(str, c)) for t, c in CLASS_COLOURS.items()}
    encoded = classes.dictionary_encode()
    colour = pa.array(
        [colours.get(t, "128,128,128") for t in encoded.dictionary.to_pylist()], pa.string()
    ).take(encoded.indices)
    measured = [
        pc.binary_join_element_wise(
            json.dumps(name) + ":",
            _number_strings(meta[name].to_numpy(zero_copy_only=False), 4, '"NaN"'),
            "",
        )
        for name in measurements
    ]
    measurement_text = pc.binary_join_element_wise(*measured, ",") if measured else pa.scalar("")
    uids = meta["cell_uid"].combine_chunks()
    return pc.binary_join_element_wise(
        '{"type":"Feature","id":"',
        cell_uuids(uids),
        '","geometry":{"type":"Polygon","coordinates":[[',
        rings,
        ",",
        first_points,
        ']]},"properties":{"objectType":"detection","name":"',
        uids,
        '","classification":{"name":"',
        classes,
        '","color":[',
        colour,
        ']},"metadata":{"cell_uid":"',
        uids,
        '","cell_type":"',
        meta["cell_type"].combine_chunks(),
        '"},"measurements":{',
        measurement_text,
        "}}}",
        "",
    )


def write_geojson(
    meta: pa.Table,
    origin: tuple[float, float],
    measurements: Sequence[str],
    path: Path,
    classes: pa.Array | None = None,
) -> None:
    """Write a FeatureCollection of ``meta``'s cells to ``path`` (atomically, in chunks).

    ``classes`` (one QuPath class name per row) defaults to each cell's type.
    """
    for column in ("cell_uid", "cell_type"):
        unsafe = pc.any(pc.match_substring_regex(meta[column], r'["\\\x00-\x1f]')).as_py()
        if unsafe:
            raise BmsegError(f"{path}: {column} with quotes or control characters; re-run SEGMENT")
    classes = meta["cell_type"].combine_chunks() if classes is None else classes
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        handle.write(b'{"type":"FeatureCollection","features":[\n')
        for start in range(0, meta.num_rows, GEOJSON_CHUNK):
            features = geojson_features(
                meta.slice(start, GEOJSON_CHUNK),
                origin,
                measurements,
                classes.slice(start, GEOJSON_CHUNK),
            )
            if start:
                handle.write(b",\n")
            # One Arrow join, written from its buffer: no Python string per feature.
            whole = pa.ListArray.from_arrays(pa.array([0, len(features)], pa.int32()), features)
            handle.write(pc.binary_join(whole, ",\n")[0].as_buffer())
        handle.write(b"\n]}\n")


@writes_output_set
def run_gather(args: argparse.Namespace) -> int:
    """``bmseg gather``: validate everything, then write per-slide tables and run summaries."""
    if not 0.0 < args.min_overlap <= 1.0:
        raise BmsegError(f"--min-overlap {args.min_overlap}: must lie in (0, 1]")
    batches = read_batch_inputs([Path(d) for d in args.batch_dirs])
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
    plans = read_plans(Path(args.plans), tiles_by_slide)
    log.info("read %d cells from %d batches, %d slides", meta.num_rows, len(batches), len(plans))

    dropped, compared = find_duplicates(meta, args.min_overlap)
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

    out = Path(args.out)
    slides = sorted(plans)
    slide_index = {s: i for i, s in enumerate(slides)}
    slide_code, slide_values = _codes(meta["slide_id"])
    row_slide = np.array([slide_index[s] for s in slide_values], np.int64)[slide_code]
    per_slide_dropped = np.bincount(row_slide[dropped], minlength=len(slides))
    row_slide[~keep] = -1
    batch_rows = np.cumsum([0] + [pq.ParquetFile(b.cells).metadata.num_rows for b in batches])
    batch_slices = [slice(int(start), int(stop)) for start, stop in itertools.pairwise(batch_rows)]
    _stream_rows(
        [b.cells for b in batches],
        [row_slide[rows] for rows in batch_slices],
        [uids[rows] for rows in batch_slices] if renamed else None,
        slides,
        {s: out / f"{s}.cells.parquet" for s in slides},
        "cells",
    )
    with_crops = [i for i, b in enumerate(batches) if b.crops is not None]
    if with_crops:
        # A crop belongs to the cell of its own batch with its (batch-unique) uid.
        crop_codes, crop_uids = [], []
        for i in with_crops:
            crop_of = pq.read_table(batches[i].crops, columns=["cell_uid"])["cell_uid"]
            local = pc.index_in(crop_of, value_set=read_uids[batch_slices[i]])
            local = local.fill_null(-1).to_numpy()
            rows = batch_rows[i] + local.clip(0)
            crop_codes.append(np.where(local >= 0, row_slide[rows], -1))
            if renamed:
                crop_uids.append(uids.take(rows))
        _stream_rows(
            [batches[i].crops for i in with_crops],
            crop_codes,
            crop_uids if renamed else None,
            slides,
            {s: out / f"{s}.crops.parquet" for s in slides},
            "crops",
        )

    kept_meta = meta.filter(pa.array(keep))
    measurements = feature_columns(kept_meta.schema)
    for slide in slides:
        plan = plans[slide]
        slide_meta = kept_meta.filter(pc.equal(kept_meta["slide_id"], slide))
        write_geojson(
            slide_meta,
            (plan.origin_x, plan.origin_y),
            measurements,
            out / f"{slide}.cells.geojson",
        )
        write_bytes(plan.slide_json.read_bytes(), out / f"{slide}.slide.json")
        if plan.tissue_png is not None:
            write_bytes(plan.tissue_png.read_bytes(), out / f"{slide}.tissue.png")

    import pandas as pd

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
    summary = summarise(cells_frame, tissue)
    with atomic_path(out / SUMMARY_FILE) as tmp:
        summary.to_csv(tmp, index=False, float_format="%.6g")
    write_bytes(density_plot_png(summary), out / "density.png")
    write_bytes(area_histogram_png(cells_frame), out / "area_histograms.png")
    write_json(
        {"batches": [dict(b.record, directory=b.directory.name) for b in batches]},
        out / BATCHES_RECORD,
    )
    write_json(
        {
            "cells_read": meta.num_rows,
            "cells_kept": kept_meta.num_rows,
            "pairs_compared": compared,
            "duplicates_removed": len(dropped),
            "uids_suffixed": renamed,
            "min_overlap": args.min_overlap,
            "slides": slides,
            "versions": package_versions(),
        },
        out / GATHER_RECORD,
    )
    log.info(
        "wrote %d cells of %d slides, summary, GeoJSON and plots to %s",
        kept_meta.num_rows,
        len(slides),
        out,
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bmseg gather``."""
    parser = subparsers.add_parser(
        "gather",
        help="per-slide cell tables, summary.csv, QuPath GeoJSON and plots from batch outputs",
        description="Gather SEGMENT batch outputs into per-slide results; cells that two tiles "
        "both kept are resolved (overlap over the smaller area >= --min-overlap keeps the "
        "higher score).",
    )
    parser.add_argument(
        "batch_dirs",
        nargs="+",
        metavar="BATCH_DIR",
        help="SEGMENT output directories (cells.parquet, batch.json, ...)",
    )
    parser.add_argument(
        "--plans",
        required=True,
        metavar="DIR",
        help="directory with PLAN's {slide}.slide.json and {slide}.tissue.png",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument(
        "--min-overlap",
        type=float,
        default=0.5,
        help="overlap over the smaller cell that makes two cells one (0.5)",
    )
    parser.set_defaults(handler=run_gather)
