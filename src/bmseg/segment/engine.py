"""The SEGMENT engine: tiles read ahead on reader threads, segmented on the calling (device)
thread in groups of ``gpu_batch_tiles``, measured and embedded on worker threads, written in
tile order; batch.json last."""

from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bmseg.contract import (
    BATCH_FILE,
    CELL_TYPES,
    CELLS_FILE,
    CROPS_FILE,
    CROPS_SCHEMA,
    MASKS_FILE,
    SEGMENT_STAGES,
    cells_schema,
)
from bmseg.models.base import Detections, Embedder, Segmenter
from bmseg.segment.cells import (
    TileCells,
    checked,
    embed_cells,
    hspc_rect,
    measure_tile,
)
from bmseg.segment.options import SegmentOptions
from bmseg.segment.tiles import ReadTile, Tile, TileReader
from bmseg.segment.writing import write_tile
from bmseg.slide import Channel, Rect, open_slide
from bmseg.storage import masks_writer, parquet_writer, unique_cell_uids, write_json
from bmseg.timing import StageTimer
from bmseg.versions import package_versions

log = logging.getLogger(__name__)


@dataclass
class _Stats:
    """Running totals for batch.json."""

    timer: StageTimer = field(default_factory=StageTimer)
    cells: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CELL_TYPES, 0))
    tiles: list[dict[str, Any]] = field(default_factory=list)
    uids: set[str] = field(default_factory=set)  # written so far: a later equal one is suffixed


# ---------------------------------------------------------------------------------- batch


def _groups(items: Iterator[ReadTile], size: int) -> Iterator[list[ReadTile]]:
    """Consecutive read tiles in groups of up to ``size`` sharing one pixel size."""
    group: list[ReadTile] = []
    for item in items:
        if group and (len(group) == size or item[0].pixel_size_um != group[0][0].pixel_size_um):
            yield group
            group = []
        group.append(item)
    if group:
        yield group


@dataclass
class _Finished:
    """A group of tiles measured and embedded, ready to write."""

    reads: list[ReadTile]
    measured: list[TileCells]
    embeddings: list[np.ndarray]
    seconds: dict[str, float]


def _segment_group(
    reads: list[ReadTile],
    segmenters: dict[str, Segmenter],
    timer: StageTimer,
    options: SegmentOptions,
) -> dict[str, list[Detections]]:
    """Run each segmenter once on the group's RGB tiles; validated detections per stage.

    The MK segmenter sees each whole read window; the HSPC segmenter its :func:`hspc_rect`,
    whose labels are placed back into the read window.
    """
    rgbs = [item[2] for item in reads]
    rects = [hspc_rect(item[0], options.hspc_max_area_um2) for item in reads]
    inputs = {
        "mk": rgbs,
        "hspc": [rgb[r.y : r.bottom, r.x : r.right] for rgb, r in zip(rgbs, rects, strict=True)],
    }
    pixel_size = reads[0][0].pixel_size_um
    detected = {}
    for stage, segmenter in segmenters.items():
        start = time.perf_counter()
        found = segmenter.segment(inputs[stage], pixel_size)
        if len(found) != len(rgbs):
            raise RuntimeError(f"{stage} segmenter returned {len(found)} results for {len(rgbs)}")
        detected[stage] = [
            checked(d, image.shape[:2], f"{stage} segmenter")
            for d, image in zip(found, inputs[stage], strict=True)
        ]
        timer.add(stage, time.perf_counter() - start)
    detected["hspc"] = [
        _placed(d, rgb.shape[:2], rect)
        for d, rgb, rect in zip(detected["hspc"], rgbs, rects, strict=True)
    ]
    return detected


def _placed(detections: Detections, shape: tuple[int, int], rect: Rect) -> Detections:
    """Detections of a sub-rectangle placed into a zero label image of ``shape``."""
    if detections.labels.shape == shape:
        return detections
    labels = np.zeros(shape, np.int32)
    labels[rect.y : rect.bottom, rect.x : rect.right] = detections.labels
    return Detections(labels=labels, scores=detections.scores)


def _finish_group(
    reads: list[ReadTile],
    detected: dict[str, list[Detections]],
    channel_sets: dict[str, list[Channel]],
    embedder: Embedder,
    options: SegmentOptions,
) -> _Finished:
    """Measure the group's tiles and embed their cells (runs on a worker thread)."""
    start = time.perf_counter()
    measured = [
        measure_tile(tile, pixels, rgb, channel_sets[tile.slide_id], mk, hspc, options)
        for (tile, pixels, rgb, _), mk, hspc in zip(
            reads, detected["mk"], detected["hspc"], strict=True
        )
    ]
    features_s = time.perf_counter() - start
    start = time.perf_counter()
    embeddings = embed_cells(embedder, measured, options.embed_batch)
    return _Finished(
        reads, measured, embeddings, {"features": features_s, "embed": time.perf_counter() - start}
    )


def segment_batch(
    tiles: Sequence[Tile],
    slide_paths: dict[str, Path],
    mk_segmenter: Segmenter,
    hspc_segmenter: Segmenter,
    embedder: Embedder,
    out_dir: Path,
    options: SegmentOptions,
    record: dict[str, Any],
) -> dict[str, Any]:
    """Segment ``tiles`` and write the four outputs to ``out_dir``; return batch.json's content.

    Three kinds of threads overlap: readers fetch tiles ahead, the calling thread runs the
    segmenters, ``options.workers`` threads measure and embed finished groups; rows are
    written in tile order. Segmenters are called from the calling thread on the tiles in the
    given order, each tile exactly once per segmenter, in lists of up to
    ``options.gpu_batch_tiles`` tiles. ``record`` (batch number, device, models) is copied into
    batch.json. Tiles must have been checked (:func:`check_tiles`).
    """
    pixel_sizes = {t.slide_id: t.pixel_size_um for t in tiles}
    channel_sets: dict[str, list[Channel]] = {}
    for slide_id in pixel_sizes:
        with open_slide(
            slide_paths[slide_id],
            pixel_size_um=pixel_sizes[slide_id],
            slide_id=slide_id,
            **options.slide_choices.get(slide_id, {}),
        ) as slide:
            channel_sets[slide_id] = slide.channels
    channel_names = list(dict.fromkeys(c.name for cs in channel_sets.values() for c in cs))
    schema = cells_schema(channel_names, embedder.dim)
    segmenters = {"mk": mk_segmenter, "hspc": hspc_segmenter}
    stats = _Stats()
    reader = TileReader(
        slide_paths, pixel_sizes, options.readers, options.intensity, options.slide_choices
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        with (
            parquet_writer(out_dir / CELLS_FILE, schema) as cells_out,
            parquet_writer(out_dir / CROPS_FILE, CROPS_SCHEMA) as crops_out,
            masks_writer(out_dir / MASKS_FILE) as masks_out,
            ThreadPoolExecutor(options.workers, thread_name_prefix="bmseg-measure") as workers,
            tqdm(
                total=len(tiles), unit="tile", desc="segment", disable=not options.progress
            ) as bar,
        ):

            def write(finished: _Finished, segment_s: float) -> None:
                start = time.perf_counter()
                for cells, embeddings in zip(finished.measured, finished.embeddings, strict=True):
                    uids = unique_cell_uids(cells.columns["cell_uid"], stats.uids)
                    cells.columns["cell_uid"] = uids.tolist()
                    write_tile(cells, embeddings, schema, cells_out, crops_out, masks_out)
                write_s = time.perf_counter() - start
                for stage, seconds in finished.seconds.items():
                    stats.timer.add(stage, seconds)
                stats.timer.add("write", write_s)
                shared = (segment_s + sum(finished.seconds.values()) + write_s) / len(
                    finished.reads
                )
                for cells, item in zip(finished.measured, finished.reads, strict=True):
                    types = collections.Counter(cells.columns["cell_type"])
                    for cell_type in CELL_TYPES:
                        stats.cells[cell_type] += types[cell_type]
                    stats.tiles.append(
                        {
                            "slide_id": cells.tile.slide_id,
                            "tile_id": cells.tile.tile_id,
                            "n_mk": types["MK"],
                            "n_hspc": types["HSPC"],
                            "seconds": round(item[3] + shared, 4),
                        }
                    )
                bar.update(len(finished.reads))

            pending: collections.deque[tuple[Future, float]] = collections.deque()
            reads = reader.iter_read(tiles, lookahead=options.gpu_batch_tiles)
            for group in _groups(reads, options.gpu_batch_tiles):
                stats.timer.add("read", sum(item[3] for item in group))
                start = time.perf_counter()
                detected = _segment_group(group, segmenters, stats.timer, options)
                segment_s = time.perf_counter() - start
                future = workers.submit(
                    _finish_group, group, detected, channel_sets, embedder, options
                )
                pending.append((future, segment_s))
                # Write what is done, in order; never hold more groups than workers + 1.
                while pending and (pending[0][0].done() or len(pending) > options.workers):
                    done, seconds = pending.popleft()
                    write(done.result(), seconds)
            while pending:
                done, seconds = pending.popleft()
                write(done.result(), seconds)
    finally:
        reader.close()
    elapsed = time.perf_counter() - started
    totals = stats.timer.take()
    summary = {
        **record,
        "tiles": stats.tiles,
        "timings_s": {stage: round(totals.get(stage, 0.0), 4) for stage in SEGMENT_STAGES},
        "wall_s": round(elapsed, 4),
        "tiles_per_s": round(len(tiles) / elapsed, 4) if elapsed > 0 else None,
        "cells": stats.cells,
        "settings": {
            "mk_min_area_um2": options.mk_min_area_um2,
            "mk_max_area_um2": options.mk_max_area_um2,
            "hspc_min_area_um2": options.hspc_min_area_um2,
            "hspc_max_area_um2": options.hspc_max_area_um2,
            "hspc_margin_um": round(2 * math.sqrt(options.hspc_max_area_um2 / math.pi), 4),
            "readers": options.readers,
            "workers": options.workers,
            "gpu_batch_tiles": options.gpu_batch_tiles,
            "embed_batch": options.embed_batch,
            "crop_px": options.crop_px,
        },
        "versions": package_versions(),
    }
    write_json(summary, out_dir / BATCH_FILE)
    log.info(
        "wrote %s: %d tiles, %d MK, %d HSPC in %.1f s (%.2f tiles/s)",
        out_dir,
        len(tiles),
        stats.cells["MK"],
        stats.cells["HSPC"],
        elapsed,
        len(tiles) / elapsed if elapsed > 0 else 0.0,
    )
    return summary
