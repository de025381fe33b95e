"""The cells of one tile: the segmenters' detections checked, filtered by area, kept where the
tile owns them, measured into ``cells.parquet`` columns, and embedded."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bmseg import features
from bmseg.label_images import fill_single_mask_holes, keep_where
from bmseg.models.base import Detections, Embedder, SquareEmbedder
from bmseg.models.settings import hspc_margin_px
from bmseg.segment.options import SegmentOptions
from bmseg.segment.tiles import Tile
from bmseg.slide import Channel, Rect


def keep_labels(detections: Detections, keep: np.ndarray) -> Detections:
    """Only the cells where ``keep`` (one bool per cell), renumbered ``1..kept``."""
    if keep.all():
        return detections
    labels = keep_where(detections.labels, np.concatenate(([False], keep)))
    return Detections(labels=labels, scores=detections.scores[keep])


def checked(detections: Detections, shape: tuple[int, int], who: str) -> Detections:
    """Validate a segmenter's output against the interface (a bug if it fails), and fill the
    holes it left to the CPU (:attr:`Detections.fill_holes`): on SEGMENT's workers."""
    labels = np.asarray(detections.labels)
    if labels.shape != shape:
        raise RuntimeError(f"{who} returned labels of shape {labels.shape} for a {shape} tile")
    scores = np.asarray(detections.scores, dtype=np.float32).reshape(-1)
    if labels.size and int(labels.max()) > scores.size:
        raise RuntimeError(f"{who} returned label {labels.max()} but {scores.size} scores")
    labels = labels.astype(np.int32, copy=detections.fill_holes)
    if detections.fill_holes:
        fill_single_mask_holes(labels)
    return Detections(labels=labels, scores=scores)


def filter_area(
    detections: Detections, pixel_size_um: float, min_um2: float, max_um2: float
) -> Detections:
    """Cells whose area lies in [min_um2, max_um2]."""
    area_um2 = np.bincount(detections.labels.ravel(), minlength=detections.count + 1)[1:]
    area_um2 = area_um2 * pixel_size_um**2
    return keep_labels(detections, (area_um2 >= min_um2) & (area_um2 <= max_um2))


def keep_owned(detections: Detections, tile: Tile) -> Detections:
    """Cells whose centroid (slide px, mean pixel index) lies in the tile's half-open core."""
    cx, cy = features.cell_centroids(detections.labels, detections.count)
    cx, cy = cx + tile.read.x, cy + tile.read.y
    core = tile.core
    owned = (cx >= core.x) & (cx < core.right) & (cy >= core.y) & (cy < core.bottom)
    return keep_labels(detections, owned)


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
class TileCells:
    """One tile's kept cells, measured, waiting for their embeddings."""

    tile: Tile
    labels: np.ndarray
    hspc_labels: np.ndarray
    columns: dict[str, Any]
    squares: np.ndarray
    rgb: np.ndarray
    jpegs: list[bytes]
    jpeg_sides: np.ndarray


def measure_tile(
    tile: Tile,
    pixels: np.ndarray,
    rgb: np.ndarray,
    channels: Sequence[Channel],
    mk: Detections,
    hspc: Detections,
    options: SegmentOptions,
) -> TileCells:
    """Area filters, overlaps, ownership, then every per-cell column but the embedding.

    MKs and HSPCs are two layers: an HSPC under an MK mask is kept whole and records the
    overlap (docs/cells.md), so a classifier, not an unvalidated SAM2 mask, decides.
    """
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
    return TileCells(
        tile=tile,
        labels=labels,
        hspc_labels=hspc_layer,
        columns=columns,
        squares=squares,
        rgb=rgb,
        jpegs=jpegs,
        jpeg_sides=jpeg_sides,
    )


def _concat(first: Any, second: Any) -> Any:
    """Two tiles' worth of one column: arrays concatenated, lists joined."""
    if isinstance(first, list):
        return first + list(second)
    return np.concatenate([first, second])


def embed_cells(
    embedder: Embedder,
    tiles: Sequence[TileCells],
    batch: int,
    device: str = "cpu",
    hspc_px: int | None = None,
) -> list[np.ndarray]:
    """Each tile's (N, dim) float16 embeddings, on the calling (worker) thread.

    An embedder that cuts its own crops (:class:`SquareEmbedder`, ResNet-50: on a GPU by
    roi_align on the device, on the CPU by OpenCV) gets each tile and its squares, one call
    per tile, and batches them itself by its own batch size (``EmbedderSettings.batch_size``);
    ``batch`` and ``device`` are then unused. Any other embedder gets host crops, cut by a
    :class:`bmseg.features.CropSampler` on ``device`` just before their forward pass and
    pooled over the tiles, ``batch`` per call, so at most ``batch`` of them exist at once.
    ``bmseg segment --embed-batch`` sets ``batch`` and ResNet-50's batch size to one value.
    ``hspc_px`` (a square embedder only) resamples HSPC squares to that side instead (112:
    a quarter of the pixels; ResNet-50's pooled embedding keeps its size); MKs keep the
    embedder's crop size.
    """
    counts = np.array([len(t.squares) for t in tiles], dtype=np.int64)
    starts = np.concatenate(([0], np.cumsum(counts)))
    out = np.zeros((int(starts[-1]), embedder.dim), dtype=np.float16)
    own_side = hspc_px in (None, embedder.crop_size)
    if isinstance(embedder, SquareEmbedder):
        for cells, (start, stop) in zip(tiles, itertools.pairwise(starts), strict=True):
            rows = out[start:stop]
            if own_side:
                parts = [(slice(None), None)]
            else:
                hspc = np.asarray(cells.columns["cell_type"]) == "HSPC"
                parts = [(~hspc, None), (hspc, hspc_px)]
            for part, size in parts:
                squares = cells.squares[part]
                if len(squares):
                    embedded = embedder.embed_squares(cells.rgb, squares, size)
                    rows[part] = np.asarray(embedded, dtype=np.float32)
        return [out[start:stop] for start, stop in itertools.pairwise(starts)]
    if not own_side:
        raise ValueError(f"HSPC crops at {hspc_px} px need an embedder that cuts its own crops")
    samplers = [features.CropSampler(cells.rgb, device=device) for cells in tiles]
    for first in range(0, int(starts[-1]), batch):
        last = min(first + batch, int(starts[-1]))
        crops = [
            sampler.sample(cells.squares[max(first - start, 0) : last - start], embedder.crop_size)
            for cells, sampler, (start, stop) in zip(
                tiles, samplers, itertools.pairwise(starts), strict=True
            )
            if start < last and stop > first
        ]
        out[first:last] = np.asarray(embedder.embed(np.concatenate(crops)), dtype=np.float32)
    return [out[start:stop] for start, stop in itertools.pairwise(starts)]
