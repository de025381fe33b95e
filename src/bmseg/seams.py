"""Cells two tiles both kept, found by the overlap of their contours (GATHER's seam resolution).

Tiles are read with a margin, so a cell on a seam is segmented by both tiles;
:func:`find_duplicates` finds such pairs with a spatial index over the cell table's boxes and
compares their filled contours only where the boxes allow the overlap.
"""

from __future__ import annotations

import cv2
import numpy as np
import pyarrow as pa

from bmseg.cell_tables import dictionary_codes, flat_contours


def _overlap_over_smaller(
    first: int, second: int, contours: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> float:
    """Overlap of two cells' filled contours divided by the smaller area (rasterised)."""
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
    slide_code, _ = dictionary_codes(meta["slide_id"])
    type_code, _ = dictionary_codes(meta["cell_type"])
    tile_code, _ = dictionary_codes(meta["tile_id"])
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
