"""SEGMENT: turn one batch of tiles into cells, masks, gallery crops and a run record.

``bmseg segment BATCH --slides SLIDE_FILES... --models DIR --out DIR`` reads every tile of the
batch (core + margin, the ``read_*`` window) with a prefetching pool of reader threads while
the device segments, keeps the cells whose centroid lies in the tile's core, measures them
(:mod:`bmseg.features`), embeds their crops in batches and streams the rows to
``cells.parquet``, ``crops.parquet`` and ``masks.h5``; ``batch.json`` is written last.

The work itself is :func:`segment_batch`, which takes the segmenters and the embedder as
arguments: the command passes the production models, tests pass their own implementations of
:mod:`bmseg.models.base` through exactly the same path. See docs/cells.md and docs/data.md.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import logging
import math
import re
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from bmseg.argtypes import BAKED_MODELS_DIR, id_list
from bmseg.contract import (
    BATCH_COLUMNS,
    CELL_TYPES,
    CROPS_SCHEMA,
    EMBEDDING_COLUMN,
    MODALITIES,
    cells_schema,
    check_id,
)
from bmseg.errors import BmsegError
from bmseg.models.base import Detections, Embedder, Segmenter
from bmseg.models.choices import FLOWS_METHODS
from bmseg.models.settings import (
    DEVICE_CHOICES,
    EmbedderSettings,
    HSPCSettings,
    MKSettings,
    hspc_margin_px,
)
from bmseg.slide import (
    SLIDE_ID_PATTERN,
    Channel,
    Rect,
    Slide,
    default_slide_id,
    intensity_ranges,
    open_slide,
)
from bmseg.storage import (
    check_no_nulls,
    embedding_array,
    masks_writer,
    parquet_writer,
    unique_cell_uids,
    write_json,
    writes_output_set,
)

log = logging.getLogger(__name__)

STAGES = ("read", "mk", "hspc", "features", "embed", "write")
GALLERY_CROP_PX = 128
"""Default largest side of a gallery JPEG (``--crop-px``); smaller crops keep full resolution."""


@dataclass(frozen=True)
class Tile:
    """One row of a batch table: the core it owns and the window it reads, slide px."""

    slide_id: str
    tile_id: str
    core: Rect
    read: Rect
    pixel_size_um: float


_Read = tuple[Tile, np.ndarray, np.ndarray, float]
"""A read tile: the tile, its slide pixels, its RGB model input, seconds spent reading."""


@dataclass(frozen=True)
class SegmentOptions:
    """Knobs of :func:`segment_batch` that are not models."""

    mk_min_area_um2: float = MKSettings.min_area_um2
    mk_max_area_um2: float = MKSettings.max_area_um2
    hspc_min_area_um2: float = HSPCSettings.min_area_um2
    hspc_max_area_um2: float = HSPCSettings.max_area_um2
    readers: int = 2
    workers: int = 2
    gpu_batch_tiles: int = 1
    embed_batch: int = EmbedderSettings.batch_size
    crop_px: int = GALLERY_CROP_PX
    device: str = "cpu"
    progress: bool = True
    intensity: dict[str, dict] = field(default_factory=dict)
    """Per slide id, slide.json's ``intensity`` (``--plans``): the models' intensity scale."""
    slide_choices: dict[str, dict] = field(default_factory=dict)
    """Per slide id, the modality and plane PLAN read (``--plans``), as open_slide keywords."""


@dataclass
class _Stats:
    """Running totals for batch.json."""

    timings: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    cells: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CELL_TYPES, 0))
    tiles: list[dict[str, Any]] = field(default_factory=list)
    uids: set[str] = field(default_factory=set)  # written so far: a later equal one is suffixed


# ---------------------------------------------------------------------------------- inputs


def read_batch_table(path: Path) -> tuple[int, list[Tile]]:
    """The batch number and tiles of a ``batch_NNNN.parquet``, in ``order``; validated."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except FileNotFoundError as error:
        raise BmsegError(f"{path}: no such batch table; pass a batch_NNNN.parquet") from error
    except (OSError, pa.ArrowException) as error:
        raise BmsegError(
            f"{path}: not a readable Parquet batch table ({error}); re-run bmseg batch"
        ) from error
    missing = [c for c in (*BATCH_COLUMNS, "batch", "order") if c not in table.column_names]
    if missing:
        raise BmsegError(
            f"{path}: batch table lacks columns {missing}; pass a table written by bmseg batch"
        )
    check_no_nulls(table, [*BATCH_COLUMNS, "batch", "order"], path, "re-run bmseg batch")
    if table.num_rows:
        table = table.sort_by("order")
    rows = table.select([*BATCH_COLUMNS, "batch"]).to_pylist()
    numbers = {row["batch"] for row in rows}
    if len(numbers) > 1:
        raise BmsegError(f"{path}: rows of several batches {sorted(numbers)}; pass one batch")
    if numbers:
        number = int(numbers.pop())
    else:
        digits = re.findall(r"\d+", path.stem)
        number = int(digits[-1]) if digits else 0
    tiles = [
        Tile(
            slide_id=check_id(row["slide_id"], f"{path}: slide_id"),
            tile_id=check_id(row["tile_id"], f"{path}: tile_id"),
            core=Rect(row["core_x"], row["core_y"], row["core_w"], row["core_h"]),
            read=Rect(row["read_x"], row["read_y"], row["read_w"], row["read_h"]),
            pixel_size_um=float(row["pixel_size_um"]),
        )
        for row in rows
    ]
    seen = collections.Counter((t.slide_id, t.tile_id) for t in tiles)
    duplicates = [f"{s}/{t}" for (s, t), n in seen.items() if n > 1]
    if duplicates:
        raise BmsegError(f"{path}: tiles listed twice {duplicates[:5]}; re-run bmseg batch")
    return number, tiles


def match_slides(
    slide_ids: Iterable[str], slide_args: Sequence[str], bound_ids: Sequence[str] | None = None
) -> dict[str, Path]:
    """Map each needed slide id to one of the given files.

    A file matches the id its name gives (:func:`bmseg.slide.default_slide_id`, as PLAN
    derives it); ``ID=PATH`` binds a file to an id explicitly (slides planned with --slide-id);
    ``bound_ids`` (--slide-ids) gives every file its id, in the order of the files.
    """
    if bound_ids is not None and len(bound_ids) != len(slide_args):
        raise BmsegError(
            f"--slide-ids names {len(bound_ids)} slides for {len(slide_args)} files in "
            "--slides: give one id per file, in the same order"
        )
    given: dict[str, Path] = {}
    for index, arg in enumerate(slide_args):
        slide_id, sep, path_text = arg.partition("=")
        if bound_ids is not None:
            slide_id, path = check_id(bound_ids[index], "--slide-ids"), Path(arg)
        elif sep and SLIDE_ID_PATTERN.match(slide_id) and not Path(arg).exists():
            path = Path(path_text)
        else:
            path = Path(arg)
            slide_id = default_slide_id(path)
        if slide_id in given:
            raise BmsegError(
                f"--slides: slide {slide_id!r} given twice ({given[slide_id]}, {path}); "
                "pass each slide once"
            )
        given[slide_id] = path
    needed = sorted(set(slide_ids))
    missing = [s for s in needed if s not in given]
    if missing:
        names = ", ".join(f"{s} ({p.name})" for s, p in given.items()) or "none"
        raise BmsegError(
            f"--slides: the batch needs slide(s) {', '.join(missing)} but was given {names}; "
            "pass their files (or ID=PATH)"
        )
    return {s: given[s] for s in needed}


def _slide_pixel_sizes(batch_path: Path, tiles: Sequence[Tile]) -> dict[str, float]:
    """The pixel size the batch table records for each slide (one per slide)."""
    sizes: dict[str, set[float]] = collections.defaultdict(set)
    for tile in tiles:
        sizes[tile.slide_id].add(tile.pixel_size_um)
    for slide_id, values in sizes.items():
        if len(values) != 1 or not min(values) > 0:
            raise BmsegError(
                f"{batch_path}: slide {slide_id} has pixel sizes {sorted(values)}; "
                "re-run bmseg plan and bmseg batch"
            )
    return {slide_id: values.pop() for slide_id, values in sizes.items()}


def check_tiles(batch_path: Path, tiles: Sequence[Tile], slides: dict[str, Slide]) -> None:
    """Every tile's read window is non-empty, inside its slide and contains its core."""
    for tile in tiles:
        bounds = slides[tile.slide_id].bounds
        where = f"{batch_path}: tile {tile.slide_id}/{tile.tile_id}"
        if tile.read.w <= 0 or tile.read.h <= 0 or tile.core.w <= 0 or tile.core.h <= 0:
            raise BmsegError(f"{where} has an empty core or read window; re-run bmseg plan")
        if tile.read.intersection(bounds) != tile.read:
            raise BmsegError(
                f"{where} reads {tile.read.as_dict()} outside the slide {bounds.as_dict()}; "
                "re-run bmseg plan for this slide file"
            )
        if tile.core.intersection(tile.read) != tile.core:
            raise BmsegError(f"{where}: core lies outside its read window; re-run bmseg plan")


# ---------------------------------------------------------------------------------- pixels


def to_rgb8(
    pixels: np.ndarray,
    modality: str,
    bit_depth: int | None = None,
    ranges: dict | None = None,
) -> np.ndarray:
    """The (H, W, 3) uint8 RGB image the models see.

    Brightfield RGB is scaled from its full scale: ``2**bit_depth - 1`` when the file records
    its bit depth (12- or 14-bit scanners writing uint16), else the dtype's maximum (uint8
    passes through untouched). Fluorescence channels are stretched from the slide's
    ``ranges`` (slide.json ``intensity``: ``low``, ``high`` per channel, from PLAN's
    low-resolution read), or without them from the tile's own 1st to 99.5th percentile, to
    0..255, and mapped to R, G, B in slide order: one channel is replicated to grey, two fill
    R and G, more than three keep the first three.
    """
    if modality == "brightfield" and pixels.shape[-1] == 3:
        if pixels.dtype == np.uint8:
            return pixels
        full = 1.0 if pixels.dtype.kind == "f" else float(np.iinfo(pixels.dtype).max)
        if bit_depth and pixels.dtype.kind in "ui" and 2**bit_depth - 1 < full:
            full = float(2**bit_depth - 1)
        return np.clip(pixels.astype(np.float32) * (255.0 / full), 0, 255).round().astype(np.uint8)
    selected = pixels[..., :3].astype(np.float32)
    if ranges is None:
        ranges = intensity_ranges(selected[::4, ::4])
    count = selected.shape[-1]
    low = np.asarray(ranges["low"][:count], np.float32)
    high = np.asarray(ranges["high"][:count], np.float32)
    scale = 255.0 / np.maximum(high - low, 1e-6)
    stretched = np.clip((selected - low) * scale, 0, 255).round().astype(np.uint8)
    if stretched.shape[-1] == 1:
        return np.repeat(stretched, 3, axis=-1)
    if stretched.shape[-1] == 2:
        return np.concatenate([stretched, np.zeros_like(stretched[..., :1])], axis=-1)
    return stretched


@dataclass(frozen=True)
class PlanRecords:
    """What SEGMENT takes from the slides' slide.json (``--plans``), by slide id."""

    intensity: dict[str, dict]
    """slide.json ``intensity``: the models' intensity scale (absent: per-tile stretching)."""
    choices: dict[str, dict]
    """``open_slide`` keywords PLAN decided: the ``modality`` and the ``plane`` it read."""


def read_plans(plan_paths: Sequence[str], slide_ids: Iterable[str]) -> PlanRecords:
    """slide.json records of the batch's slides, validated; slides without one are absent.

    Slides without an ``intensity`` record have their tiles stretched per tile (logged); a
    record that does not match its slide's channels, or a modality or plane that is not
    one, is an error naming the file.
    """
    import json

    wanted, records, choices = set(slide_ids), {}, {}
    for path_text in plan_paths:
        path = Path(path_text)
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
            slide_id, record = info["slide_id"], info.get("intensity")
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise BmsegError(
                f"--plans {path}: not a readable slide.json ({error}); pass the files bmseg plan "
                "wrote"
            ) from error
        if slide_id not in wanted:
            continue
        choices[slide_id] = _plan_choices(path, info)
        if record is None:
            continue
        channels = len(info.get("channels") or [])
        try:
            low = [float(v) for v in record["low"]]
            high = [float(v) for v in record["high"]]
            bits = record.get("bit_depth")
            bits = None if bits is None else int(bits)
        except (KeyError, TypeError, ValueError) as error:
            raise BmsegError(
                f"--plans {path}: bad intensity record ({error}); re-run bmseg plan"
            ) from error
        if (
            len(low) != len(high)
            or not np.isfinite(low + high).all()
            or (channels and len(low) != channels)
        ):
            raise BmsegError(
                f"--plans {path}: intensity ranges do not match the slide's {channels} channels; "
                "re-run bmseg plan"
            )
        records[slide_id] = {"low": low, "high": high, "bit_depth": bits}
    for slide_id in sorted(wanted - set(records)):
        log.info("slide %s: no slide.json intensity given (--plans): per-tile stretching", slide_id)
    return PlanRecords(records, choices)


def _plan_choices(path: Path, info: dict) -> dict:
    """slide.json's ``modality`` and ``plane``, checked, as :func:`open_slide` keywords."""
    modality, plane = info.get("modality"), info.get("plane") or {}
    plane_ok = isinstance(plane, dict) and all(
        isinstance(dim, str) and (isinstance(index, str) or type(index) is int)
        for dim, index in plane.items()
    )
    if modality not in (None, *MODALITIES) or not plane_ok:
        raise BmsegError(
            f"--plans {path}: modality {modality!r} or plane {plane!r} is not one bmseg plan "
            "writes; re-run bmseg plan"
        )
    return {"modality": modality, "plane": plane or None}


class TileReader:
    """Reads tiles on a pool of threads, one open :class:`Slide` per thread and slide."""

    def __init__(
        self,
        paths: dict[str, Path],
        pixel_sizes: dict[str, float],
        threads: int,
        intensity: dict[str, dict] | None = None,
        slide_choices: dict[str, dict] | None = None,
    ):
        self._paths = paths
        self._pixel_sizes = pixel_sizes
        self._intensity = intensity or {}
        self._choices = slide_choices or {}
        self._local = threading.local()
        self._opened: list[Slide] = []
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="bmseg-reader")
        self._depth = max(1, threads)

    def _slide(self, slide_id: str) -> Slide:
        slides = self._local.__dict__.setdefault("slides", {})
        if slide_id not in slides:
            slide = open_slide(
                self._paths[slide_id],
                pixel_size_um=self._pixel_sizes[slide_id],
                slide_id=slide_id,
                **self._choices.get(slide_id, {}),
            )
            slides[slide_id] = slide
            with self._lock:
                self._opened.append(slide)
        return slides[slide_id]

    def _read(self, tile: Tile) -> _Read:
        start = time.perf_counter()
        slide = self._slide(tile.slide_id)
        pixels = slide.read(tile.read.x, tile.read.y, tile.read.w, tile.read.h)
        record = self._intensity.get(tile.slide_id)
        bit_depth = (
            slide.bit_depth
            if record is None or record["bit_depth"] is None
            else record["bit_depth"]
        )
        rgb = to_rgb8(pixels, slide.modality, bit_depth, record)
        return tile, pixels, rgb, time.perf_counter() - start

    def iter_read(self, tiles: Sequence[Tile], lookahead: int) -> Iterator[_Read]:
        """Tiles' ``(tile, pixels, rgb, seconds)`` in order, ``lookahead`` reads kept in flight."""
        pending: collections.deque[Future] = collections.deque()
        remaining = iter(tiles)
        for tile in itertools.islice(remaining, self._depth + lookahead):
            pending.append(self._pool.submit(self._read, tile))
        while pending:
            result = pending.popleft().result()
            following = next(remaining, None)
            if following is not None:
                pending.append(self._pool.submit(self._read, following))
            yield result

    def close(self) -> None:
        """Stop the threads and close every slide they opened."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        for slide in self._opened:
            slide.close()


# ------------------------------------------------------------------------ cells of a tile


def _keep_labels(detections: Detections, keep: np.ndarray) -> Detections:
    """Only the cells where ``keep`` (one bool per cell), renumbered ``1..kept``."""
    if keep.all():
        return detections
    lookup = np.zeros(detections.count + 1, dtype=np.int32)
    lookup[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return Detections(labels=lookup[detections.labels], scores=detections.scores[keep])


def _checked(detections: Detections, shape: tuple[int, int], who: str) -> Detections:
    """Validate a segmenter's output against the interface (a bug if it fails)."""
    labels = np.asarray(detections.labels)
    if labels.shape != shape:
        raise RuntimeError(f"{who} returned labels of shape {labels.shape} for a {shape} tile")
    scores = np.asarray(detections.scores, dtype=np.float32).reshape(-1)
    if labels.size and int(labels.max()) > scores.size:
        raise RuntimeError(f"{who} returned label {labels.max()} but {scores.size} scores")
    return Detections(labels=labels.astype(np.int32, copy=False), scores=scores)


def filter_area(
    detections: Detections, pixel_size_um: float, min_um2: float, max_um2: float
) -> Detections:
    """Cells whose area lies in [min_um2, max_um2]."""
    area_um2 = np.bincount(detections.labels.ravel(), minlength=detections.count + 1)[1:]
    area_um2 = area_um2 * pixel_size_um**2
    return _keep_labels(detections, (area_um2 >= min_um2) & (area_um2 <= max_um2))


def keep_owned(detections: Detections, tile: Tile) -> Detections:
    """Cells whose centroid (slide px, mean pixel index) lies in the tile's half-open core."""
    from bmseg.features import cell_centroids

    cx, cy = cell_centroids(detections.labels, detections.count)
    cx, cy = cx + tile.read.x, cy + tile.read.y
    core = tile.core
    owned = (cx >= core.x) & (cx < core.right) & (cy >= core.y) & (cy < core.bottom)
    return _keep_labels(detections, owned)


def hspc_rect(tile: Tile, hspc_max_area_um2: float) -> Rect:
    """The part of a tile's read window the HSPC segmenter sees, in read-window px.

    The core plus an HSPC margin (:func:`bmseg.models.settings.hspc_margin_px`), not the MK
    margin: an owned HSPC lies wholly inside it, and Cellpose does a third of the work.
    """
    margin = hspc_margin_px(hspc_max_area_um2, tile.pixel_size_um)
    core = tile.core
    grown = Rect(core.x - margin, core.y - margin, core.w + 2 * margin, core.h + 2 * margin)
    seen = grown.intersection(tile.read)
    return Rect(seen.x - tile.read.x, seen.y - tile.read.y, seen.w, seen.h)


def hspc_windows(tiles: Sequence[Tile], hspc_max_area_um2: float) -> list[Rect]:
    """The slide rectangles SEGMENT hands the HSPC segmenter (:func:`hspc_rect`, in slide px):
    what a segmenter of known cells (the tests' oracle) must cut its labels from."""
    rects = [hspc_rect(t, hspc_max_area_um2) for t in tiles]
    return [
        Rect(t.read.x + r.x, t.read.y + r.y, r.w, r.h) for t, r in zip(tiles, rects, strict=True)
    ]


def overlap_fraction(cells: Detections, others: np.ndarray) -> np.ndarray:
    """Per cell, the share of its pixels where ``others`` (a label image) is non-zero."""
    flat = cells.labels.ravel()
    area = np.bincount(flat, minlength=cells.count + 1)[1:]
    shared = np.bincount(flat[others.ravel() > 0], minlength=cells.count + 1)[1:]
    return (shared / np.maximum(area, 1)).astype(np.float32)


@dataclass
class _TileCells:
    """One tile's kept cells, measured, waiting for their embeddings."""

    tile: Tile
    labels: np.ndarray
    hspc_labels: np.ndarray
    columns: dict[str, Any]
    squares: np.ndarray
    sampler: Any
    jpegs: list[bytes]
    jpeg_sides: np.ndarray


def _measure_tile(
    tile: Tile,
    pixels: np.ndarray,
    rgb: np.ndarray,
    channels: Sequence[Channel],
    mk: Detections,
    hspc: Detections,
    options: SegmentOptions,
) -> _TileCells:
    """Area filters, overlaps, ownership, then every per-cell column but the embedding.

    MKs and HSPCs are two layers: an HSPC under an MK mask is kept whole and records the
    overlap (docs/cells.md), so a classifier, not an unvalidated SAM2 mask, decides.
    """
    from bmseg import features

    px = tile.pixel_size_um
    mk = filter_area(mk, px, options.mk_min_area_um2, options.mk_max_area_um2)
    hspc = filter_area(hspc, px, options.hspc_min_area_um2, options.hspc_max_area_um2)
    # Overlaps against every cell of the other type in the window, owned or not, so two tiles
    # that both see a pair record it the same way.
    mk_all, hspc_all = mk.labels, hspc.labels
    mk, hspc = keep_owned(mk, tile), keep_owned(hspc, tile)
    overlaps = np.concatenate([overlap_fraction(mk, hspc_all), overlap_fraction(hspc, mk_all)])
    hspc_layer = np.where(hspc.labels > 0, hspc.labels + mk.count, 0).astype(np.uint32)
    labels = np.where(mk.labels > 0, mk.labels, hspc_layer).astype(np.uint32)
    count = mk.count + hspc.count
    names = [c.name for c in channels]
    columns: dict[str, Any] = {}
    for layer, n in ((mk.labels, mk.count), (hspc.labels, hspc.count)):
        measured = features.shape_features(layer, n, px, tile.read.x, tile.read.y)
        measured.update(features.intensity_stats(layer, pixels, names, n))
        for name, values in measured.items():
            columns[name] = _concat(columns[name], values) if name in columns else values
    local_boxes = np.stack(
        [
            columns["bbox_x_px"] - tile.read.x,
            columns["bbox_y_px"] - tile.read.y,
            columns["bbox_w_px"],
            columns["bbox_h_px"],
        ],
        axis=1,
    ).reshape(-1, 4)
    cell_type = np.array(["MK"] * mk.count + ["HSPC"] * hspc.count, dtype=object)
    uid_x = np.rint(columns["centroid_x_px"]).astype(np.int64)
    uid_y = np.rint(columns["centroid_y_px"]).astype(np.int64)
    columns = {
        "cell_uid": [
            f"{tile.slide_id}:{t}:{x}:{y}" for t, x, y in zip(cell_type, uid_x, uid_y, strict=True)
        ],
        "slide_id": [tile.slide_id] * count,
        "tile_id": [tile.tile_id] * count,
        "cell_type": cell_type.tolist(),
        **columns,
        "score": np.concatenate([mk.scores, hspc.scores]).astype(np.float32),
        "overlap_fraction": overlaps,
        "mask_label": np.arange(1, count + 1, dtype=np.int32),
    }
    squares = features.crop_squares(local_boxes)
    jpegs, jpeg_sides = features.gallery_jpegs(rgb, squares, options.crop_px)
    return _TileCells(
        tile=tile,
        labels=labels,
        hspc_labels=hspc_layer,
        columns=columns,
        squares=squares,
        sampler=features.CropSampler(rgb, device=options.device),
        jpegs=jpegs,
        jpeg_sides=jpeg_sides,
    )


def _concat(first: Any, second: Any) -> Any:
    """Two tiles' worth of one column: arrays concatenated, lists joined."""
    if isinstance(first, list):
        return first + list(second)
    return np.concatenate([first, second])


def _embed(embedder: Embedder, tiles: Sequence[_TileCells], batch: int) -> list[np.ndarray]:
    """Each tile's (N, dim) float16 embeddings; crops of all tiles pooled, ``batch`` per call.

    Crops are cut just before their forward pass, so at most ``batch`` of them exist at once.
    """
    counts = np.array([len(t.squares) for t in tiles], dtype=np.int64)
    starts = np.concatenate(([0], np.cumsum(counts)))
    out = np.zeros((int(starts[-1]), embedder.dim), dtype=np.float16)
    for first in range(0, int(starts[-1]), batch):
        last = min(first + batch, int(starts[-1]))
        crops = [
            cells.sampler.sample(
                cells.squares[max(first - start, 0) : last - start], embedder.crop_size
            )
            for cells, (start, stop) in zip(tiles, itertools.pairwise(starts), strict=True)
            if start < last and stop > first
        ]
        out[first:last] = np.asarray(embedder.embed(np.concatenate(crops)), dtype=np.float32)
    return [out[start:stop] for start, stop in itertools.pairwise(starts)]


# ---------------------------------------------------------------------------------- batch


def _groups(items: Iterator[_Read], size: int) -> Iterator[list[_Read]]:
    """Consecutive read tiles in groups of up to ``size`` sharing one pixel size."""
    group: list[_Read] = []
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

    reads: list[_Read]
    measured: list[_TileCells]
    embeddings: list[np.ndarray]
    seconds: dict[str, float]


def _segment_group(
    reads: list[_Read],
    segmenters: dict[str, Segmenter],
    timings: dict[str, float],
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
            _checked(d, image.shape[:2], f"{stage} segmenter")
            for d, image in zip(found, inputs[stage], strict=True)
        ]
        timings[stage] += time.perf_counter() - start
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
    reads: list[_Read],
    detected: dict[str, list[Detections]],
    channel_sets: dict[str, list[Channel]],
    embedder: Embedder,
    options: SegmentOptions,
) -> _Finished:
    """Measure the group's tiles and embed their cells (runs on a worker thread)."""
    start = time.perf_counter()
    measured = [
        _measure_tile(tile, pixels, rgb, channel_sets[tile.slide_id], mk, hspc, options)
        for (tile, pixels, rgb, _), mk, hspc in zip(
            reads, detected["mk"], detected["hspc"], strict=True
        )
    ]
    features_s = time.perf_counter() - start
    start = time.perf_counter()
    embeddings = _embed(embedder, measured, options.embed_batch)
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
    from tqdm import tqdm

    from bmseg.versions import package_versions

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
            parquet_writer(out_dir / "cells.parquet", schema) as cells_out,
            parquet_writer(out_dir / "crops.parquet", CROPS_SCHEMA) as crops_out,
            masks_writer(out_dir / "masks.h5") as masks_out,
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
                    _write_tile(cells, embeddings, schema, cells_out, crops_out, masks_out, options)
                write_s = time.perf_counter() - start
                for stage, seconds in finished.seconds.items():
                    stats.timings[stage] += seconds
                stats.timings["write"] += write_s
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
                stats.timings["read"] += sum(item[3] for item in group)
                before = stats.timings["mk"] + stats.timings["hspc"]
                detected = _segment_group(group, segmenters, stats.timings, options)
                segment_s = stats.timings["mk"] + stats.timings["hspc"] - before
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
    summary = {
        **record,
        "tiles": stats.tiles,
        "timings_s": {stage: round(value, 4) for stage, value in stats.timings.items()},
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
    write_json(summary, out_dir / "batch.json")
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


def _write_tile(
    cells: _TileCells,
    embeddings: np.ndarray,
    schema: pa.Schema,
    cells_out: Any,
    crops_out: Any,
    masks_out: Any,
    options: SegmentOptions,
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


# ---------------------------------------------------------------------------------- command


@writes_output_set
def _segment_command(args: argparse.Namespace) -> int:
    """``bmseg segment``: validate everything, load the models once, run the batch."""
    batch_path = Path(args.batch)
    number, tiles = read_batch_table(batch_path)
    slide_paths = match_slides((t.slide_id for t in tiles), args.slides, args.slide_ids)
    pixel_sizes = _slide_pixel_sizes(batch_path, tiles)
    apply_task_resources(args)
    for option in ("readers", "workers", "gpu_batch_tiles", "embed_batch", "crop_px"):
        if getattr(args, option) < 1:
            flag = "--" + option.replace("_", "-")
            raise BmsegError(f"{flag} {getattr(args, option)}: must be at least 1")
    plans = read_plans(args.plans or [], slide_paths)
    slides = {}
    try:
        for slide_id, path in slide_paths.items():
            slides[slide_id] = open_slide(
                path,
                pixel_size_um=pixel_sizes[slide_id],
                slide_id=slide_id,
                **plans.choices.get(slide_id, {}),
            )
        check_tiles(batch_path, tiles, slides)
    finally:
        for slide in slides.values():
            slide.close()
    log.info(
        "%s: batch %d, %d tiles of %d slide(s)", batch_path, number, len(tiles), len(slide_paths)
    )
    for slide_id, path in slide_paths.items():
        log.info("slide %s: %s", slide_id, path)
    models, record = _load_models(args)
    options = SegmentOptions(
        mk_min_area_um2=args.mk_min_area_um2,
        mk_max_area_um2=args.mk_max_area_um2,
        hspc_min_area_um2=args.hspc_min_area_um2,
        hspc_max_area_um2=args.hspc_max_area_um2,
        readers=args.readers,
        workers=args.workers,
        gpu_batch_tiles=args.gpu_batch_tiles,
        embed_batch=args.embed_batch,
        crop_px=args.crop_px,
        device=str(models.device),
        progress=not args.no_progress,
        intensity=plans.intensity,
        slide_choices=plans.choices,
    )
    segment_batch(
        tiles,
        slide_paths,
        models.mk,
        models.hspc,
        models.embedder,
        Path(args.out),
        options,
        {"batch": number, "device": str(models.device), "models": record},
    )
    return 0


def apply_task_resources(args: argparse.Namespace) -> None:
    """``--cpus`` and ``--attempt`` (a pipeline task's) turned into the options they set.

    Half the task's CPUs read tiles, half measure and embed cells; each earlier attempt (a
    GPU out-of-memory is retried) halves the tiles per GPU batch: 8, 4, 2, ... at least 1.
    """
    if args.cpus is not None:
        args.readers = args.workers = max(1, args.cpus // 2)
    if args.attempt < 1:
        raise BmsegError(f"--attempt {args.attempt}: must be at least 1")
    args.gpu_batch_tiles = max(1, args.gpu_batch_tiles // 2 ** (args.attempt - 1))


def _load_models(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The production models for ``args`` and a description of them for batch.json."""
    from dataclasses import asdict

    from bmseg.models import load_models

    mk_settings = MKSettings(
        min_area_um2=args.mk_min_area_um2,
        max_area_um2=args.mk_max_area_um2,
        points_per_side=args.mk_points_per_side,
        max_downsample=args.mk_max_downsample,
        pred_iou_thresh=args.mk_pred_iou_thresh,
    )
    hspc_settings = HSPCSettings(
        min_area_um2=args.hspc_min_area_um2,
        max_area_um2=args.hspc_max_area_um2,
        flows_method=args.hspc_flows_method,
        refine=args.hspc_refine,
        refine_iou_thresh=args.hspc_refine_iou,
        diameter_um=args.hspc_diameter_um,
    )
    embedder_settings = EmbedderSettings(batch_size=args.embed_batch)
    models = load_models(
        Path(args.models),
        args.device,
        mk_settings=mk_settings,
        hspc_settings=hspc_settings,
        embedder_settings=embedder_settings,
    )
    record = {
        "dir": str(args.models),
        "manifest": asdict(models.manifest),
        "mk": asdict(mk_settings),
        "hspc": asdict(hspc_settings),
        "embedder": asdict(embedder_settings),
    }
    return models, record


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bmseg segment``."""
    parser = subparsers.add_parser(
        "segment",
        help="segment one batch of tiles: cells.parquet, masks.h5, crops.parquet, batch.json",
        description=(
            "Find MKs (SAM2) and HSPCs (Cellpose-SAM) in every tile of a batch, keep the "
            "cells whose centroid lies in the tile's core, measure and embed them."
        ),
    )
    parser.add_argument("batch", metavar="BATCH", help="batch table (batch_NNNN.parquet)")
    parser.add_argument(
        "--slides",
        nargs="+",
        required=True,
        metavar="SLIDE",
        help="slide files the batch touches, matched to slide ids by file name; ID=PATH binds "
        "a file to an id explicitly",
    )
    parser.add_argument(
        "--slide-ids",
        type=id_list,
        metavar="ID,...",
        help="the id of each file in --slides, in their order (instead of names or ID=PATH)",
    )
    parser.add_argument(
        "--models",
        required=True,
        nargs="?",
        const=BAKED_MODELS_DIR,
        metavar="DIR",
        help=f"models directory (the flag alone: the image's baked-in {BAKED_MODELS_DIR})",
    )
    parser.add_argument(
        "--plans",
        nargs="+",
        metavar="SLIDE_JSON",
        help="the slides' {slide}.slide.json from bmseg plan: the modality and plane PLAN read, "
        "and each slide's intensity range for the models (default: the slide's own metadata, "
        "the first plane, each tile's own range)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument(
        "--device",
        default="auto",
        choices=DEVICE_CHOICES,
        help="compute device (auto: the GPU when torch sees one, CUDA or ROCm)",
    )
    parser.add_argument(
        "--mk-min-area-um2",
        metavar="UM2",
        type=float,
        default=MKSettings.min_area_um2,
        help="smallest MK kept, µm² (%(default)s)",
    )
    parser.add_argument(
        "--mk-max-area-um2",
        metavar="UM2",
        type=float,
        default=MKSettings.max_area_um2,
        help="largest MK kept, µm² (%(default)s)",
    )
    parser.add_argument(
        "--mk-points-per-side",
        metavar="N",
        type=int,
        default=MKSettings.points_per_side,
        help="SAM2 point grid per window side for MKs (default: one point per radius of the "
        "smallest MK, 36 per 2048 px window at 0.1725 µm/px)",
    )
    parser.add_argument(
        "--mk-max-downsample",
        metavar="F",
        type=float,
        default=MKSettings.max_downsample,
        help="largest downsampling SAM2 sees a tile at: windows of F x its input size "
        "(%(default)s)",
    )
    parser.add_argument(
        "--mk-pred-iou-thresh",
        metavar="IOU",
        type=float,
        default=MKSettings.pred_iou_thresh,
        help="SAM2 predicted-IoU threshold for MKs (%(default)s)",
    )
    parser.add_argument(
        "--hspc-min-area-um2",
        metavar="UM2",
        type=float,
        default=HSPCSettings.min_area_um2,
        help="smallest HSPC kept, µm² (%(default)s)",
    )
    parser.add_argument(
        "--hspc-max-area-um2",
        metavar="UM2",
        type=float,
        default=HSPCSettings.max_area_um2,
        help="largest HSPC kept, µm² (%(default)s)",
    )
    parser.add_argument(
        "--hspc-flows-method",
        "--hspc-flows",
        default=HSPCSettings.flows_method,
        choices=FLOWS_METHODS,
        help="how Cellpose flows become HSPC masks (%(default)s: the fast vectorised path)",
    )
    parser.add_argument(
        "--hspc-refine",
        action="store_true",
        help="refine HSPC masks with SAM2 box prompts on native-resolution windows (off: "
        "Cellpose's masks as they are; docs/models.md)",
    )
    parser.add_argument(
        "--hspc-refine-iou",
        metavar="IOU",
        type=float,
        default=HSPCSettings.refine_iou_thresh,
        help="with --hspc-refine: IoU with Cellpose's mask above which SAM2's mask is kept "
        "(%(default)s)",
    )
    parser.add_argument(
        "--hspc-diameter-um",
        metavar="UM",
        type=float,
        default=None,
        help="typical HSPC diameter, µm: Cellpose rescales the image so it is 30 px (default: "
        "no rescaling)",
    )
    parser.add_argument(
        "--readers", type=int, default=2, metavar="N", help="tile reader threads (2)"
    )
    parser.add_argument(
        "--workers",
        metavar="N",
        type=int,
        default=2,
        help="threads measuring and embedding segmented tiles while the device goes on (2)",
    )
    parser.add_argument(
        "--gpu-batch-tiles",
        type=int,
        default=1,
        metavar="N",
        help="tiles per segmentation call (1)",
    )
    parser.add_argument(
        "--cpus",
        type=int,
        metavar="N",
        help="CPUs to use: half read tiles, half measure cells (sets --readers and --workers)",
    )
    parser.add_argument(
        "--attempt",
        type=int,
        default=1,
        metavar="N",
        help="a retry's attempt number: each earlier attempt (a GPU out-of-memory) halves "
        "--gpu-batch-tiles (1)",
    )
    parser.add_argument(
        "--embed-batch",
        metavar="N",
        type=int,
        default=EmbedderSettings.batch_size,
        help="cell crops per embedding forward pass (%(default)s)",
    )
    parser.add_argument(
        "--crop-px",
        metavar="PX",
        type=int,
        default=GALLERY_CROP_PX,
        help="largest side of a gallery JPEG crop, px (%(default)s)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(handler=_segment_command)
