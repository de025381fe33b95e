"""HSPCs: Cellpose-SAM flows → masks, an area filter, then SAM2 box-prompted refinement.

Input is the (H, W, 3) uint8 RGB tile SEGMENT hands every segmenter; Cellpose-SAM takes up
to three channels in any order, so the RGB planes go in as they are, each normalised to its
1st–99th percentile (Cellpose's own normalisation).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from cellpose import core, transforms

from bmseg.models.base import Detections
from bmseg.models.device import inference
from bmseg.models.masks import (
    Painter,
    crop_labels,
    grow_boxes,
    label_boxes,
    score_priority,
    upsample_in_boxes,
    window_chunks,
)
from bmseg.models.sam2_models import Sam2Engine, TileFeatures
from bmseg.models.settings import HSPCSettings, area_px

log = logging.getLogger(__name__)

CELLPOSE_BLOCK = 256
"""Cellpose-SAM's fixed network input size (bsize)."""
CELLPOSE_DIAMETER_PX = 30.0
"""The cell diameter Cellpose rescales images to when a diameter is given."""
REFINE_WINDOW_GROWTH = 0.25
"""Refined masks are computed in the Cellpose box grown by this fraction on each side."""


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
    refined: torch.Tensor, original: torch.Tensor, iou_thresh: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per mask, SAM2's ``refined`` window where its IoU with ``original`` ≥ ``iou_thresh``.

    Returns the chosen (K, Hm, Wm) windows and the (K,) bool agreement vector.
    """
    inter = (refined & original).sum(dim=(1, 2)).float()
    union = (refined | original).sum(dim=(1, 2)).float()
    agree = inter >= iou_thresh * union.clamp(min=1)
    return torch.where(agree[:, None, None], refined, original), agree


class CellposeHSPCSegmenter:
    """HSPCs by Cellpose-SAM, each refined by SAM2 prompted with its box."""

    cell_type = "HSPC"

    def __init__(
        self, cellpose_model, engine: Sam2Engine, settings: HSPCSettings, device: torch.device
    ) -> None:
        self.cellpose = cellpose_model
        self.engine = engine
        self.settings = settings
        self.device = device

    def segment(self, tiles: Sequence[np.ndarray], pixel_size_um: float) -> list[Detections]:
        """One :class:`Detections` per tile; scores are Cellpose's mean cell probability."""
        if not tiles:
            return []
        features = self.engine.encode(tiles) if self.settings.refine else [None] * len(tiles)
        results = []
        timer = self.engine.timer
        for tile, tile_features in zip(tiles, features, strict=True):
            with timer("cellpose_net"):
                d_p, cellprob = self.flows(tile, pixel_size_um)
            with timer("hspc_flows_to_masks"):
                labels = self.masks(d_p, cellprob)
            with timer("hspc_refine"):
                results.append(self.refine(labels, cellprob, tile_features, pixel_size_um))
        return results

    def flows(self, tile: np.ndarray, pixel_size_um: float) -> tuple[np.ndarray, np.ndarray]:
        """Cellpose-SAM's flows (2, H, W) and cell probability logits (H, W) for one tile."""
        image = transforms.normalize_img(tile[np.newaxis].astype(np.float32), normalize=True)
        rescale = None
        if self.settings.diameter_um:
            rescale = CELLPOSE_DIAMETER_PX * pixel_size_um / self.settings.diameter_um
        with inference(self.device):
            net_out, _ = core.run_net(
                self.cellpose.net,
                image,
                batch_size=self.settings.cellpose_batch_size,
                tile_overlap=self.settings.tile_overlap,
                bsize=CELLPOSE_BLOCK,
                rsz=rescale,
            )
        net_out = net_out[0]
        if rescale is not None:
            net_out = transforms.resize_image(net_out, tile.shape[0], tile.shape[1])
        return net_out[..., :2].transpose(2, 0, 1), net_out[..., 2]

    def masks(self, d_p: np.ndarray, cellprob: np.ndarray) -> np.ndarray:
        """Label image from flows, through :func:`bmseg.flows.flows_to_masks`."""
        from bmseg.flows import flows_to_masks

        s = self.settings
        return flows_to_masks(
            d_p,
            cellprob,
            method=s.flows_method,
            cellprob_threshold=s.cellprob_threshold,
            flow_threshold=s.flow_threshold,
            niter=s.niter,
            device=self.device,
        )

    def refine(
        self,
        labels: np.ndarray,
        cellprob: np.ndarray,
        features: TileFeatures | None,
        pixel_size_um: float,
    ) -> Detections:
        """Area-filter Cellpose's cells, refine them with SAM2, and paint one label image."""
        s = self.settings
        tile_hw = (int(labels.shape[0]), int(labels.shape[1]))
        min_px = area_px(s.min_area_um2, pixel_size_um)
        max_px = area_px(s.max_area_um2, pixel_size_um)
        labels_t = torch.from_numpy(labels.astype(np.int64)).to(self.device)
        count = int(labels_t.max())
        flat = labels_t.flatten()
        area = torch.bincount(flat, minlength=count + 1)[1:]
        prob = torch.sigmoid(torch.from_numpy(cellprob).to(self.device).flatten().float())
        scores = torch.bincount(flat, weights=prob, minlength=count + 1)[1:] / area.clamp(min=1)
        keep = torch.nonzero((area > 0) & (area >= min_px) & (area <= max_px)).flatten()
        log.debug("HSPC: %d Cellpose cells, %d within the area range", count, len(keep))
        ids, scores = keep + 1, scores[keep]
        boxes = label_boxes(labels_t, count)[keep]
        priority = score_priority(scores)
        painter = Painter(tile_hw, self.device)
        refined_count = 0
        for start in range(0, len(ids), s.refine_box_batch):
            batch = slice(start, start + s.refine_box_batch)
            if features is None:
                windows_at, logits = boxes[batch], None
            else:
                windows_at = grow_boxes(boxes[batch], REFINE_WINDOW_GROWTH, tile_hw)
                logits, _ = self.engine.decode(features, boxes=boxes[batch], multimask=False)
            for chunk in window_chunks(windows_at):
                chosen = crop_labels(labels_t, windows_at[chunk], ids[batch][chunk])
                if logits is not None:
                    refined = upsample_in_boxes(logits[chunk, 0], windows_at[chunk], tile_hw, 0.0)
                    chosen, agree = choose_refined(refined, chosen, s.refine_iou_thresh)
                    refined_count += int(agree.sum())
                painter.add(windows_at[chunk], chosen, priority[batch][chunk])
        log.debug("HSPC: %d of %d masks refined by SAM2", refined_count, len(ids))
        return painter.detections(scores, priority, min_px)
