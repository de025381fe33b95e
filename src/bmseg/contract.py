"""The data contract between bmseg's steps: file names, table schemas, column rules, id rules.

Every step writes and reads its neighbours' files by the names and schemas defined here, and
the tests build their tables from the same definitions; docs/data.md describes each file in
words. Nothing here reads or writes a file.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import pyarrow as pa

from bmseg.errors import BmsegError

# --- ids -------------------------------------------------------------------------------------

ID_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
MAX_ID_LENGTH = 100
"""Longest slide, tile or cell-type id: with a temporary prefix and suffix a file named by it
stays under NAME_MAX (255 bytes), and a cell uid built from it under the label server's cap."""


def check_id(value: object, where: str) -> str:
    """``value`` if it is a safe id, else a BmsegError naming ``where`` (the file or flag).

    The one rule for every id that names a file, folder, HDF5 group or table row (slide ids,
    tile ids, cell types), checked wherever an id is read, not only where it is made:
    1 to :data:`MAX_ID_LENGTH` characters of ``[A-Za-z0-9._-]``, the first not ``.`` or ``-``,
    so no id is ``..``, starts a hidden file, leaves its folder or reads as a flag.
    """
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise BmsegError(
            f"{where} {value!r}: not a valid id; use letters, digits, '.', '_' and '-', "
            "not starting with '.' or '-'"
        )
    if len(value) > MAX_ID_LENGTH:
        raise BmsegError(
            f"{where} {value[:20]!r}... is {len(value)} characters long; an id holds at most "
            f"{MAX_ID_LENGTH}"
        )
    return value


def tile_id(row: int, col: int) -> str:
    """PLAN's id of the tile at grid ``row`` and ``col``: ``r0003c0012`` (sorts as the grid)."""
    return f"r{row:04d}c{col:04d}"


# --- what is found and how it is imaged -------------------------------------------------------

CELL_TYPES = ("MK", "HSPC")
"""The cell types SEGMENT finds, in the order tables, pages and reports list them."""
MODALITIES = ("brightfield", "fluorescence")
REJECTED_CLASS = "rejected"
"""QuPath class of a cell its type's classifier rejected (``bmseg classify``)."""


def probability_column(cell_type: str) -> str:
    """``{type}_probability``: CLASSIFY's probability that a cell of ``cell_type`` is one."""
    return f"{cell_type.lower()}_probability"


def label_column(cell_type: str) -> str:
    """``{type}_label``: CLASSIFY's accepted/rejected decision for a cell of ``cell_type``."""
    return f"{cell_type.lower()}_label"


# --- file names --------------------------------------------------------------------------------
# Per slide (PLAN, GATHER, CLASSIFY): ``{slide}`` + suffix.
TILES_SUFFIX = ".tiles.parquet"
SLIDE_RECORD_SUFFIX = ".slide.json"
TISSUE_PICTURE_SUFFIX = ".tissue.png"
CELLS_SUFFIX = ".cells.parquet"
CROPS_SUFFIX = ".crops.parquet"
GEOJSON_SUFFIX = ".cells.geojson"
# Per SEGMENT batch folder.
CELLS_FILE = "cells.parquet"
CROPS_FILE = "crops.parquet"
MASKS_FILE = "masks.h5"
BATCH_FILE = "batch.json"
# Per run folder.
SUMMARY_FILE = "summary.csv"
BATCHES_RECORD = "batches.json"
GATHER_RECORD = "gather.json"
LABELS_FILE = "labels.json"
"""What the galleries' Export saves and TRAIN reads."""


def slide_file(slide_id: str, suffix: str) -> str:
    """One slide's file name: ``slide_file("s1", CELLS_SUFFIX)`` is ``s1.cells.parquet``."""
    return f"{slide_id}{suffix}"


def slide_of(name: str, suffix: str) -> str | None:
    """The slide id a per-slide file name carries, or None when it does not end in ``suffix``."""
    return name.removesuffix(suffix) if name.endswith(suffix) and name != suffix else None


# --- PLAN and BATCH: tiles ---------------------------------------------------------------------

TILE_SCHEMA = pa.schema(
    [
        ("slide_id", pa.string()),
        ("tile_id", pa.string()),
        ("row", pa.int32()),
        ("col", pa.int32()),
        ("core_x", pa.int64()),
        ("core_y", pa.int64()),
        ("core_w", pa.int64()),
        ("core_h", pa.int64()),
        ("read_x", pa.int64()),
        ("read_y", pa.int64()),
        ("read_w", pa.int64()),
        ("read_h", pa.int64()),
        ("tissue_fraction", pa.float32()),
        ("pixel_size_um", pa.float64()),
    ]
)
"""``{slide}.tiles.parquet``: one row per tile, core (owned) and read (core plus margin) in
slide px (docs/tiles.md)."""

BATCH_COLUMNS = (
    "slide_id",
    "tile_id",
    "core_x",
    "core_y",
    "core_w",
    "core_h",
    "read_x",
    "read_y",
    "read_w",
    "read_h",
    "pixel_size_um",
)
"""Columns of a batch table SEGMENT needs (a subset of :data:`TILE_SCHEMA`)."""

DEFAULT_TILE_SIZE = 3000
"""Side of a tile's core in px (``bmseg plan --tile-size``): docs/tiles.md."""
DEFAULT_MIN_TISSUE_FRACTION = 0.0
"""A tile is kept when its core holds more tissue than this share (0: any tissue)."""
DEFAULT_BATCH_SIZE = 32
"""Tiles per ``batch_NNNN.parquet`` (``bmseg batch --batch-size``)."""
BATCH_TABLE_PATTERN = "batch_{number:04d}.parquet"
"""BATCH's tables, one per SEGMENT task; beside each, its slide list (:data:`SLIDE_LIST_SUFFIX`)."""
SLIDE_LIST_SUFFIX = ".slides.json"
"""``batch_NNNN.slides.json``: the sorted slide ids of a batch, so a task stages only those."""
SYNTH_DENSITIES = ("sparse", "marrow")
"""How densely ``bmseg synth`` plants cells: ~120 or ~6 000 per 3000² tile."""
TRUTH_SUFFIX = ".truth.parquet"
"""``bmseg synth OUT.czi`` lists the planted cells in ``OUT.truth.parquet``."""
SLIDE_RECORD_KEYS = (
    "slide_id",
    "source",
    "pixel_size_um",
    "channels",
    "bounds",
    "modality",
    "modality_source",
    "plane",
    "tissue_area_mm2",
    "tile_size",
    "margin",
    "tiles_total",
    "tiles_kept",
    "min_tissue_fraction",
    "tissue_threshold",
    "tissue_method",
    "thumbnail_downsample",
    "scenes",
    "intensity",
)
"""``{slide}.slide.json``'s keys, in the order PLAN writes them (docs/data.md). SEGMENT reads
``slide_id``, ``channels``, ``modality``, ``plane`` and ``intensity``; REPORT
``tissue_area_mm2`` and ``modality``."""

# --- SEGMENT: cells ----------------------------------------------------------------------------

SHAPE_COLUMNS = (
    "perimeter_um",
    "equivalent_diameter_um",
    "major_axis_um",
    "minor_axis_um",
    "eccentricity",
    "solidity",
    "circularity",
)
INTENSITY_PERCENTILES = (10, 50, 90)
INTENSITY_STATS = ("mean", "std", *(f"p{q}" for q in INTENSITY_PERCENTILES))
INTENSITY_PREFIX = "intensity_"
EMBEDDING_COLUMN = "embedding"
EMBEDDING_DIM = 2048
"""Size of the ResNet-50 embedding in ``cells.parquet``."""
EMBEDDING_VALUE_BYTES = 2
"""Each embedding value is a little-endian float16."""


def embedding_type(dim: int = EMBEDDING_DIM) -> pa.DataType:
    """Arrow type of the ``embedding`` column: ``dim`` float16 values as little-endian bytes.

    One fixed-size binary value per cell rather than a nested list: Parquet stores a list with
    a repetition and definition level per value, which made reading 2048-d embeddings 2-7x
    slower than reading the same bytes as one value (docs/benchmarks.md, Classify).
    """
    return pa.binary(dim * EMBEDDING_VALUE_BYTES)


REQUIRED_COLUMNS = (
    "cell_uid",
    "slide_id",
    "tile_id",
    "cell_type",
    "centroid_x_px",
    "centroid_y_px",
    "bbox_x_px",
    "bbox_y_px",
    "bbox_w_px",
    "bbox_h_px",
    "area_px",
    "area_um2",
    "score",
    "mask_label",
    "contour_x_px",
    "contour_y_px",
)
"""Columns every cell table has, whatever the slide's channels."""

LOCATION_COLUMNS = frozenset(
    {
        "centroid_x_px",
        "centroid_y_px",
        "centroid_x_um",
        "centroid_y_um",
        "bbox_x_px",
        "bbox_y_px",
        "bbox_w_px",
        "bbox_h_px",
        "area_px",
        "mask_label",
    }
)
"""Numeric columns that locate a cell rather than describe it: never features or measurements."""


def channel_column_name(channel: str) -> str:
    """A channel name safe for a column name: runs of chars outside ``[A-Za-z0-9]`` as ``_``."""
    safe = re.sub(r"[^0-9A-Za-z]+", "_", channel).strip("_")
    return safe or "channel"


def intensity_columns(channel_names: Sequence[str]) -> list[str]:
    """The ``intensity_{stat}_{channel}`` column names for these channels, in table order."""
    return [
        f"{INTENSITY_PREFIX}{stat}_{channel_column_name(name)}"
        for name in channel_names
        for stat in INTENSITY_STATS
    ]


def intensity_column_parts(column: str) -> tuple[str, str] | None:
    """``(stat, channel)`` of an ``intensity_{stat}_{channel}`` column name, else None.

    Columns are named after the slide's channels (docs/data.md), so GATHER can tell which
    statistic of which channel a column holds and unite slides of different channels.
    """
    if not column.startswith(INTENSITY_PREFIX):
        return None
    stat, _, channel = column[len(INTENSITY_PREFIX) :].partition("_")
    return (stat, channel) if stat in INTENSITY_STATS and channel else None


def feature_columns(schema: pa.Schema) -> list[str]:
    """Scalar measurement columns (shape, intensity, area µm², score) in table order.

    Location columns and classifier outputs are left out, so the same rule serves training,
    classification and the QuPath measurements whatever shape/intensity columns SEGMENT writes.
    """
    return [
        field.name
        for field in schema
        if (pa.types.is_floating(field.type) or pa.types.is_integer(field.type))
        and field.name not in LOCATION_COLUMNS
        and not field.name.endswith("_probability")
    ]


def cells_schema(channel_names: Sequence[str], embedding_dim: int = EMBEDDING_DIM) -> pa.Schema:
    """The ``cells.parquet`` schema (docs/data.md, docs/cells.md); embedding last.

    SEGMENT writes it and the test helpers (``bmseg.testing``) fabricate tables in it, so the
    downstream steps' tests see every column a real run writes.
    """
    float64 = pa.float64()
    fields = [
        ("cell_uid", pa.string()),
        ("slide_id", pa.string()),
        ("tile_id", pa.string()),
        ("cell_type", pa.string()),
        *((name, float64) for name in ("centroid_x_px", "centroid_y_px")),
        *((name, float64) for name in ("centroid_x_um", "centroid_y_um")),
        *((name, pa.int64()) for name in ("bbox_x_px", "bbox_y_px", "bbox_w_px", "bbox_h_px")),
        ("area_px", float64),
        ("area_um2", float64),
        *((name, float64) for name in SHAPE_COLUMNS),
        *((name, pa.float32()) for name in intensity_columns(channel_names)),
        ("score", pa.float32()),
        ("overlap_fraction", pa.float32()),
        ("mask_label", pa.int32()),
        ("contour_x_px", pa.list_(pa.float32())),
        ("contour_y_px", pa.list_(pa.float32())),
        (EMBEDDING_COLUMN, embedding_type(embedding_dim)),
    ]
    return pa.schema(fields)


CROPS_SCHEMA = pa.schema(
    [
        ("cell_uid", pa.string()),
        ("x", pa.int64()),
        ("y", pa.int64()),
        ("scale", pa.float32()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("image", pa.binary()),
    ]
)
"""``crops.parquet``: one gallery JPEG per cell, where it was cut and at which scale."""
GALLERY_CROP_PX = 128
"""Default largest side of a gallery JPEG (``--crop-px``); smaller crops keep full resolution."""
SEGMENT_STAGES = ("read", "mk", "hspc", "features", "embed", "write")
"""SEGMENT's stages, the keys of batch.json's ``timings_s``."""
GPU_OUT_OF_MEMORY_EXIT = 75
"""Exit code of ``bmseg segment`` when the GPU ran out of memory (sysexits' EX_TEMPFAIL: try
again): the pipeline retries the task with half as many ``--gpu-batch-tiles``. Nothing of the
batch is written. Bad input exits 2 and is never retried."""

# --- GATHER, CLASSIFY, PAGES, REPORT -----------------------------------------------------------
# Per run folder, continued: GATHER's and CLASSIFY's plots, TRAIN's and CLASSIFY's files.
DENSITY_PLOT = "density.png"
AREA_HISTOGRAMS_PLOT = "area_histograms.png"
MODEL_SUFFIX = ".skops"
"""TRAIN's classifier of a cell type: ``{type}.skops``, what CLASSIFY loads."""
METRICS_FILE = "metrics.json"
"""TRAIN's cross-validated metrics, read by REPORT."""
TRAINING_REPORT_FILE = "report.html"
RANKING_FILE = "ranking.parquet"
"""CLASSIFY's uncertainty ranking (:data:`RANKING_SCHEMA`), PAGES' ``--order uncertainty``."""
CLASSIFY_RECORD = "classify.json"
RANKING_SCHEMA = pa.schema(
    [
        ("cell_uid", pa.string()),
        ("cell_type", pa.string()),
        ("probability", pa.float32()),
        ("uncertainty", pa.float32()),
    ]
)
"""``ranking.parquet``: unlabelled cells, most uncertain (1 - |2p - 1|) first."""

# summary.csv: one row per slide.
TISSUE_COLUMNS = (
    "pixel_size_um",
    "tissue_area_mm2",
    "tiles_segmented",
    "segmented_tissue_mm2",
    "duplicates_removed",
)
"""Per-slide columns of ``summary.csv`` that GATHER measures and CLASSIFY carries over."""
AREA_QUANTILES = (10, 25, 50, 75, 90)
"""Percentiles of cell area (µm²) per slide and type in ``summary.csv``."""


def count_column(cell_type: str) -> str:
    """``{type}_count``: cells of ``cell_type`` per slide."""
    return f"{cell_type}_count"


def density_column(cell_type: str) -> str:
    """``{type}_per_mm2``: cells per mm² of segmented tissue."""
    return f"{cell_type}_per_mm2"


def accepted_column(cell_type: str) -> str:
    """``{type}_accepted``: cells the classifier accepted (classified summaries only)."""
    return f"{cell_type}_accepted"


def accepted_density_column(cell_type: str) -> str:
    """``{type}_accepted_per_mm2``: accepted cells per mm² of segmented tissue."""
    return f"{cell_type}_accepted_per_mm2"


def area_quantile_column(cell_type: str, percentile: int) -> str:
    """``{type}_area_um2_p{q}``: the q-th percentile of the type's cell areas."""
    return f"{cell_type}_area_um2_p{percentile}"


GALLERY_ORDERS = ("random", "size", "uncertainty")
"""PAGES' gallery orders: seeded random, largest first, most uncertain first (from
``ranking.parquet``)."""
SITE_INDEX = "index.html"
"""PAGES' site entry page, which the label server requires."""
