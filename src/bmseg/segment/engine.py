"""The SEGMENT engine: tiles read ahead on reader threads, segmented on the calling (device)
thread in groups of ``gpu_batch_tiles``, checked, measured and embedded on worker threads,
written in tile order on a writer thread; batch.json last."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import math
import multiprocessing
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
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

_PROCESSES = multiprocessing.get_context("forkserver")
"""How measuring processes start: forked from a clean server process, never from this one,
whose reader, worker and device threads (and their locks) a fork would copy mid-flight. The
server imports this module once (numpy, OpenCV, torch; :func:`_measurers` asks for that when
it first makes a pool, not at import), so a batch's processes start at once."""


@dataclass
class _Stats:
    """Running totals for batch.json."""

    timer: StageTimer = field(default_factory=StageTimer)
    cells: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CELL_TYPES, 0))
    tiles: list[dict[str, Any]] = field(default_factory=list)
    uids: set[str] = field(default_factory=set)  # written so far: a later equal one is suffixed
    measure_cpu_s: float = 0.0


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
    measure_cpu_s: float


def _segment_group(
    reads: list[ReadTile],
    rects: list[Rect],
    segmenters: dict[str, Segmenter],
    timer: StageTimer,
) -> dict[str, list[Detections]]:
    """Run each segmenter once on the group's RGB tiles (the calling, device, thread's only
    work): their raw detections per stage, checked later by :func:`_finish_group`.

    The MK segmenter sees each whole read window; the HSPC segmenter its :func:`hspc_rect`
    (``rects``, views: nothing is copied here).
    """
    rgbs = [item[2] for item in reads]
    inputs = {
        "mk": rgbs,
        "hspc": [rgb[r.y : r.bottom, r.x : r.right] for rgb, r in zip(rgbs, rects, strict=True)],
    }
    pixel_size = reads[0][0].pixel_size_um
    found = {}
    for stage, segmenter in segmenters.items():
        start = time.perf_counter()
        found[stage] = list(segmenter.segment(inputs[stage], pixel_size))
        timer.add(stage, time.perf_counter() - start)
        if len(found[stage]) != len(rgbs):
            raise RuntimeError(
                f"{stage} segmenter returned {len(found[stage])} results for {len(rgbs)}"
            )
    return found


def _placed(detections: Detections, shape: tuple[int, int], rect: Rect) -> Detections:
    """Detections of a sub-rectangle placed into a zero label image of ``shape``."""
    if detections.labels.shape == shape:
        return detections
    labels = np.zeros(shape, np.int32)
    labels[rect.y : rect.bottom, rect.x : rect.right] = detections.labels
    return Detections(labels=labels, scores=detections.scores)


_NO_RGB = np.zeros((0, 0, 3), np.uint8)


def _measure(
    tile: Tile,
    pixels: np.ndarray,
    rgb: np.ndarray,
    channels: list[Channel],
    mk: Detections,
    hspc: Detections,
    rect: Rect,
    options: SegmentOptions,
) -> tuple[TileCells, float]:
    """One tile's segmenter output checked, its HSPC window placed into the read window and
    its cells measured: on the worker thread, or with ``options.measure_processes`` in a
    measuring process, where its per-cell Python holds no GIL the device thread needs. Returns
    the cells without the RGB image (the caller holds it: it need not cross back) and the CPU
    seconds spent."""
    start = time.thread_time()
    mk = checked(mk, rgb.shape[:2], "mk segmenter")
    hspc = _placed(checked(hspc, (rect.h, rect.w), "hspc segmenter"), rgb.shape[:2], rect)
    cells = measure_tile(tile, pixels, rgb, channels, mk, hspc, options)
    return dataclasses.replace(cells, rgb=_NO_RGB), time.thread_time() - start


def _finish_group(
    reads: list[ReadTile],
    rects: list[Rect],
    found: dict[str, list[Detections]],
    channel_sets: dict[str, list[Channel]],
    embedder: Embedder,
    options: SegmentOptions,
    measurers: Executor,
) -> _Finished:
    """Have the group's tiles measured by ``measurers`` (at once on this worker thread, or in
    processes: the thread hands the arrays over and waits) and embed their cells."""
    start = time.perf_counter()
    jobs = [
        measurers.submit(
            _measure, tile, pixels, rgb, channel_sets[tile.slide_id], mk, hspc, rect, options
        )
        for (tile, pixels, rgb, _), rect, mk, hspc in zip(
            reads, rects, found["mk"], found["hspc"], strict=True
        )
    ]
    measured, cpu_s = [], 0.0
    for job, item in zip(jobs, reads, strict=True):
        cells, seconds = job.result()
        measured.append(dataclasses.replace(cells, rgb=item[2]))
        cpu_s += seconds
    features_s = time.perf_counter() - start
    start = time.perf_counter()
    embeddings = embed_cells(
        embedder, measured, options.embed_batch, options.device, options.hspc_embed_px
    )
    seconds = {"features": features_s, "embed": time.perf_counter() - start}
    return _Finished(reads, measured, embeddings, seconds, cpu_s)


class _HereAndNow(Executor):
    """Runs each job at once on the thread that submits it (measuring on the worker threads)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        done: Future = Future()
        try:
            done.set_result(fn(*args, **kwargs))
        except BaseException as error:
            done.set_exception(error)
        return done


def _measurers(options: SegmentOptions) -> Executor:
    """Where tiles are measured: ``options.workers`` processes, or the worker threads."""
    if options.measure_processes:
        _PROCESSES.set_forkserver_preload([__name__])
        return ProcessPoolExecutor(options.workers, mp_context=_PROCESSES)
    return _HereAndNow()


class _Writer:
    """cells.parquet, crops.parquet and masks.h5, opened, written in tile order and closed on
    one thread of their own: no write, uid suffixing or tally holds the device thread.

    :meth:`put` queues a group's future (from a worker); the writes run in the order queued.
    The files are renamed into place by :meth:`close` only when nothing failed.
    """

    def __init__(self, out_dir: Path, schema: pa.Schema, stats: _Stats, bar: tqdm) -> None:
        self._stats, self._schema, self._bar = stats, schema, bar
        self._files = contextlib.ExitStack()
        self._failed = False
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="bmseg-write")
        self._queued: collections.deque[Future] = collections.deque()
        self._queued.append(self._thread.submit(self._guarded, self._open, out_dir))

    def _guarded(self, job: Callable[..., None], *args: Any) -> None:
        """Run ``job`` unless an earlier one failed (or the batch was abandoned)."""
        if self._failed:
            return
        try:
            job(*args)
        except BaseException:
            self._failed = True
            raise

    def _open(self, out_dir: Path) -> None:
        enter = self._files.enter_context
        self._cells = enter(parquet_writer(out_dir / CELLS_FILE, self._schema))
        self._crops = enter(parquet_writer(out_dir / CROPS_FILE, CROPS_SCHEMA))
        self._masks = enter(masks_writer(out_dir / MASKS_FILE))

    def put(self, finished: Future, segment_s: float) -> None:
        """Queue the write of a group whose measuring ``finished`` will deliver."""
        self._queued.append(self._thread.submit(self._guarded, self._write, finished, segment_s))

    def wait(self, keep: int) -> None:
        """Block until at most ``keep`` writes are queued; raise the error of a failed one."""
        while self._queued and (self._queued[0].done() or len(self._queued) > keep):
            self._queued.popleft().result()

    def close(self, error: BaseException | None) -> None:
        """Finish the queued writes and close the files: renamed into place when neither
        ``error`` (the caller's) nor a write failed, else deleted (the queued writes skipped).
        Raises a failed write's error when the caller had none."""
        own = None
        if error is None:
            try:
                self.wait(0)
            except BaseException as failure:
                error = own = failure
        if error is None:
            closing = self._thread.submit(self._files.close)
        else:
            self._failed = True
            closing = self._thread.submit(
                self._files.__exit__, type(error), error, error.__traceback__
            )
        self._thread.shutdown(wait=True)
        if own is not None:
            raise own
        if error is None:
            closing.result()

    def _write(self, finished_future: Future, segment_s: float) -> None:
        finished: _Finished = finished_future.result()
        stats = self._stats
        start = time.perf_counter()
        for cells, embeddings in zip(finished.measured, finished.embeddings, strict=True):
            uids = unique_cell_uids(cells.columns["cell_uid"], stats.uids)
            cells.columns["cell_uid"] = uids.tolist()
            write_tile(cells, embeddings, self._schema, self._cells, self._crops, self._masks)
        write_s = time.perf_counter() - start
        for stage, seconds in finished.seconds.items():
            stats.timer.add(stage, seconds)
        stats.timer.add("write", write_s)
        stats.measure_cpu_s += finished.measure_cpu_s
        shared = (segment_s + sum(finished.seconds.values()) + write_s) / len(finished.reads)
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
        self._bar.update(len(finished.reads))


def segment_batch(
    tiles: Sequence[Tile],
    slide_paths: dict[str, Path],
    mk_segmenter: Segmenter,
    hspc_segmenter: Segmenter,
    embedder: Embedder,
    out_dir: Path,
    options: SegmentOptions,
    record: dict[str, Any],
    model_timer: StageTimer | None = None,
) -> dict[str, Any]:
    """Segment ``tiles`` and write the four outputs to ``out_dir``; return batch.json's content.

    Four kinds of threads overlap: readers fetch tiles ahead, the calling thread runs the
    segmenters and nothing else, ``options.workers`` threads check, measure (themselves, or
    hand the arrays to as many processes with ``options.measure_processes``) and embed
    finished groups, one writer thread writes their rows in tile order. Segmenters are called
    from the calling thread on the tiles in the given order, each tile exactly once per
    segmenter, in lists of up to ``options.gpu_batch_tiles`` tiles. ``record`` (batch number,
    device, models) is copied into batch.json; ``model_timer`` (the models' own,
    ``ModelSet.timer``) gives its ``model_timings_s``: the models' stages as the device timed
    them. Tiles must have been checked (:func:`check_tiles`).
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
    bar: tqdm | None = None
    writer: _Writer | None = None
    error: BaseException | None = None
    try:
        if model_timer is not None:
            model_timer.take()  # this batch's stages only
        started = time.perf_counter()
        bar = tqdm(total=len(tiles), unit="tile", desc="segment", disable=not options.progress)
        writer = _Writer(out_dir, schema, stats, bar)
        with (
            _measurers(options) as measurers,
            ThreadPoolExecutor(options.workers, thread_name_prefix="bmseg-embed") as workers,
        ):
            reads = reader.iter_read(tiles, lookahead=options.gpu_batch_tiles)
            for group in _groups(reads, options.gpu_batch_tiles):
                stats.timer.add("read", sum(item[3] for item in group))
                rects = [hspc_rect(item[0], options.hspc_max_area_um2) for item in group]
                start = time.perf_counter()
                found = _segment_group(group, rects, segmenters, stats.timer)
                segment_s = time.perf_counter() - start
                finishing = workers.submit(
                    _finish_group, group, rects, found, channel_sets, embedder, options, measurers
                )
                writer.put(finishing, segment_s)
                writer.wait(keep=options.workers)  # never more groups held than workers + 1
    except BaseException as failure:
        error = failure
        raise
    finally:
        try:
            if writer is not None:
                writer.close(error)
        finally:
            reader.close()
            if bar is not None:
                bar.close()
    elapsed = time.perf_counter() - started
    totals = stats.timer.take()
    summary = {
        **record,
        "tiles": stats.tiles,
        "timings_s": {stage: round(totals.get(stage, 0.0), 4) for stage in SEGMENT_STAGES},
        "model_timings_s": {
            stage: round(seconds, 4)
            for stage, seconds in sorted((model_timer.take() if model_timer else {}).items())
        },
        "measure_cpu_s": round(stats.measure_cpu_s, 4),
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
            "measure_processes": options.measure_processes,
            "gpu_batch_tiles": options.gpu_batch_tiles,
            "embed_batch": options.embed_batch,
            "hspc_embed_px": options.hspc_embed_px or embedder.crop_size,
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
