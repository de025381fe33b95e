"""SAM2: image encoding shared by both cell types, and MK automatic mask generation.

The MK segmenter follows SAM2's automatic mask generator (a grid of point prompts, multimask
output, predicted-IoU and stability filters, box NMS) but filters every candidate at the
decoder's 256 × 256 resolution and upsamples only the survivors, inside their boxes.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sam2.utils.amg import build_point_grid
from torchvision.ops import batched_nms

from bmseg.models.base import Detections
from bmseg.models.device import StageTimer, inference
from bmseg.models.masks import (
    LowResFilter,
    Painter,
    filter_lowres,
    lowres_boxes,
    score_priority,
    upsample_in_boxes,
    window_chunks,
)
from bmseg.models.settings import MKSettings, area_px

log = logging.getLogger(__name__)

SAM2_MEAN = (0.485, 0.456, 0.406)
SAM2_STD = (0.229, 0.224, 0.225)


@dataclass
class TileFeatures:
    """SAM2 image features of one tile, ready for the mask decoder."""

    image_embed: torch.Tensor  # (1, C, 64, 64)
    high_res: list[torch.Tensor]  # [(1, 32, 256, 256), (1, 64, 128, 128)]
    tile_hw: tuple[int, int]


class Sam2Engine:
    """One SAM2 model: encodes tiles once and decodes point or box prompts in batches.

    The MK and HSPC segmenters share one engine; the features of the last batch of tiles are
    kept, so segmenting the same tiles for both cell types encodes them once.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, timer: StageTimer) -> None:
        self.model = model
        self.device = device
        self.timer = timer
        self._cached: tuple[list[np.ndarray], list[TileFeatures]] | None = None

    @property
    def image_size(self) -> int:
        return int(self.model.image_size)

    def encode(self, tiles: Sequence[np.ndarray]) -> list[TileFeatures]:
        """Features of each (H, W, 3) uint8 tile; resizing happens on the device."""
        cached = self._cached
        if cached and len(cached[0]) == len(tiles) and all(map(operator.is_, cached[0], tiles)):
            return cached[1]
        with self.timer("sam2_encode"):
            features = self._encode(tiles)
        self._cached = (list(tiles), features)
        return features

    def _encode(self, tiles: Sequence[np.ndarray]) -> list[TileFeatures]:
        size = self.image_size
        mean = torch.tensor(SAM2_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(SAM2_STD, device=self.device).view(1, 3, 1, 1)
        batch = torch.cat(
            [
                F.interpolate(
                    torch.from_numpy(np.ascontiguousarray(tile))
                    .to(self.device, non_blocking=True)
                    .permute(2, 0, 1)[None]
                    .float()
                    / 255.0,
                    size=(size, size),
                    mode="bilinear",
                    align_corners=False,
                    antialias=True,
                )
                for tile in tiles
            ]
        )
        batch = (batch - mean) / std
        with inference(self.device):
            backbone_out = self.model.forward_image(batch)
            _, vision_feats, _, feat_sizes = self.model._prepare_backbone_features(backbone_out)
            if self.model.directly_add_no_mem_embed:
                vision_feats[-1] = vision_feats[-1] + self.model.no_mem_embed
        feats = [
            feat.permute(1, 2, 0).reshape(len(tiles), -1, *hw)
            for feat, hw in zip(vision_feats, feat_sizes, strict=True)
        ]
        return [
            TileFeatures(
                image_embed=feats[-1][i : i + 1],
                high_res=[level[i : i + 1] for level in feats[:-1]],
                tile_hw=(int(tile.shape[0]), int(tile.shape[1])),
            )
            for i, tile in enumerate(tiles)
        ]

    def decode(
        self,
        features: TileFeatures,
        points: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        multimask: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res logits (N, M, h, w) float32 and predicted IoUs (N, M) for N prompts.

        ``points`` (N, 2) or ``boxes`` (N, 4, xyxy) are in tile pixels; one positive point or
        one box per prompt.
        """
        height, width = features.tile_hw
        scale = torch.tensor(
            [self.image_size / width, self.image_size / height], device=self.device
        )
        if boxes is not None:
            coords = boxes.float().reshape(-1, 2, 2) * scale
            labels = torch.tensor([[2, 3]], dtype=torch.int, device=self.device)
        else:
            coords = points.float()[:, None, :] * scale
            labels = torch.ones((1, 1), dtype=torch.int, device=self.device)
        labels = labels.repeat(len(coords), 1)
        with inference(self.device):
            sparse, dense = self.model.sam_prompt_encoder(
                points=(coords, labels), boxes=None, masks=None
            )
            low_res, iou_preds, _, _ = self.model.sam_mask_decoder(
                image_embeddings=features.image_embed,
                image_pe=self.model.sam_prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask,
                repeat_image=True,
                high_res_features=features.high_res,
            )
        return low_res.float().clamp(-32.0, 32.0), iou_preds.float()


class Sam2MKSegmenter:
    """Megakaryocytes by SAM2 automatic mask generation, filtered at low resolution."""

    cell_type = "MK"

    def __init__(self, engine: Sam2Engine, settings: MKSettings) -> None:
        self.engine = engine
        self.settings = settings

    def segment(self, tiles: Sequence[np.ndarray], pixel_size_um: float) -> list[Detections]:
        """One :class:`Detections` per tile; overlapping masks: the higher predicted IoU wins."""
        if not tiles:
            return []
        features = self.engine.encode(tiles)
        with self.engine.timer("mk_masks"):
            return [self._segment_tile(tile_features, pixel_size_um) for tile_features in features]

    def _rules(self, pixel_size_um: float) -> LowResFilter:
        s = self.settings
        return LowResFilter(
            mask_threshold=s.mask_threshold,
            pred_iou_thresh=s.pred_iou_thresh,
            stability_score_thresh=s.stability_score_thresh,
            stability_score_offset=s.stability_score_offset,
            min_area_px=area_px(s.min_area_um2, pixel_size_um),
            max_area_px=area_px(s.max_area_um2, pixel_size_um),
        )

    def _segment_tile(self, features: TileFeatures, pixel_size_um: float) -> Detections:
        s = self.settings
        rules = self._rules(pixel_size_um)
        height, width = features.tile_hw
        grid = torch.from_numpy(build_point_grid(s.points_per_side)).to(self.engine.device)
        points = grid * grid.new_tensor([width, height])
        kept_logits, kept_iou = [], []
        for start in range(0, len(points), s.points_per_batch):
            batch = points[start : start + s.points_per_batch]
            logits, iou = self.engine.decode(features, points=batch)
            logits, iou = logits.flatten(0, 1), iou.flatten(0, 1)
            low_px = (height / logits.shape[-2]) * (width / logits.shape[-1])
            keep = filter_lowres(logits, iou, low_px, rules)
            kept_logits.append(logits[keep])
            kept_iou.append(iou[keep])
        logits, iou = torch.cat(kept_logits), torch.cat(kept_iou)
        if len(logits) == 0:
            log.debug("MK: no candidate of %d points passed the low-res filters", len(points))
            return Detections(np.zeros((height, width), np.int32), np.zeros(0, np.float32))
        boxes = lowres_boxes(logits, s.mask_threshold, features.tile_hw)
        keep = batched_nms(boxes.float(), iou, torch.zeros_like(iou), s.box_nms_thresh)
        logits, iou, boxes = logits[keep], iou[keep], boxes[keep]
        return paint_lowres(logits, iou, boxes, features.tile_hw, rules)


def paint_lowres(
    logits: torch.Tensor,
    scores: torch.Tensor,
    boxes: torch.Tensor,
    tile_hw: tuple[int, int],
    rules: LowResFilter,
) -> Detections:
    """Upsample the survivors inside their boxes, check exact areas, and paint one label image.

    Where masks overlap, the one with the higher score keeps the pixels; a mask left below the
    minimum area by that is dropped.
    """
    priority = score_priority(scores)
    painter = Painter(tile_hw, logits.device)
    for chunk in window_chunks(boxes):
        windows = upsample_in_boxes(logits[chunk], boxes[chunk], tile_hw, rules.mask_threshold)
        area = windows.sum(dim=(1, 2))
        ok = (area >= rules.min_area_px) & (area <= rules.max_area_px)
        painter.add(boxes[chunk][ok], windows[ok], priority[chunk][ok])
    return painter.detections(scores, priority, rules.min_area_px)
