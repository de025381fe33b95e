"""Mask arithmetic on the device: low-resolution filtering, upsampling inside boxes, painting.

SAM2's mask decoder predicts 256 × 256 logits for the whole (resized) tile. Upsampling every
candidate to the 3000 × 3000 tile is what made the old script slow (and overflowed INT_MAX on
ROCm), so candidates are filtered here at low resolution and only survivors are upsampled, each
inside its own box. A set of masks is carried as ``boxes`` (K, 4) int64 ``x0, y0, x1, y1``
(half-open, tile px) plus ``windows`` (K, Hm, Wm) bool, where mask ``k`` occupies the top-left
``(y1 - y0, x1 - x0)`` of its window and the rest is False.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sam2.utils.amg import batched_mask_to_box, calculate_stability_score
from scipy.sparse.csgraph import connected_components

from bmseg.label_images import relabel
from bmseg.models.base import Detections

WINDOW_BUDGET = 1 << 26
"""Most window pixels (K × Hm × Wm) handled at once; bounds device memory for odd boxes."""


@dataclass
class LowResFilter:
    """Candidate filters applied to low-resolution logits, before anything is upsampled."""

    mask_threshold: float
    pred_iou_thresh: float
    stability_score_thresh: float
    stability_score_offset: float
    min_area_px: float
    max_area_px: float


def filter_lowres(
    logits: torch.Tensor, iou_preds: torch.Tensor, px_per_lowres_px: float, rules: LowResFilter
) -> torch.Tensor:
    """Boolean keep-vector for (N, h, w) low-res ``logits`` with predicted IoUs ``iou_preds``.

    Predicted IoU as SAM2 filters it; the full-resolution area of a candidate is estimated as
    its low-res pixel count times ``px_per_lowres_px`` (the upsampling factor squared), with
    10 % slack either side: exact areas and the stability score are decided on the upsampled
    logits (:func:`upsampled_stats`), where they are checked again.
    """
    # The slack-widened range in whole low-res pixels (at most all of them): one clamp tests
    # both ends; a range holding no whole count keeps nothing.
    fewest = math.ceil(0.9 * rules.min_area_px / px_per_lowres_px)
    pixels = logits.shape[-2] * logits.shape[-1]
    most = math.floor(min(1.1 * rules.max_area_px / px_per_lowres_px, pixels))
    if fewest > most:
        return torch.zeros_like(iou_preds, dtype=torch.bool)
    count = (logits > rules.mask_threshold).sum(dim=(-2, -1))
    return (count.clamp(fewest, most) == count) & (iou_preds > rules.pred_iou_thresh)


def upsampled_stats(
    logits: torch.Tensor, boxes: torch.Tensor, out_hw: tuple[int, int], rules: LowResFilter
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stability score, area and inclusive box (x0, y0, x1, y1) of each upsampled mask.

    The stability score is SAM2's (``calculate_stability_score`` on the logits upsampled to the
    image: |logits > t + offset| / |logits > t − offset|), computed inside ``boxes``, which must
    hold every pixel above ``t − offset`` (:func:`lowres_boxes` at that threshold does).
    """
    sampled, valid = sample_in_boxes(logits, boxes, out_hw)
    sampled = torch.where(valid, sampled, torch.full_like(sampled, -torch.inf))
    stability = calculate_stability_score(
        sampled, rules.mask_threshold, rules.stability_score_offset
    )
    masks = sampled > rules.mask_threshold
    area = masks.sum(dim=(1, 2))
    tight = batched_mask_to_box(masks) + boxes[:, :2].repeat(1, 2)
    return stability.nan_to_num(0.0), area, tight


def lowres_boxes(
    logits: torch.Tensor, threshold: float, tile_hw: tuple[int, int], pad: float = 1.0
) -> torch.Tensor:
    """Tile-pixel boxes (K, 4) int64 enclosing every pixel the upsampled masks can cover.

    Bilinear upsampling makes a tile pixel positive only next to a positive low-res pixel, so
    the low-res box grown by ``pad`` low-res pixels and scaled up contains the full mask.
    """
    height, width = tile_hw
    low_h, low_w = logits.shape[-2:]
    box = batched_mask_to_box(logits > threshold).float()  # x0, y0, x1, y1 inclusive
    scale = box.new_tensor([width / low_w, height / low_h, width / low_w, height / low_h])
    grown = (box + box.new_tensor([-pad, -pad, 1 + pad, 1 + pad])) * scale
    limit = box.new_tensor([width, height, width, height])
    return torch.minimum(torch.maximum(grown, torch.zeros_like(grown)), limit).round().long()


def grow_boxes(boxes: torch.Tensor, fraction: float, tile_hw: tuple[int, int]) -> torch.Tensor:
    """``boxes`` enlarged by ``fraction`` of their size on every side, clipped to the tile."""
    size = (boxes[:, 2:] - boxes[:, :2]).float()
    margin = (size * fraction).ceil().long().repeat(1, 2)
    grown = boxes + margin * boxes.new_tensor([-1, -1, 1, 1])
    limit = boxes.new_tensor([tile_hw[1], tile_hw[0], tile_hw[1], tile_hw[0]])
    return torch.minimum(torch.maximum(grown, torch.zeros_like(grown)), limit)


def window_chunks(boxes: torch.Tensor, budget: int = WINDOW_BUDGET) -> Iterator[torch.Tensor]:
    """Index chunks of ``boxes``, similar sizes together, each within ``budget`` window pixels."""
    if len(boxes) == 0:
        return
    sizes = boxes[:, 2:] - boxes[:, :2]
    order = torch.argsort(sizes[:, 0] * sizes[:, 1])
    max_h, max_w = sizes[order, 1].cummax(0).values, sizes[order, 0].cummax(0).values
    start = 0
    while start < len(order):
        # Largest chunk [start, end) whose padded window stays within budget (at least one box).
        counts = torch.arange(1, len(order) - start + 1, device=boxes.device)
        cost = counts * max_h[start:].clamp(min=1) * max_w[start:].clamp(min=1)
        end = start + max(1, int((cost <= budget).sum()))
        yield order[start:end]
        start = end


def _window_grid(boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tile pixel rows (K, Hm), columns (K, Wm) of each window, and their (K, Hm, Wm) validity."""
    sizes = boxes[:, 2:] - boxes[:, :2]
    height, width = int(sizes[:, 1].max()), int(sizes[:, 0].max())
    dy = torch.arange(height, device=boxes.device)
    dx = torch.arange(width, device=boxes.device)
    rows = boxes[:, 1:2] + dy
    cols = boxes[:, 0:1] + dx
    valid = (dy[None, :, None] < sizes[:, 1, None, None]) & (
        dx[None, None, :] < sizes[:, 0, None, None]
    )
    return rows, cols, valid


def sample_in_boxes(
    logits: torch.Tensor, boxes: torch.Tensor, out_hw: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Upsampled logits (K, Hm, Wm) of (K, h, w) low-res ``logits`` inside ``boxes``, and validity.

    Identical to bilinear ``F.interpolate(..., size=out_hw, align_corners=False)`` of the whole
    logit map (SAM2's own postprocessing) followed by cropping, but only the box is computed.
    """
    height, width = out_hw
    rows, cols, valid = _window_grid(boxes)
    grid_y = (rows.float() + 0.5) / height * 2 - 1
    grid_x = (cols.float() + 0.5) / width * 2 - 1
    grid = torch.stack(torch.broadcast_tensors(grid_x[:, None, :], grid_y[:, :, None]), dim=-1).to(
        logits.dtype
    )
    sampled = F.grid_sample(
        logits[:, None], grid, mode="bilinear", padding_mode="border", align_corners=False
    )[:, 0]
    return sampled, valid


def upsample_in_boxes(
    logits: torch.Tensor, boxes: torch.Tensor, out_hw: tuple[int, int], threshold: float
) -> torch.Tensor:
    """Binary masks (K, Hm, Wm): :func:`sample_in_boxes` above ``threshold``."""
    sampled, valid = sample_in_boxes(logits, boxes, out_hw)
    return (sampled > threshold) & valid


def window_pixels(
    boxes: torch.Tensor, windows: torch.Tensor, tile_hw: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat tile-pixel indices of the True pixels of box windows, and the mask each belongs to."""
    k, dy, dx = torch.nonzero(windows, as_tuple=True)
    return (boxes[k, 1] + dy) * tile_hw[1] + boxes[k, 0] + dx, k


def _sparse_gram(rows: torch.Tensor, cols: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Dense ``A @ A.T`` of the 0/1 matrix with ones at (rows, cols), through sparse storage."""

    ones = torch.ones(len(rows), device=rows.device)
    matrix = torch.sparse_coo_tensor(
        torch.stack([rows, cols]), ones, shape, check_invariants=False
    ).coalesce()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        return torch.sparse.mm(matrix, matrix.t()).to_dense()


def pair_intersections(
    flat: torch.Tensor,
    owner: torch.Tensor,
    boxes: torch.Tensor,
    tile_width: int,
    budget: int = WINDOW_BUDGET,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every ordered pair ``(i, j)`` of masks sharing pixels, and how many: three (P,) tensors.

    Masks are pixel lists (``flat`` tile-pixel indices, ``owner`` mask index) with inclusive
    ``boxes`` (K, 4). Masks whose boxes chain together form groups; each group's masks are
    laid out densely over the group's box and intersected by one matrix product, so deep
    overlaps (many masks over one pixel) cost a product, not a pass per depth; a group whose
    dense layout would exceed ``budget`` entries (boxes chaining across a packed tile) is
    multiplied in sparse storage instead.
    """

    count = len(boxes)
    b = boxes.cpu().numpy()
    meets = (
        (b[:, None, 0] <= b[None, :, 2])
        & (b[None, :, 0] <= b[:, None, 2])
        & (b[:, None, 1] <= b[None, :, 3])
        & (b[None, :, 1] <= b[:, None, 3])
    )
    _, group = connected_components(meets, directed=False)
    group_t = torch.from_numpy(group).to(flat.device)
    order = torch.argsort(group_t[owner], stable=True)
    flat, owner = flat[order], owner[order]
    pixel_group = group_t[owner].cpu().numpy()
    sizes = np.bincount(group, minlength=group.max(initial=-1) + 1)
    starts = np.searchsorted(pixel_group, np.arange(len(sizes) + 1))
    rank = torch.zeros(count, dtype=torch.long, device=flat.device)
    pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for g in np.flatnonzero(sizes > 1):
        members = torch.from_numpy(np.flatnonzero(group == g)).to(flat.device)
        rank[members] = torch.arange(len(members), device=flat.device)
        x0, y0 = (int(v) for v in b[members.cpu().numpy(), :2].min(axis=0))
        x1, y1 = (int(v) + 1 for v in b[members.cpu().numpy(), 2:].max(axis=0))
        pixels, owners = flat[starts[g] : starts[g + 1]], owner[starts[g] : starts[g + 1]]
        local = (pixels // tile_width - y0) * (x1 - x0) + pixels % tile_width - x0
        shape = (len(members), (y1 - y0) * (x1 - x0))
        if shape[0] * shape[1] <= budget:
            dense = torch.zeros(shape, device=flat.device)
            dense[rank[owners], local] = 1.0
            shared = (dense @ dense.T).round().long()
        else:  # a long chain of boxes (a packed tile): overlaps are shallow, go sparse
            shared = _sparse_gram(rank[owners], local, shape).round().long()
        shared.fill_diagonal_(0)
        i, j = torch.nonzero(shared, as_tuple=True)
        pairs.append((members[i], members[j], shared[i, j]))
    if not pairs:
        empty = owner.new_zeros(0)
        return empty, empty, empty
    return tuple(torch.cat(parts) for parts in zip(*pairs, strict=True))


def nested_in_larger(
    flat: torch.Tensor,
    owner: torch.Tensor,
    boxes: torch.Tensor,
    tile_width: int,
    scores: torch.Tensor,
    thresh: float,
) -> torch.Tensor:
    """Bool (K,): masks whose ``thresh`` share or more lies inside a larger mask.

    Masks are pixel lists (``flat`` tile-pixel indices, ``owner`` mask index) with inclusive
    ``boxes`` (K, 4). For masks ``i`` and ``j`` with ``|i ∩ j| ≥ thresh · min(|i|, |j|)`` the
    smaller one is nested in the other and flagged; of two equal areas the lower score (then
    the later index) is flagged. Every pair is judged on its own (a mask nested in a flagged
    mask is flagged too).
    """
    count = len(boxes)
    nested = torch.zeros(count, dtype=torch.bool, device=flat.device)
    if count == 0:
        return nested
    area = torch.bincount(owner, minlength=count)
    i, j, shared = pair_intersections(flat, owner, boxes, tile_width)
    larger = (area[i] > area[j]) | (
        (area[i] == area[j]) & ((scores[i] > scores[j]) | ((scores[i] == scores[j]) & (i < j)))
    )
    flagged = larger & (shared.float() >= thresh * area[j].float())
    nested[j[flagged]] = True
    return nested


def crop_labels(labels: torch.Tensor, boxes: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Binary windows (K, Hm, Wm) of the cells ``ids`` of label image ``labels``, in ``boxes``."""
    rows, cols, valid = _window_grid(boxes)
    height, width = labels.shape
    window = labels[rows.clamp(max=height - 1)[:, :, None], cols.clamp(max=width - 1)[:, None, :]]
    return (window == ids[:, None, None]) & valid


class Painter:
    """Paints box-window masks into one label image; where masks overlap, higher score wins.

    Masks are added chunk by chunk (:meth:`add`), each with a priority (its score's rank), and
    every pixel keeps the mask of highest priority: a pixel belongs to at most one cell.
    """

    def __init__(self, tile_hw: tuple[int, int], device: torch.device) -> None:
        self.tile_hw = tile_hw
        self.winner = torch.full((tile_hw[0] * tile_hw[1],), -1, dtype=torch.long, device=device)

    def add(self, boxes: torch.Tensor, windows: torch.Tensor, priority: torch.Tensor) -> None:
        """Add masks ``windows`` at ``boxes`` with int64 ``priority`` (unique, ≥ 0)."""
        flat, k = window_pixels(boxes, windows, self.tile_hw)
        self.add_pixels(flat, priority[k])

    def add_pixels(self, flat: torch.Tensor, priority: torch.Tensor) -> None:
        """Add pixels ``flat`` (tile-pixel indices) each with its mask's ``priority``."""
        self.winner.scatter_reduce_(0, flat, priority, reduce="amax")

    def labels(self, min_area_px: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(H, W) int32 labels 1..n in priority order (highest first) and the n priorities kept.

        Masks left with fewer than ``min_area_px`` pixels after losing overlaps are dropped.
        """
        painted = self.winner[self.winner >= 0]
        if painted.numel() == 0:
            empty = torch.zeros(self.tile_hw, dtype=torch.int32, device=self.winner.device)
            return empty, painted
        priorities, areas = torch.unique(painted, return_counts=True)
        kept = priorities[areas >= min_area_px].flip(0)
        size = int(priorities.max()) + 2
        return relabel(self.winner + 1, kept + 1, size).reshape(self.tile_hw), kept

    def detections(
        self,
        scores: torch.Tensor,
        priority: torch.Tensor,
        min_area_px: float,
        fill_holes: bool = False,
    ) -> Detections:
        """The painted cells as :class:`Detections`, ``scores[i]`` added with ``priority[i]``
        (``fill_holes``: see :attr:`Detections.fill_holes`)."""
        labels, kept = self.labels(min_area_px)
        index_of = torch.empty_like(priority)
        index_of[priority] = torch.arange(len(priority), device=priority.device)
        return Detections(
            labels.cpu().numpy().astype(np.int32, copy=False),
            scores[index_of[kept]].clamp(0, 1).float().cpu().numpy(),
            fill_holes,
        )


def score_priority(scores: torch.Tensor) -> torch.Tensor:
    """Unique int64 priorities ordering ``scores`` ascending (ties: the earlier index wins)."""
    order = torch.argsort(scores, stable=True, descending=True)
    priority = torch.empty_like(order)
    priority[order] = torch.arange(len(order) - 1, -1, -1, device=order.device)
    return priority


def label_boxes(labels: torch.Tensor, count: int) -> torch.Tensor:
    """Half-open boxes (count, 4) int64 of labels 1..count in a label image, vectorised."""
    ys, xs = torch.nonzero(labels > 0, as_tuple=True)
    index = labels[ys, xs].long() - 1
    big = torch.iinfo(torch.long).max
    boxes = torch.stack(
        [
            torch.full((count,), big, device=labels.device).scatter_reduce(0, index, xs, "amin"),
            torch.full((count,), big, device=labels.device).scatter_reduce(0, index, ys, "amin"),
            torch.zeros(count, dtype=torch.long, device=labels.device).scatter_reduce(
                0, index, xs + 1, "amax"
            ),
            torch.zeros(count, dtype=torch.long, device=labels.device).scatter_reduce(
                0, index, ys + 1, "amax"
            ),
        ],
        dim=1,
    )
    return boxes
