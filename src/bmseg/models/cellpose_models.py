"""HSPCs: Cellpose-SAM flows → masks, an area filter, then optional SAM2 box refinement.

Input is the (H, W, 3) uint8 RGB image SEGMENT hands the segmenter (the tile's core plus an
HSPC margin); Cellpose-SAM takes up to three channels in any order, so the RGB planes go in
as they are, each normalised to its 1st–99th percentile (Cellpose's own normalisation).

Refinement is off by default: SAM2's decoder draws masks on a grid 4× coarser than its
input, so on a tile seen whole an 8 µm HSPC is a ~3 px blob. When on, it runs on windows at
``refine_max_downsample`` (native resolution by default) and a refined mask replaces
Cellpose's only where the cell spans enough decoder pixels to be drawn no coarser
(:func:`choose_refined`).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from bmseg.flows import flows_to_labels
from bmseg.label_images import relabel
from bmseg.models.base import Detections
from bmseg.models.cellpose_net import Stitcher, network_output, normalise
from bmseg.models.masks import (
    Painter,
    crop_labels,
    grow_boxes,
    label_boxes,
    score_priority,
    upsample_in_boxes,
    window_chunks,
)
from bmseg.models.sam2_models import (
    Sam2Engine,
    Window,
    WindowFeatures,
    tile_windows,
    window_overlap_px,
    window_side,
)
from bmseg.models.settings import HSPCSettings, area_px
from bmseg.models.transfer import upload

log = logging.getLogger(__name__)

CELLPOSE_BLOCK = 256
"""Cellpose-SAM's fixed network input size (bsize)."""
CELLPOSE_DIAMETER_PX = 30.0
"""The cell diameter Cellpose rescales images to when a diameter is given."""
REFINE_WINDOW_GROWTH = 0.25
"""Refined masks are computed in the Cellpose box grown by this fraction on each side."""
UNFILLED_MIN_AREA_SHARE = 0.5
"""The segmenter's area filter sees Cellpose's cells before SEGMENT's workers fill their
holes (:attr:`Detections.fill_holes`), which can only grow a cell: it keeps cells down to this
share of the minimum area and leaves the exact bounds to SEGMENT's area filter on the filled
cells. A cell is lost only if its holes exceed half the minimum area."""


_REGISTRY_LOCK = threading.Lock()


@contextlib.contextmanager
def sam_encoder_as(width: int, depth: int, heads: int, global_blocks: list[int]) -> Iterator[None]:
    """Make Cellpose's ``CPSAM`` build its SAM ViT encoder with these dimensions.

    ``CPSAM()`` always asks segment_anything's ``sam_model_registry["vit_l"]`` for its
    encoder; within this block that entry builds the same ``ImageEncoderViT`` (SAM's own
    ``_build_sam``) with the given width, depth, heads and global-attention blocks.
    """
    build_sam = importlib.import_module("segment_anything.build_sam")

    def build(checkpoint: object = None) -> torch.nn.Module:
        return build_sam._build_sam(width, depth, heads, global_blocks, checkpoint)

    with _REGISTRY_LOCK:
        stock = build_sam.sam_model_registry["vit_l"]
        build_sam.sam_model_registry["vit_l"] = build
        try:
            yield
        finally:
            build_sam.sam_model_registry["vit_l"] = stock


def choose_refined(
    refined: torch.Tensor, original: torch.Tensor, iou_thresh: float, fine: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per mask, SAM2's ``refined`` window where it may replace Cellpose's ``original``.

    The rule: IoU(refined, original) ≥ ``iou_thresh`` (both outline the same cell) and ``fine``
    (the cell spans enough decoder pixels that the refined outline is no coarser than
    Cellpose's native-resolution one, see :func:`fine_enough`). Returns the chosen (K, Hm, Wm)
    windows and the (K,) bool vector of masks replaced.
    """
    inter = (refined & original).sum(dim=(1, 2)).float()
    union = (refined | original).sum(dim=(1, 2)).float()
    agree = (inter >= iou_thresh * union.clamp(min=1)) & fine
    return torch.where(agree[:, None, None], refined, original), agree


def fine_enough(area_px: torch.Tensor, px_per_logit: float, min_across: float) -> torch.Tensor:
    """Whether a cell of ``area_px`` spans ≥ ``min_across`` decoder pixels of ``px_per_logit``."""
    diameter_px = 2 * torch.sqrt(area_px.float() / torch.pi)
    return diameter_px >= min_across * px_per_logit


def home_windows(boxes: torch.Tensor, windows: Sequence[Window]) -> torch.Tensor:
    """For each half-open box, the window whose part inside the tile holds it farthest from
    its edges (the window in which SAM2 sees the cell with the most context)."""
    crops = boxes.new_tensor([w.crop_box for w in windows])  # (W, 4)
    clearance = torch.minimum(
        boxes[:, None, :2] - crops[None, :, :2], crops[None, :, 2:] - boxes[:, None, 2:]
    ).amin(dim=-1)
    return clearance.argmax(dim=1)


class CellposeHSPCSegmenter:
    """HSPCs by Cellpose-SAM, optionally refined by SAM2 prompted with their boxes."""

    cell_type = "HSPC"

    def __init__(
        self, cellpose_model, engine: Sam2Engine, settings: HSPCSettings, device: torch.device
    ) -> None:
        self.cellpose = cellpose_model
        self.engine = engine
        self.settings = settings
        self.device = device
        self.stitcher: Stitcher | None = None

    def windows(self, tile_hw: tuple[int, int], pixel_size_um: float) -> list[Window]:
        """The SAM2 windows refinement encodes for a tile of this size."""
        s = self.settings
        side = window_side(tile_hw, self.engine.image_size, s.refine_max_downsample)
        return tile_windows(tile_hw, side, window_overlap_px(s.max_area_um2, pixel_size_um))

    def segment(self, tiles: Sequence[np.ndarray], pixel_size_um: float) -> list[Detections]:
        """One :class:`Detections` per tile; scores are Cellpose's mean cell probability."""
        if not tiles:
            return []
        features: list = [None] * len(tiles)
        if self.settings.refine:
            windows = [self.windows(tile.shape[:2], pixel_size_um) for tile in tiles]
            features = self.engine.encode(tiles, windows)
        results = []
        timer = self.engine.timer
        for tile, tile_features in zip(tiles, features, strict=True):
            with timer("cellpose_net"):
                d_p, cellprob = self.flows(tile, pixel_size_um)
            with timer("hspc_flows_to_masks"):
                labels = self.masks(d_p, cellprob, pixel_size_um)
            with timer("hspc_refine"):
                results.append(self.refine(labels, cellprob, tile_features, pixel_size_um))
        return results

    def rescale(self, pixel_size_um: float) -> float | None:
        """Cellpose's resize factor to 30 px cells for ``diameter_um``; None without it."""
        if not self.settings.diameter_um:
            return None
        return CELLPOSE_DIAMETER_PX * pixel_size_um / self.settings.diameter_um

    def flows(self, tile: np.ndarray, pixel_size_um: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Cellpose-SAM's flows (2, H, W) and cell probability logits (H, W) for one (H, W, 3)
        uint8 tile, as float32 tensors on the device (:mod:`bmseg.models.cellpose_net`: the
        output of ``CellposeModel.eval(compute_masks=False)``, without its numpy path).

        The network runs in the dtype it was loaded in (bf16 on capable GPUs), no autocast."""
        net = self.cellpose.net
        net.eval()
        with torch.no_grad():
            image = normalise(upload(tile, self.device))
            out = network_output(
                net,
                image,
                block=CELLPOSE_BLOCK,
                overlap=self.settings.tile_overlap,
                batch_size=self.settings.cellpose_batch_size,
                rescale=self.rescale(pixel_size_um),
                stitcher=self._stitcher(),
            )
        return out[:2], out[2]

    def _stitcher(self) -> Stitcher:
        if self.stitcher is None:
            self.stitcher = Stitcher(CELLPOSE_BLOCK, self.device)
        return self.stitcher

    def niter(self, pixel_size_um: float) -> int:
        """Flow iterations: the setting, or Cellpose's ``int(200 / rescale)`` (200 unscaled)."""
        if self.settings.niter:
            return self.settings.niter
        rescale = self.rescale(pixel_size_um)
        return 200 if rescale is None else int(200 / rescale)

    def masks(
        self,
        d_p: torch.Tensor | np.ndarray,
        cellprob: torch.Tensor | np.ndarray,
        pixel_size_um: float,
    ) -> torch.Tensor:
        """Label image (int32 tensor on the device, holes not yet filled) from flows (tensors
        on the device, or arrays), through :func:`bmseg.flows.flows_to_labels`."""

        s = self.settings
        return flows_to_labels(
            d_p,
            cellprob,
            method=s.flows_method,
            cellprob_threshold=s.cellprob_threshold,
            flow_threshold=s.flow_threshold,
            niter=self.niter(pixel_size_um),
            device=self.device,
        )

    def refine(
        self,
        labels: torch.Tensor | np.ndarray,
        cellprob: torch.Tensor | np.ndarray,
        features: list[WindowFeatures] | None,
        pixel_size_um: float,
    ) -> Detections:
        """Area-filter Cellpose's cells (holes unfilled, so down to
        :data:`UNFILLED_MIN_AREA_SHARE` of the minimum), refine them with SAM2 if given
        ``features`` (the tile's windows), and paint one label image. Scores are the mean
        cell probability over a cell's own pixels."""
        s = self.settings
        tile_hw = (int(labels.shape[0]), int(labels.shape[1]))
        min_px = UNFILLED_MIN_AREA_SHARE * area_px(s.min_area_um2, pixel_size_um)
        max_px = area_px(s.max_area_um2, pixel_size_um)
        labels_t = torch.as_tensor(labels, device=self.device).to(torch.int64)
        count = int(labels_t.max())
        flat = labels_t.flatten()
        area = torch.bincount(flat, minlength=count + 1)[1:]
        prob = torch.sigmoid(torch.as_tensor(cellprob, device=self.device).flatten().float())
        scores = torch.bincount(flat, weights=prob, minlength=count + 1)[1:] / area.clamp(min=1)
        keep = torch.nonzero((area > 0) & (area >= min_px) & (area <= max_px)).flatten()
        log.debug("HSPC: %d Cellpose cells, %d within the area range", count, len(keep))
        ids, scores, area = keep + 1, scores[keep], area[keep]
        if features is None:
            # Cellpose's cells never overlap: painting them by score is renumbering them in
            # the painter's order (score descending, ties to the lower label), one lookup.
            order = torch.argsort(scores, stable=True, descending=True)
            return Detections(
                relabel(labels_t, ids[order], count + 1).cpu().numpy(),
                scores[order].clamp(0, 1).float().cpu().numpy(),
                fill_holes=True,
            )
        boxes = label_boxes(labels_t, count)[keep]
        priority = score_priority(scores)
        painter = Painter(tile_hw, self.device)
        home = home_windows(boxes, [f.window for f in features])
        refined_count = 0
        for w, window_features in enumerate(features):
            window = window_features.window
            members = torch.nonzero(home == w).flatten()
            limit = boxes.new_tensor(window.crop_box)
            for start in range(0, len(members), s.refine_box_batch):
                batch = members[start : start + s.refine_box_batch]
                prompts = self.engine.prompts(window, boxes=boxes[batch])
                logits, _ = self.engine.decode(window_features, prompts, multimask=False)
                grown = grow_boxes(boxes[batch], REFINE_WINDOW_GROWTH, tile_hw)
                grown = torch.minimum(
                    torch.maximum(grown, limit[:2].repeat(2)), limit[2:].repeat(2)
                )
                local = grown - limit[:2].repeat(2)
                px_per_logit = window.side / logits.shape[-1]
                fine = fine_enough(area[batch], px_per_logit, s.refine_min_logits_across)
                side = (window.side, window.side)
                for chunk in window_chunks(grown):
                    original = crop_labels(labels_t, grown[chunk], ids[batch][chunk])
                    refined = upsample_in_boxes(logits[chunk, 0], local[chunk], side, 0.0)
                    chosen, agree = choose_refined(
                        refined, original, s.refine_iou_thresh, fine[chunk]
                    )
                    refined_count += int(agree.sum())
                    painter.add(grown[chunk], chosen, priority[batch][chunk])
        log.debug("HSPC: %d of %d masks refined by SAM2", refined_count, len(ids))
        return painter.detections(scores, priority, min_px, fill_holes=True)
