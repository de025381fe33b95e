"""Cell tables in the exact schema of SEGMENT's ``cells.parquet``, made from circles.

For tests and benchmarks, not for production. The downstream steps' tests and benchmarks
(gather, train, classify, report, pages) need cell tables without running the models: this
builds them in :func:`bmseg.contract.cells_schema`, every column SEGMENT writes, with geometry
consistent with the given circles and seeded random measurements, and writes SEGMENT's batch
folders and PLAN's slide records around them. ``signal`` shifts intensity and embedding
features so a classifier has something (or nothing) to learn.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pyarrow as pa
from PIL import Image

from bmseg.contract import (
    BATCH_FILE,
    CELL_TYPES,
    CELLS_FILE,
    CROPS_FILE,
    CROPS_SCHEMA,
    EMBEDDING_COLUMN,
    EMBEDDING_DIM,
    INTENSITY_PERCENTILES,
    SLIDE_RECORD_SUFFIX,
    TISSUE_PICTURE_SUFFIX,
    cells_schema,
    channel_column_name,
    intensity_column_parts,
    intensity_columns,
    slide_file,
)
from bmseg.storage import (
    embedding_array,
    parquet_writer,
    unique_cell_uids,
    write_json,
    write_parquet,
)

CHANNELS = ("R", "G", "B")


def cells_table(
    centre_x: Sequence[float],
    centre_y: Sequence[float],
    radius_px: Sequence[float],
    *,
    slide_id: str,
    tile_id: Sequence[str] | str,
    cell_type: Sequence[str] | str,
    score: Sequence[float] | None = None,
    signal: Sequence[float] | None = None,
    pixel_size_um: float = 0.1725,
    contour_points: int = 24,
    embedding_dim: int = EMBEDDING_DIM,
    channels: Sequence[str] = CHANNELS,
    seed: int = 0,
) -> pa.Table:
    """One row per circle, with every column of ``cells.parquet`` (slide px in, slide px out).

    ``channels`` names the slide's channels, after which the intensity columns are named.
    """
    rng = np.random.default_rng(seed)
    cx = np.asarray(centre_x, dtype=np.float64)
    cy = np.asarray(centre_y, dtype=np.float64)
    radius = np.asarray(radius_px, dtype=np.float64)
    n = cx.shape[0]
    types = np.broadcast_to(np.asarray(cell_type, dtype=object), (n,))
    tiles = np.broadcast_to(np.asarray(tile_id, dtype=object), (n,))
    scores = rng.uniform(0.5, 1.0, n) if score is None else np.asarray(score, dtype=np.float64)
    shift = np.zeros(n) if signal is None else np.asarray(signal, dtype=np.float64)

    angles = np.linspace(0.0, 2.0 * np.pi, contour_points, endpoint=False)
    contour_x = (cx[:, None] + radius[:, None] * np.cos(angles)).astype(np.float32)
    contour_y = (cy[:, None] + radius[:, None] * np.sin(angles)).astype(np.float32)
    bbox_x = np.floor(cx - radius).astype(np.int64)
    bbox_y = np.floor(cy - radius).astype(np.int64)
    bbox_w = (np.ceil(cx + radius) - bbox_x).astype(np.int64)
    bbox_h = (np.ceil(cy + radius) - bbox_y).astype(np.int64)
    area_px = np.pi * radius**2
    uids = unique_cell_uids(
        [
            f"{slide_id}:{t}:{x}:{y}"
            for t, x, y in zip(
                types, np.rint(cx).astype(np.int64), np.rint(cy).astype(np.int64), strict=True
            )
        ],
        set(),
    )
    columns: dict[str, pa.Array] = {
        "cell_uid": pa.array(uids, pa.string()),
        "slide_id": pa.array([slide_id] * n, pa.string()),
        "tile_id": pa.array(list(tiles), pa.string()),
        "cell_type": pa.array(list(types), pa.string()),
        "centroid_x_px": pa.array(cx),
        "centroid_y_px": pa.array(cy),
        "centroid_x_um": pa.array(cx * pixel_size_um),
        "centroid_y_um": pa.array(cy * pixel_size_um),
        "bbox_x_px": pa.array(bbox_x),
        "bbox_y_px": pa.array(bbox_y),
        "bbox_w_px": pa.array(bbox_w),
        "bbox_h_px": pa.array(bbox_h),
        "area_px": pa.array(area_px),
        "area_um2": pa.array(area_px * pixel_size_um**2),
        "perimeter_um": pa.array(2 * np.pi * radius * pixel_size_um),
        "equivalent_diameter_um": pa.array(2 * radius * pixel_size_um),
        "eccentricity": pa.array(rng.uniform(0.0, 0.6, n)),
        "solidity": pa.array(rng.uniform(0.85, 1.0, n)),
        "major_axis_um": pa.array(2 * radius * pixel_size_um * rng.uniform(1.0, 1.2, n)),
        "minor_axis_um": pa.array(2 * radius * pixel_size_um * rng.uniform(0.8, 1.0, n)),
    }
    columns.update(_intensities(rng, channels, shift))
    columns["score"] = pa.array(scores.astype(np.float32))
    columns["mask_label"] = pa.array(np.arange(1, n + 1, dtype=np.int32))
    offsets = pa.array(np.arange(0, (n + 1) * contour_points, contour_points, dtype=np.int32))
    columns["contour_x_px"] = pa.ListArray.from_arrays(offsets, pa.array(contour_x.ravel()))
    columns["contour_y_px"] = pa.ListArray.from_arrays(offsets, pa.array(contour_y.ravel()))
    embedding = rng.standard_normal((n, embedding_dim), dtype=np.float32)
    embedding[:, :8] += 1.5 * shift[:, None]
    columns[EMBEDDING_COLUMN] = embedding_array(embedding)
    # Drawn last, so the columns above keep the values they had before these were added.
    columns["circularity"] = pa.array(rng.uniform(0.8, 1.0, n))
    columns["overlap_fraction"] = pa.array(rng.uniform(0.0, 0.1, n).astype(np.float32))
    return pa.Table.from_pydict(columns, schema=cells_schema(channels, embedding_dim))


def _intensities(
    rng: np.random.Generator, channels: Sequence[str], shift: np.ndarray
) -> dict[str, pa.Array]:
    """Every ``intensity_{stat}_{channel}`` column: seeded means and standard deviations
    (shifted by ``shift``), percentiles as those of a normal distribution of that mean and std."""
    n = shift.shape[0]
    safe = [channel_column_name(c) for c in channels]
    mean = {c: rng.normal(120.0, 10.0, n) + 15.0 * shift for c in safe}
    std = {c: np.abs(rng.normal(20.0, 10.0, n) + 15.0 * shift) for c in safe}
    z_scores = {f"p{q}": NormalDist().inv_cdf(q / 100) for q in INTENSITY_PERCENTILES}
    by_channel = {
        c: {"mean": mean[c], "std": std[c]}
        | {stat: mean[c] + z * std[c] for stat, z in z_scores.items()}
        for c in safe
    }
    columns = {}
    for name in intensity_columns(channels):
        stat, channel = intensity_column_parts(name)
        columns[name] = pa.array(by_channel[channel][stat].astype(np.float32))
    return columns


def random_cells(
    n: int,
    *,
    slide_id: str = "slide",
    width_px: int = 30000,
    height_px: int = 30000,
    tile_size: int = 3000,
    signal: Sequence[float] | None = None,
    seed: int = 0,
    **kwargs,
) -> pa.Table:
    """``n`` randomly placed cells (20 % MK, 80 % HSPC) on a slide tiled by ``tile_size``."""
    rng = np.random.default_rng(seed)
    cx = rng.uniform(0, width_px, n)
    cy = rng.uniform(0, height_px, n)
    is_mk = rng.random(n) < 0.2
    radius = np.where(is_mk, rng.uniform(45, 120, n), rng.uniform(12, 30, n))
    tiles = [
        f"r{r:04d}c{c:04d}"
        for r, c in zip((cy // tile_size).astype(int), (cx // tile_size).astype(int), strict=True)
    ]
    return cells_table(
        cx,
        cy,
        radius,
        slide_id=slide_id,
        tile_id=tiles,
        cell_type=np.where(is_mk, "MK", "HSPC"),
        signal=signal,
        seed=seed + 1,
        **kwargs,
    )


def write_batch(
    batch_dir: str | Path,
    tables: Sequence[pa.Table],
    *,
    batch: int = 0,
    tiles: Sequence[tuple[str, str]] = (),
    device: str = "cpu",
) -> Path:
    """Write SEGMENT's outputs for ``tables``: ``cells.parquet``, ``crops.parquet``, ``batch.json``.

    ``tiles`` lists extra ``(slide_id, tile_id)`` pairs that were segmented but found nothing.
    """
    batch_dir = Path(batch_dir)
    batch_dir.mkdir(parents=True, exist_ok=True)
    cells = pa.concat_tables(tables)
    with parquet_writer(batch_dir / CELLS_FILE, cells.schema) as writer:
        writer.write_table(cells, row_group_size=4096)
    n = cells.num_rows
    crops = pa.Table.from_pydict(
        {
            "cell_uid": cells["cell_uid"],
            "x": pa.array(np.zeros(n, np.int64)),
            "y": pa.array(np.zeros(n, np.int64)),
            "scale": pa.array(np.ones(n, np.float32)),
            "width": pa.array(np.full(n, 8, np.int32)),
            "height": pa.array(np.full(n, 8, np.int32)),
            "image": pa.array([b"\xff\xd8fake"] * n, pa.binary()),
        },
        schema=CROPS_SCHEMA,
    )
    write_parquet(crops, batch_dir / CROPS_FILE)
    slide_tile = cells.select(["slide_id", "tile_id", "cell_type"]).to_pandas()
    keys = sorted(set(map(tuple, slide_tile[["slide_id", "tile_id"]].to_numpy())) | set(tiles))
    counts = slide_tile.groupby(["slide_id", "tile_id", "cell_type"]).size()
    tile_records = [
        {
            "slide_id": slide,
            "tile_id": tile,
            "n_mk": int(counts.get((slide, tile, "MK"), 0)),
            "n_hspc": int(counts.get((slide, tile, "HSPC"), 0)),
            "seconds": 0.5,
        }
        for slide, tile in keys
    ]
    type_counts = slide_tile["cell_type"].value_counts()
    write_json(
        {
            "batch": batch,
            "tiles": tile_records,
            "device": device,
            "timings_s": {
                "read": 1.0,
                "mk": 2.0,
                "hspc": 1.5,
                "features": 0.8,
                "embed": 0.5,
                "write": 0.2,
            },
            "wall_s": 4.0,
            "cells": {t: int(type_counts.get(t, 0)) for t in CELL_TYPES},
            "versions": {"bmseg": "test"},
            "models": {
                "dir": "models",
                "manifest": {
                    "sam2_checkpoint": "sam2.1_hiera_large.pt",
                    "cellpose_checkpoint": "cpsam",
                    "resnet50_weights": "resnet50.pth",
                    "random_init": False,
                },
                "hspc": {"refine": True},
            },
        },
        batch_dir / BATCH_FILE,
    )
    return batch_dir


def write_plan(
    plans_dir: str | Path,
    slide_id: str,
    *,
    tissue_area_mm2: float,
    pixel_size_um: float = 0.1725,
    bounds: tuple[int, int, int, int] = (0, 0, 30000, 30000),
    tiles_kept: int = 1,
) -> Path:
    """Write a ``{slide}.slide.json`` (and a small ``{slide}.tissue.png``) as PLAN would."""
    plans_dir = Path(plans_dir)
    plans_dir.mkdir(parents=True, exist_ok=True)
    x, y, w, h = bounds
    path = plans_dir / slide_file(slide_id, SLIDE_RECORD_SUFFIX)
    write_json(
        {
            "slide_id": slide_id,
            "source": f"{slide_id}.czi",
            "pixel_size_um": pixel_size_um,
            "channels": [{"name": c, "dtype": "uint8"} for c in CHANNELS],
            "bounds": {"x": x, "y": y, "w": w, "h": h},
            "modality": "brightfield",
            "tissue_area_mm2": tissue_area_mm2,
            "tile_size": 3000,
            "margin": 300,
            "tiles_total": 100,
            "tiles_kept": tiles_kept,
        },
        path,
    )
    picture = np.zeros((60, 80, 3), np.uint8)
    picture[10:50, 10:70] = (200, 120, 160)
    Image.fromarray(picture).save(plans_dir / slide_file(slide_id, TISSUE_PICTURE_SUFFIX))
    return path


def write_random_cells(
    path: str | Path, n: int, *, slide_id: str, seed: int = 0, chunk: int = 32768, **kwargs
) -> Path:
    """Stream ``n`` random cells into one Parquet file, ``chunk`` rows at a time (for 1 M cells)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tables = (
        random_cells(min(chunk, n - start), slide_id=slide_id, seed=seed + 7919 * i, **kwargs)
        for i, start in enumerate(range(0, n, chunk))
    )
    first = next(tables)
    with parquet_writer(path, first.schema) as writer:
        for table in itertools.chain([first], tables):
            writer.write_table(table, row_group_size=chunk)
    return path
