"""Fast Cellpose flows → masks: shared trajectories by pointer jumping on a discretised flow.

Cellpose turns its network output (flows ``dP`` and cell-probability logits) into a label image
by Euler-integrating every foreground pixel for ``niter`` steps, clustering where the pixels end,
then dropping masks whose flows disagree with the network's (flow-error QC), tiny masks and
holes. Following 9 M pixels for 200 steps and re-diffusing flows for the QC dominate its time on
a 3000² tile. :func:`compute_masks` keeps the parameters and meaning of
``cellpose.dynamics.compute_masks`` but

* turns each pixel's flow into a pointer to one of its 8 neighbours, so that a
  trajectory is a path in a graph and ``niter`` steps of every pixel at once is the ``niter``-th
  power of the pointer array, found with ~2·log2(niter) gathers (pointer jumping) instead of
  ``niter`` interpolations per pixel;
* clusters the end points like Cellpose (histogram of end points; end points reached by more
  than 2 pixels grouped into sinks when up to 2 px apart; a sink needs more than 10 pixels);
* checks each mask's flows against flows pointing straight at its centre (the pixel Cellpose
  starts its diffusion from) instead of re-running Cellpose's heat diffusion;
* fills holes by labelling the background once, not cell by cell.

docs/flows.md describes the method and where its results can differ from Cellpose's. One torch
implementation serves every device; only hole filling runs on the CPU (SciPy): SEGMENT takes
the labels on the device (:func:`label_flows`) and fills the holes on its CPU workers.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
from cellpose import dynamics, utils

from bmseg.label_images import fill_single_mask_holes, keep_where, renumber
from bmseg.models.choices import DEFAULT_FLOWS_METHOD, FLOWS_METHODS
from bmseg.models.device import resolve_device

log = logging.getLogger(__name__)

# A flow component counts as a step along its axis when it is at least tan(22.5°) of the other:
# the flow's angle is rounded to the nearest of the 8 neighbour directions.
_TAN_22_5 = math.tan(math.pi / 8)
# Cellpose's flows are 5 × unit vectors and it integrates dP / 5 per step.
_FLOW_SCALE = 5.0
# Cellpose's clustering thresholds (get_masks_torch): a seed is reached by more than 10 pixels,
# and a mask grows over end points reached by more than 2.
_SEED_MIN_HITS = 10
_SINK_MIN_HITS = 2
# End points up to this many pixels apart (in y and in x) belong to one sink, as peaks within
# Cellpose's 5×5 max-pool window make one seed.
_SINK_REACH = 2


def _torch_device(device: str | torch.device | None) -> torch.device:
    """The device to run on: the CPU when unset, a torch device as given, and a name as
    ``--device`` takes it (``auto``, ``cpu``, ``cuda``), through the models' own resolver."""
    if device is None:
        return torch.device("cpu")
    if isinstance(device, torch.device):
        return device
    return resolve_device(device)


def label_flows(
    dP: np.ndarray | torch.Tensor,
    cellprob: np.ndarray | torch.Tensor,
    *,
    cellprob_threshold: float = 0.0,
    flow_threshold: float = 0.4,
    niter: int = 200,
    min_size: int = 15,
    max_size_fraction: float = 0.4,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """:func:`compute_masks` up to its last step: the label image as an (H, W) int32 tensor on
    ``device``, holes not yet filled, so that SEGMENT keeps it on the GPU and leaves the
    filling (:func:`bmseg.label_images.fill_single_mask_holes`) to the CPU workers."""
    _check_inputs(dP, cellprob, niter)
    height, width = cellprob.shape
    torch_device = _torch_device(device)
    with torch.inference_mode():
        prob = _tensor(cellprob, torch_device)
        # One pixel of background around the image: steps never leave the array, and a step
        # out of the image ends on background, so the pixel stays (Cellpose clamps there).
        foreground = torch.zeros((height + 2, width + 2), dtype=torch.bool, device=torch_device)
        foreground[1:-1, 1:-1] = prob > cellprob_threshold  # NaN compares False: background
        del prob
        if not bool(foreground.any()):
            log.debug("no pixel above cellprob_threshold %s", cellprob_threshold)
            return torch.zeros((height, width), dtype=torch.int32, device=torch_device)
        flows = _tensor(dP, torch_device).to(torch.float32)
        flows = torch.nan_to_num(flows, nan=0.0, posinf=0.0, neginf=0.0)
        ends = _follow(_neighbour_pointers(flows, foreground, niter), niter)
        labels = _cluster_ends(ends, foreground).reshape(height + 2, width + 2)
        labels = labels[1:-1, 1:-1].contiguous()
        del ends, foreground
        sizes = torch.bincount(labels.reshape(-1))
        drop = sizes > max_size_fraction * height * width
        if flow_threshold is not None and flow_threshold > 0:
            drop |= _flow_errors(labels, flows, sizes) > flow_threshold
        if min_size > 0:
            drop |= sizes < min_size
        return _drop_labels(labels, drop)


def compute_masks(
    dP: np.ndarray | torch.Tensor,
    cellprob: np.ndarray | torch.Tensor,
    *,
    fill_holes: bool = True,
    **params: Any,
) -> np.ndarray:
    """Label image (H, W) int32, labels 1..n, from Cellpose flows ``dP`` (2, H, W; dy, dx) and
    cell-probability logits ``cellprob`` (H, W).

    Pixels with ``cellprob > cellprob_threshold`` follow their flow for ``niter`` steps; masks
    larger than ``max_size_fraction`` of the image, with a flow error above ``flow_threshold``
    (0 or less turns the QC off) or smaller than ``min_size`` pixels (0 or less keeps all) are
    dropped (:func:`label_flows`, whose keyword parameters ``params`` are); ``fill_holes``
    fills background enclosed by a single mask.
    """
    masks = label_flows(dP, cellprob, **params).cpu().numpy()
    if fill_holes:
        fill_single_mask_holes(masks)
    log.debug("%d masks in a %dx%d image", int(masks.max(initial=0)), *masks.shape)
    return masks


def flows_to_masks(
    dP: np.ndarray, cellprob: np.ndarray, method: str = DEFAULT_FLOWS_METHOD, **params: Any
) -> np.ndarray:
    """Masks from Cellpose network output by ``method``: "bmseg" (:func:`compute_masks`) or
    "cellpose" (``cellpose.dynamics.compute_masks``), same keyword parameters, same output."""
    if method == "bmseg":
        return compute_masks(dP, cellprob, **params)
    if method == "cellpose":
        return cellpose_compute_masks(dP, cellprob, **params)
    raise ValueError(f"unknown flows method {method!r}; use one of {FLOWS_METHODS}")


def flows_to_labels(
    dP: np.ndarray | torch.Tensor,
    cellprob: np.ndarray | torch.Tensor,
    method: str = DEFAULT_FLOWS_METHOD,
    **params: Any,
) -> torch.Tensor:
    """:func:`flows_to_masks` as an int32 tensor on ``params["device"]``: by "bmseg" the labels
    never leave the device and their holes are left unfilled (:func:`label_flows`; SEGMENT's
    workers fill them); by "cellpose", Cellpose 4's own post-processing, its hole filling
    included, on the CPU."""
    if method == "bmseg":
        return label_flows(dP, cellprob, **params)
    labels = flows_to_masks(dP, cellprob, method, **params)
    return torch.from_numpy(labels).to(_torch_device(params.get("device")))


def cellpose_compute_masks(
    dP: np.ndarray,
    cellprob: np.ndarray,
    *,
    cellprob_threshold: float = 0.0,
    flow_threshold: float = 0.4,
    niter: int = 200,
    min_size: int = 15,
    max_size_fraction: float = 0.4,
    fill_holes: bool = True,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Cellpose 4's own post-processing behind :func:`compute_masks`'s interface (the baseline).

    Cellpose fills holes only together with its size filter; here ``fill_holes`` and
    ``min_size`` act independently, as in :func:`compute_masks`.
    """
    _check_inputs(dP, cellprob, niter)
    masks = dynamics.compute_masks(
        _tensor(dP, "cpu").numpy().astype(np.float32, copy=False),
        _tensor(cellprob, "cpu").numpy().astype(np.float32, copy=False),
        niter=niter,
        cellprob_threshold=cellprob_threshold,
        flow_threshold=flow_threshold,
        min_size=-1,
        max_size_fraction=max_size_fraction,
        device=_torch_device(device),
    )
    if fill_holes:
        masks = utils.fill_holes_and_remove_small_masks(masks, min_size=min_size)
    elif min_size > 0:
        sizes = np.bincount(masks.ravel())
        masks = np.where(sizes[masks] >= min_size, masks, 0)
    return renumber(masks.astype(np.int32))


def _check_inputs(dP: np.ndarray, cellprob: np.ndarray, niter: int) -> None:
    """Reject shapes Cellpose would misread (a bug in the caller, hence ValueError)."""
    if np.ndim(cellprob) != 2 or np.shape(dP) != (2, *np.shape(cellprob)):
        raise ValueError(
            f"dP must be (2, H, W) and cellprob (H, W); got {np.shape(dP)} and {np.shape(cellprob)}"
        )
    if niter < 1:
        raise ValueError(f"niter must be >= 1, got {niter}")


def _tensor(values: np.ndarray | torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """``values`` (an array, or a tensor on any device: the network output stays where it
    was computed) as a tensor on ``device``."""

    if isinstance(values, torch.Tensor):
        return values.to(device)
    return torch.as_tensor(np.ascontiguousarray(values), device=device)


def _neighbour_pointers(flows: torch.Tensor, foreground: torch.Tensor, niter: int) -> torch.Tensor:
    """Per pixel of the padded grid (flat), the pixel its flow steps to: the 8-neighbour nearest
    the flow's direction. A pixel stays where it is on the one-pixel frame and when its flow
    would carry it less than half a pixel in ``niter`` Cellpose steps (zero flows).

    Background pixels follow the network's flows too (Cellpose zeroes them, so its pixels stop
    at any background pixel): where noise dips the cell probability below the threshold inside
    a cell, trajectories cross the dip to the cell's centre instead of piling up at its edge as
    spurious small masks; off the cells the network's flows are about zero, so pixels stop at
    a cell's edge as in Cellpose. Only foreground pixels are counted and labelled."""
    padded_width = foreground.shape[1]
    steps = []
    for along, across in ((flows[0], flows[1]), (flows[1], flows[0])):
        # A component counts when it is at least tan(22.5°) of the other one: the flow's angle
        # rounded to the nearest of the 8 directions.
        bar = torch.clamp(across.abs().mul_(_TAN_22_5), min=_FLOW_SCALE / (2 * niter))
        steps.append((along > bar).to(torch.int32) - (along < -bar).to(torch.int32))
    offset = steps[0].mul_(padded_width).add_(steps[1])
    del steps
    # int32 pointers halve the gathers' memory traffic; images over 2^31 pixels need int64.
    index_type = torch.int32 if foreground.numel() < 2**31 else torch.int64
    grid = torch.arange(foreground.numel(), dtype=index_type, device=foreground.device)
    pointers = grid.reshape(foreground.shape).clone()
    pointers[1:-1, 1:-1] += offset
    pointers = pointers.reshape(-1)
    # Two pixels pointing at each other (where a cell's flows meet) become one fixed point, so
    # that converged trajectories stop and pointer jumping can end early.
    mutual = (pointers[pointers] == grid) & (grid < pointers)
    return torch.where(mutual, grid, pointers)


def _follow(pointers: torch.Tensor, niter: int) -> torch.Tensor:
    """Where each pixel is after ``niter`` pointer steps: the niter-th power of the pointer map
    by repeated squaring, so all trajectories share their work (pointer jumping). Once a power
    2^k <= niter maps every pixel to a fixed point, every trajectory has stopped: done."""
    position = None
    power = pointers
    remaining = niter
    while remaining:
        if remaining & 1:
            position = power if position is None else power.index_select(0, position)
        remaining >>= 1
        if remaining:
            squared = power.index_select(0, power)
            if torch.equal(squared, power):
                return power
            power = squared
    return position


def _cluster_ends(ends: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor:
    """Label per pixel of the padded grid (flat; 0: none): the sink its trajectory ends in.
    Sinks are groups of end points up to 2 px apart, each reached by more than 2 pixels and
    all together by more than 10 (Cellpose: a seed is a 5×5 maximum reached by more than 10,
    grown over points reached by more than 2; a discrete trajectory ends on a cycle of 1-4
    points, hence the total). Labels are 1..n in order of the sinks' first pixel. Only the
    foreground's end points count, and only foreground pixels get a label."""
    device = ends.device
    hits = torch.bincount(ends[foreground.reshape(-1)], minlength=ends.numel())
    sink = torch.nonzero(hits > _SINK_MIN_HITS).reshape(-1)
    label_of_end = torch.zeros(ends.numel(), dtype=torch.int32, device=device)
    if sink.numel() == 0:
        return label_of_end
    component = _connected_components(sink, foreground.shape[1])
    reached = torch.zeros(sink.numel(), dtype=hits.dtype, device=device)
    strong = reached.scatter_add(0, component, hits[sink]) > _SEED_MIN_HITS
    kept_root = strong & (component == torch.arange(sink.numel(), device=device))
    number = torch.cumsum(kept_root.to(torch.int32), 0, dtype=torch.int32)
    label_of_end[sink] = torch.where(strong[component], number[component], 0).to(torch.int32)
    return label_of_end.index_select(0, ends) * foreground.reshape(-1)


def _connected_components(flat_pixels: torch.Tensor, padded_width: int) -> torch.Tensor:
    """Connected components of a small set of inner pixels of the padded grid (flat indices,
    ascending), pixels up to ``_SINK_REACH`` apart being connected (the 1-pixel background
    frame keeps offsets from wrapping onto a neighbouring row's pixels): for each pixel the
    position of its component's first pixel. Min-label propagation with pointer jumping, so it
    runs on any device without SciPy."""
    device = flat_pixels.device
    order = torch.arange(flat_pixels.numel(), device=device)
    offsets = torch.tensor(
        [
            dy * padded_width + dx
            for dy in range(-_SINK_REACH, _SINK_REACH + 1)
            for dx in range(-_SINK_REACH, _SINK_REACH + 1)
            if dy or dx
        ],
        dtype=torch.int64,
        device=device,
    )
    neighbour_pixels = flat_pixels[:, None] + offsets[None, :]
    # Position of each neighbour in the sorted pixel list, or the pixel itself when absent.
    position = torch.searchsorted(flat_pixels, neighbour_pixels).clamp_max(order.numel() - 1)
    present = flat_pixels[position] == neighbour_pixels
    neighbours = torch.where(present, position, order[:, None])
    root = order
    while True:
        hooked = torch.minimum(root, root[neighbours].min(dim=1).values)
        hooked = hooked.scatter_reduce(0, root, hooked, reduce="amin")
        while True:
            jumped = hooked[hooked]
            if torch.equal(jumped, hooked):
                break
            hooked = jumped
        if torch.equal(hooked, root):
            return root
        root = hooked


def _drop_labels(labels: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """``labels`` (labels 1..n) with the labels flagged in ``drop`` (indexed by label) set to 0
    and the rest renumbered 1..n in order, as int32."""
    if not bool(drop[1:].any()):
        return labels.to(torch.int32)
    return keep_where(labels, ~drop)


def centre_flows(labels: np.ndarray, device: str | torch.device | None = None) -> np.ndarray:
    """Unit flows (2, H, W; dy, dx; float32) pointing from each mask pixel at its mask's centre,
    zero on background and at the centre: the flows the QC compares the network's against, and
    analytic input flows for large benchmarks (Cellpose's network predicts 5 × such flows)."""
    with torch.inference_mode():
        tensor = torch.as_tensor(np.ascontiguousarray(labels), device=_torch_device(device))
        tensor = tensor.to(torch.int64)
        flow_y, flow_x = _centre_unit_vectors(tensor, torch.bincount(tensor.reshape(-1)))
        return torch.stack([flow_y, flow_x]).cpu().numpy()


def _centre_unit_vectors(
    labels: torch.Tensor, sizes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit vectors (H, W each, float32) from every labelled pixel to its mask's centre, where
    Cellpose starts its diffusion: the rounded centroid, or the mask pixel nearest to it (first
    in raster order on ties) when the centroid lies outside the mask."""
    height, width = labels.shape
    device = labels.device
    n_labels = sizes.numel()
    flat = labels.reshape(-1)
    rows = torch.arange(height, dtype=torch.float64, device=device)
    cols = torch.arange(width, dtype=torch.float64, device=device)
    row = rows[:, None].expand(height, width).reshape(-1)
    col = cols[None, :].expand(height, width).reshape(-1)
    count = sizes.clamp_min(1).to(torch.float64)
    centre_y = torch.round(torch.bincount(flat, row, minlength=n_labels) / count)
    centre_x = torch.round(torch.bincount(flat, col, minlength=n_labels) / count)
    centre_flat = (centre_y * width + centre_x).to(torch.int64)
    outside = flat[centre_flat] != torch.arange(n_labels, device=device)
    outside[0] = False
    if bool(outside.any()):
        distance = (row - centre_y[flat]).square_() + (col - centre_x[flat]).square_()
        nearest = torch.full((n_labels,), math.inf, dtype=torch.float64, device=device)
        nearest = nearest.scatter_reduce(0, flat, distance, reduce="amin")
        is_nearest = distance == nearest[flat]
        pixel = torch.arange(flat.numel(), device=device)[is_nearest]
        first = torch.full((n_labels,), flat.numel(), dtype=torch.int64, device=device)
        first = first.scatter_reduce(0, flat[is_nearest].to(torch.int64), pixel, reduce="amin")
        centre_y = torch.where(outside, (first // width).to(torch.float64), centre_y)
        centre_x = torch.where(outside, (first % width).to(torch.float64), centre_x)
    del row, col
    # Background takes label 0's "centre" (0, 0); its vectors are zeroed at the end.
    to_y = centre_y.to(torch.float32).index_select(0, flat).reshape(height, width)
    to_y -= rows.to(torch.float32)[:, None]
    to_x = centre_x.to(torch.float32).index_select(0, flat).reshape(height, width)
    to_x -= cols.to(torch.float32)[None, :]
    scale = torch.hypot(to_y, to_x).clamp_min_(1e-30).reciprocal_()
    scale *= labels > 0
    return to_y.mul_(scale), to_x.mul_(scale)


def _flow_errors(labels: torch.Tensor, flows: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Per label (index 0 unused): mean squared difference between the network's flows / 5 and
    the mask's :func:`centre_flows`, Cellpose's flow error with straight-line flows in place of
    its heat-diffusion flows."""
    unit_y, unit_x = _centre_unit_vectors(labels, sizes)
    error = (unit_y - flows[0] / _FLOW_SCALE).square_()
    error += (unit_x - flows[1] / _FLOW_SCALE).square_()
    total = torch.bincount(labels.reshape(-1), error.reshape(-1).to(torch.float64), sizes.numel())
    return total / sizes.clamp_min(1).to(torch.float64)
