"""Label images (0 background, 1..n cells): the one way bmseg drops labels and renumbers the
rest, and fills the holes a single cell encloses.

Used by SEGMENT (cells filtered by area and ownership; holes filled on its CPU workers),
:mod:`bmseg.flows` (masks from flows), the MK mask painter and the fine-tuning step, on numpy
arrays and on torch tensors alike (hole filling: numpy only).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage


def relabel(labels: Any, kept: Sequence[int] | np.ndarray | Any, size: int | None = None) -> Any:
    """``labels`` with label ``kept[i]`` renamed ``i + 1`` and every other label set to 0, int32.

    ``kept`` lists distinct labels (> 0) in their new order: ascending to renumber 1..n keeping
    the order, or any order (the fine-tuning step's accepted cells, the painter's priorities).
    ``labels`` is a numpy array or a torch tensor (the result is of the same kind, on the same
    device); ``size``, when the caller knows it, is one more than the largest label, which
    spares a device-wide read of ``labels.max()``.
    """
    if isinstance(labels, np.ndarray):
        kept = np.asarray(kept, dtype=np.int64).reshape(-1)
        if size is None:
            size = int(max(labels.max(initial=0), kept.max(initial=0))) + 1
        lookup = np.zeros(size, np.int32)
        lookup[kept] = np.arange(1, kept.size + 1, dtype=np.int32)
        return lookup[labels]
    torch = sys.modules["torch"]  # a tensor was passed, so torch is imported already
    kept = torch.as_tensor(kept, device=labels.device).to(torch.int64).reshape(-1)
    if size is None:
        largest = labels.max() if labels.numel() else labels.new_zeros(())
        size = int(torch.maximum(largest, kept.max() if kept.numel() else largest)) + 1
    lookup = torch.zeros(size, dtype=torch.int32, device=labels.device)
    lookup[kept] = torch.arange(1, kept.numel() + 1, dtype=torch.int32, device=labels.device)
    flat = labels.reshape(-1).to(torch.int64)
    return lookup.index_select(0, flat).reshape(labels.shape)


def keep_where(labels: Any, keep: Any) -> Any:
    """``labels`` with only the labels where ``keep`` (bool, indexed by label; 0 ignored) kept,
    renumbered 1..kept in ascending order: :func:`relabel` of the flagged labels."""
    if isinstance(keep, np.ndarray):
        kept = np.flatnonzero(keep[1:]) + 1
    else:
        kept = keep[1:].nonzero().reshape(-1) + 1
    return relabel(labels, kept, size=len(keep))


def renumber(labels: Any) -> Any:
    """``labels`` with its labels renumbered 1..n in ascending order (0 stays 0), int32."""
    if isinstance(labels, np.ndarray):
        present = np.zeros(int(labels.max(initial=0)) + 1, bool)
        present[labels.ravel()] = True
        return keep_where(labels, present)
    values = labels.unique()
    return relabel(labels, values[values > 0])


def fill_single_mask_holes(masks: np.ndarray) -> None:
    """Fill, in place, every background region that does not reach the image border and touches
    exactly one mask: the holes Cellpose fills mask by mask, found with one labelling of the
    background (4-connected, as a flood fill from the border sees it)."""
    regions, n_regions = ndimage.label(masks == 0)
    enclosed = np.ones(n_regions + 1, bool)
    enclosed[0] = False
    enclosed[regions[[0, -1]]] = False
    enclosed[regions[:, [0, -1]]] = False
    if not enclosed.any():
        return
    width = masks.shape[1]
    flat_masks, flat_regions = masks.reshape(-1), regions.reshape(-1)
    hole_pixels = np.flatnonzero(enclosed[flat_regions])
    hole_region = flat_regions[hole_pixels]
    # An enclosed region never reaches the border, so its pixels' 4 neighbours exist.
    lowest = np.full(n_regions + 1, np.iinfo(masks.dtype).max, masks.dtype)
    highest = np.zeros(n_regions + 1, masks.dtype)
    for offset in (-width, -1, 1, width):
        neighbour = flat_masks[hole_pixels + offset]
        touching = neighbour > 0
        np.minimum.at(lowest, hole_region[touching], neighbour[touching])
        np.maximum.at(highest, hole_region[touching], neighbour[touching])
    fill = np.where(lowest == highest, highest, 0)
    flat_masks[hole_pixels] = fill[hole_region]
