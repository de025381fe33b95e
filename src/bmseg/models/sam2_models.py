"""SAM2: windowed image encoding shared by both cell types, and MK automatic mask generation.

A tile (core + margin, e.g. 3616² px) is cut into overlapping square **windows** of at most
``max_downsample × image_size`` px (2048 px for SAM2's 1024 px input), each resized to the
model's input: SAM2 never sees a tile more than 2× downsampled. A window that reaches past the
tile's edge is padded with SAM2's mean colour, never stretched. All windows of a call are
encoded in batches.

The MK segmenter follows SAM2's automatic mask generator (a grid of point prompts per window,
multimask output, predicted-IoU and stability filters, box NMS, masks at a window's inner edge
dropped as SAM2 drops them at crop edges) but pre-filters candidates at the decoder's 256²
resolution and upsamples only the survivors, inside their boxes; masks nested in a larger one
are then suppressed, so one cell gives one MK.
"""

from __future__ import annotations

import itertools
import logging
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sam2.utils.amg import build_point_grid, is_box_near_crop_edge
from torchvision.ops import batched_nms

from bmseg.models.base import Detections
from bmseg.models.device import inference
from bmseg.models.masks import (
    LowResFilter,
    Painter,
    filter_lowres,
    lowres_boxes,
    nested_in_larger,
    score_priority,
    upsample_in_boxes,
    upsampled_stats,
    window_chunks,
    window_pixels,
)
from bmseg.models.sam2_prompts import PromptTokens
from bmseg.models.settings import MKSettings, area_px
from bmseg.models.transfer import upload
from bmseg.timing import StageTimer

log = logging.getLogger(__name__)

SAM2_MEAN = (0.485, 0.456, 0.406)
SAM2_STD = (0.229, 0.224, 0.225)
PAD_RGB = tuple(round(255 * m) for m in SAM2_MEAN)
"""Colour of a window's part beyond the tile: SAM2's mean, i.e. ~0 after its normalisation."""
POINT_LABELS = (1,)
"""SAM2's label of a positive point prompt."""
BOX_LABELS = (2, 3)
"""SAM2's labels of a box prompt's top-left and bottom-right corners (SAM2ImagePredictor's)."""
CACHED_WINDOWS = 16
"""Windows whose point prompts' embeddings the MK segmenter keeps (a run's tiles share a few)."""
EDGE_TOLERANCE_PX = 20.0
"""SAM2's ``is_box_near_crop_edge`` tolerance: masks this close to a window's inner edge go."""


@dataclass(frozen=True)
class Window:
    """A square SAM2 input cut from a tile: top-left ``x, y`` and ``side`` in tile px.

    ``height`` × ``width`` of it lie inside the tile; the rest is padded with :data:`PAD_RGB`.
    """

    x: int
    y: int
    side: int
    height: int
    width: int

    @property
    def crop_box(self) -> list[int]:
        """The part inside the tile as ``x0, y0, x1, y1`` (half-open), tile px."""
        return [self.x, self.y, self.x + self.width, self.y + self.height]


def window_side(tile_hw: tuple[int, int], image_size: int, max_downsample: float) -> int:
    """Side of a tile's windows: the tile's longer side, at most ``max_downsample × image_size``."""
    return int(min(max(tile_hw), math.floor(max_downsample * image_size)))


def axis_starts(length: int, side: int, overlap: int) -> list[int]:
    """Evenly spread window starts covering ``length`` px, neighbours overlapping ≥ ``overlap``."""
    if length <= side:
        return [0]
    count = math.ceil((length - overlap) / (side - overlap))
    return np.round(np.linspace(0, length - side, count)).astype(int).tolist()


def tile_windows(tile_hw: tuple[int, int], side: int, overlap: int) -> list[Window]:
    """Windows of ``side`` px over a tile, rows then columns; ``overlap`` at most side / 2."""
    height, width = tile_hw
    overlap = min(int(overlap), side // 2)
    return [
        Window(x, y, side, min(side, height - y), min(side, width - x))
        for y in axis_starts(height, side, overlap)
        for x in axis_starts(width, side, overlap)
    ]


def window_overlap_px(max_area_um2: float, pixel_size_um: float) -> int:
    """Overlap that puts every cell up to ``max_area_um2`` wholly inside one window.

    1.5 × the diameter of a disc of that area (irregular outlines are longer than the disc)
    plus SAM2's edge tolerance on both sides, so the cell is clear of that window's edges.
    """
    diameter_px = 2 * math.sqrt(max_area_um2 / math.pi) / pixel_size_um
    return math.ceil(1.5 * diameter_px + 2 * EDGE_TOLERANCE_PX)


@dataclass
class WindowFeatures:
    """SAM2 image features of one window, ready for the mask decoder."""

    image_embed: torch.Tensor  # (1, C, 64, 64)
    high_res: list[torch.Tensor]  # [(1, 32, 256, 256), (1, 64, 128, 128)]
    window: Window


class Sam2Engine:
    """One SAM2 model: encodes windows of tiles and decodes point or box prompts in batches.

    The features of the last call are kept, so segmenting the same tiles with the same windows
    for both cell types encodes them once.
    """

    def __init__(
        self, model: torch.nn.Module, device: torch.device, timer: StageTimer, encode_batch: int = 4
    ) -> None:
        self.model = model
        self.device = device
        self.timer = timer
        self.encode_batch = encode_batch
        self._cached: tuple[list[np.ndarray], list[list[Window]], list] | None = None
        self._prompt_tokens: PromptTokens | None = None
        self._normalise: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def image_size(self) -> int:
        return int(self.model.image_size)

    def encode(
        self, tiles: Sequence[np.ndarray], windows: Sequence[Sequence[Window]]
    ) -> list[list[WindowFeatures]]:
        """Features of each window of each (H, W, 3) uint8 tile; resizing on the device."""
        cached = self._cached
        windows = [list(w) for w in windows]
        if (
            cached
            and len(cached[0]) == len(tiles)
            and all(map(operator.is_, cached[0], tiles))
            and cached[1] == windows
        ):
            return cached[2]
        with self.timer("sam2_encode"):
            flat = [
                (tile, window) for tile, ws in zip(tiles, windows, strict=True) for window in ws
            ]
            encoded: list[WindowFeatures] = []
            for start in range(0, len(flat), self.encode_batch):
                encoded += self._encode(flat[start : start + self.encode_batch])
        features, start = [], 0
        for ws in windows:
            features.append(encoded[start : start + len(ws)])
            start += len(ws)
        self._cached = (list(tiles), windows, features)
        return features

    def window_input(self, tile: np.ndarray, window: Window) -> torch.Tensor:
        """(1, 3, S, S) float model input of one window: cut, padded, resized, normalised."""
        crop = tile[window.y : window.y + window.height, window.x : window.x + window.width]
        square = upload(crop, self.device)  # through a pinned buffer on CUDA
        if crop.shape[:2] != (window.side, window.side):
            padded = torch.tensor(PAD_RGB, dtype=square.dtype, device=square.device)
            padded = padded.expand(window.side, window.side, 3).clone()
            padded[: window.height, : window.width] = square
            square = padded
        image = square.permute(2, 0, 1)[None].float()
        size = self.image_size
        if window.side != size:
            image = F.interpolate(
                image, size=(size, size), mode="bilinear", align_corners=False, antialias=True
            )
        shift, scale = self._normalising()
        return torch.addcmul(shift, image, scale)  # (x / 255 − mean) / std, resizing is linear

    def _normalising(self) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM2's input normalisation of 0–255 values as one multiply-add, made once."""
        if self._normalise is None:
            mean = torch.tensor(SAM2_MEAN, device=self.device).view(1, 3, 1, 1)
            std = torch.tensor(SAM2_STD, device=self.device).view(1, 3, 1, 1)
            self._normalise = (-mean / std, 1.0 / (255.0 * std))
        return self._normalise

    def _encode(self, items: Sequence[tuple[np.ndarray, Window]]) -> list[WindowFeatures]:
        batch = torch.cat([self.window_input(tile, window) for tile, window in items])
        with inference(self.device):
            backbone_out = self.model.forward_image(batch)
            _, vision_feats, _, feat_sizes = self.model._prepare_backbone_features(backbone_out)
            if self.model.directly_add_no_mem_embed:
                vision_feats[-1] = vision_feats[-1] + self.model.no_mem_embed
        feats = [
            feat.permute(1, 2, 0).reshape(len(items), -1, *hw)
            for feat, hw in zip(vision_feats, feat_sizes, strict=True)
        ]
        return [
            WindowFeatures(
                image_embed=feats[-1][i : i + 1],
                high_res=[level[i : i + 1] for level in feats[:-1]],
                window=window,
            )
            for i, (_, window) in enumerate(items)
        ]

    def prompts(
        self, window: Window, points: torch.Tensor | None = None, boxes: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM2's sparse (N, K + 1, C) and dense (N, C, h, w) embeddings of ``points`` (N, 2)
        or ``boxes`` (N, 4, xyxy) in tile pixels: one positive point or one box per prompt,
        placed in ``window``'s model input."""
        origin = torch.tensor([window.x, window.y], device=self.device, dtype=torch.float32)
        scale = self.image_size / window.side
        if boxes is not None:
            coords, labels = (boxes.float().reshape(-1, 2, 2) - origin) * scale, BOX_LABELS
        else:
            coords, labels = (points.float()[:, None, :] - origin) * scale, POINT_LABELS
        with inference(self.device):
            return self._tokens()(coords, labels)

    def _tokens(self) -> PromptTokens:
        if self._prompt_tokens is None:
            self._prompt_tokens = PromptTokens(self.model.sam_prompt_encoder)
        return self._prompt_tokens

    def decode(
        self,
        features: WindowFeatures,
        prompts: tuple[torch.Tensor, torch.Tensor],
        multimask: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res logits (N, M, h, w) float32 of the window and predicted IoUs (N, M) for N
        ``prompts`` (:meth:`prompts`' embeddings, or a slice of them). The logits cover the
        whole (padded) window, unclamped, as SAM2 upsamples them."""
        sparse, dense = prompts
        with inference(self.device):
            low_res, iou_preds, _, _ = self.model.sam_mask_decoder(
                image_embeddings=features.image_embed,
                image_pe=self._tokens().dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask,
                repeat_image=True,
                high_res_features=features.high_res,
            )
        return low_res.float(), iou_preds.float()


def window_points(window: Window, points_per_side: int, device: torch.device) -> torch.Tensor:
    """SAM2's point grid over a window, in tile px, without the points in its padding."""
    grid = torch.from_numpy(build_point_grid(points_per_side)).to(device)
    points = grid * window.side + grid.new_tensor([window.x, window.y])
    inside = (points[:, 0] < window.x + window.width) & (points[:, 1] < window.y + window.height)
    return points[inside]


def even_batches(count: int, most: int) -> list[slice]:
    """``count`` items in as few batches of at most ``most`` as possible, their sizes differing
    by at most one (1 296 points at 768: two calls of 648, not 768 + 528): every call has one
    shape and the peak memory is no larger than the count needs."""
    batches = math.ceil(count / most)
    if not batches:
        return []  # an edge window too narrow to hold a point of the grid
    bounds = [round(i * count / batches) for i in range(batches + 1)]
    return [slice(start, end) for start, end in itertools.pairwise(bounds)]


def derived_points_per_side(settings: MKSettings, side: int, pixel_size_um: float) -> int:
    """Points per window side: the setting, or one point every ``point_spacing_radii`` radii of
    the smallest MK (as a disc), so every MK of the minimum area holds a prompt."""
    if settings.points_per_side:
        return settings.points_per_side
    radius_px = math.sqrt(area_px(settings.min_area_um2, pixel_size_um) / math.pi)
    return max(1, math.ceil(side / (settings.point_spacing_radii * radius_px)))


def mk_prompts(
    tile_hw: tuple[int, int], settings: MKSettings, pixel_size_um: float, image_size: int
) -> list[tuple[Window, int]]:
    """The MK segmenter's windows of a tile and the points per side of each."""
    side = window_side(tile_hw, image_size, settings.max_downsample)
    overlap = window_overlap_px(settings.max_area_um2, pixel_size_um)
    per_side = derived_points_per_side(settings, side, pixel_size_um)
    return [(window, per_side) for window in tile_windows(tile_hw, side, overlap)]


class Sam2MKSegmenter:
    """Megakaryocytes by SAM2 automatic mask generation over the windows of each tile."""

    cell_type = "MK"

    def __init__(self, engine: Sam2Engine, settings: MKSettings) -> None:
        self.engine = engine
        self.settings = settings
        self._prompts: dict[tuple[Window, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def windows(self, tile_hw: tuple[int, int], pixel_size_um: float) -> list[Window]:
        """The windows SAM2 encodes for a tile of this size."""
        prompts = mk_prompts(tile_hw, self.settings, pixel_size_um, self.engine.image_size)
        return [window for window, _ in prompts]

    def segment(self, tiles: Sequence[np.ndarray], pixel_size_um: float) -> list[Detections]:
        """One :class:`Detections` per tile; overlapping masks: the higher predicted IoU wins."""
        if not tiles:
            return []
        windows = [self.windows(tile.shape[:2], pixel_size_um) for tile in tiles]
        features = self.engine.encode(tiles, windows)
        with self.engine.timer("mk_masks"):
            return [
                self._segment_tile(tile_features, tile.shape[:2], pixel_size_um)
                for tile, tile_features in zip(tiles, features, strict=True)
            ]

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

    def _window_prompts(
        self, window: Window, points_per_side: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt embeddings of a window's point grid (:func:`window_points`). They depend
        on the window's place in its tile, not on the tile, so every tile of a run reuses
        them: made once per window, the :data:`CACHED_WINDOWS` used last kept (2.7 MB each at
        0.1725 µm/px, where 1 296 points fall in a window; ~22 MB at 0.5 µm/px)."""
        key = (window, points_per_side)
        prompts = self._prompts.pop(key, None)
        if prompts is None:
            if len(self._prompts) >= CACHED_WINDOWS:
                del self._prompts[next(iter(self._prompts))]  # the least recently used
            points = window_points(window, points_per_side, self.engine.device)
            prompts = self.engine.prompts(window, points=points)
        self._prompts[key] = prompts  # most recently used last
        return prompts

    def _candidates(
        self, features: WindowFeatures, points_per_side: int, rules: LowResFilter
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res logits and predicted IoUs of a window's candidates passing the pre-filter."""
        s = self.settings
        sparse, dense = self._window_prompts(features.window, points_per_side)
        kept_logits, kept_iou = [], []
        for batch in even_batches(len(sparse), s.points_per_batch):
            logits, iou = self.engine.decode(features, (sparse[batch], dense[batch]))
            logits, iou = logits.flatten(0, 1), iou.flatten(0, 1)
            side = features.window.side
            low_px = (side / logits.shape[-2]) * (side / logits.shape[-1])
            keep = filter_lowres(logits, iou, low_px, rules)
            kept_logits.append(logits[keep])
            kept_iou.append(iou[keep])
        if not kept_logits:
            empty = torch.zeros((0, 1, 1), device=self.engine.device)
            return empty, torch.zeros(0, device=self.engine.device)
        return torch.cat(kept_logits), torch.cat(kept_iou)

    def _segment_tile(
        self, features: list[WindowFeatures], tile_hw: tuple[int, int], pixel_size_um: float
    ) -> Detections:
        masks = self.proposals(features, tile_hw, pixel_size_um)
        if masks is None:
            log.debug("MK: no candidate passed the filters")
            return Detections(np.zeros(tile_hw, np.int32), np.zeros(0, np.float32))
        rules = self._rules(pixel_size_um)
        return paint_masks(masks, tile_hw, rules, self.settings.containment_thresh)

    def proposals(
        self, features: list[WindowFeatures], tile_hw: tuple[int, int], pixel_size_um: float
    ) -> WindowMasks | None:
        """What SAM2's automatic mask generator returns for the tile's windows: every window's
        candidates through SAM2's filters, then one box NMS over all windows (None if none)."""
        s = self.settings
        rules = self._rules(pixel_size_um)
        per_side = derived_points_per_side(s, features[0].window.side, pixel_size_um)
        found = []
        for window_features in features:
            logits, iou = self._candidates(window_features, per_side, rules)
            if len(logits):
                window = window_features.window
                found.append(WindowMasks.measure(logits, iou, window, tile_hw, rules))
        masks = WindowMasks.cat(found)
        if masks is None or not len(masks.iou):
            return None
        keep = batched_nms(
            masks.tight.float(), masks.iou, torch.zeros_like(masks.iou), s.box_nms_thresh
        )
        return masks.select(keep)


@dataclass
class WindowMasks:
    """Upsampled candidates of one or more windows: the logits and what SAM2 measures on them.

    ``boxes`` (window px, half-open) hold every pixel above ``t − offset``; ``tight`` are the
    masks' inclusive boxes in tile px, as SAM2's ``batched_mask_to_box`` gives them.
    """

    logits: torch.Tensor
    iou: torch.Tensor
    boxes: torch.Tensor
    tight: torch.Tensor
    area: torch.Tensor
    windows: list[Window]
    window_index: torch.Tensor

    @classmethod
    def measure(
        cls,
        logits: torch.Tensor,
        iou: torch.Tensor,
        window: Window,
        tile_hw: tuple[int, int],
        rules: LowResFilter,
    ) -> WindowMasks:
        """Upsample a window's candidates in their boxes, keep those SAM2 would keep.

        Kept: stability score ≥ the threshold (SAM2's, on the upsampled logits), exact area in
        range, and the box not within SAM2's tolerance of an inner edge of the window (an edge
        that is not the tile's); the overlap between windows holds such a cell whole elsewhere.
        """
        side = (window.side, window.side)
        boxes = lowres_boxes(logits, rules.mask_threshold - rules.stability_score_offset, side)
        valid = boxes.new_tensor([window.width, window.height])
        boxes = torch.minimum(boxes, valid.repeat(2))
        stability, area, tight = [], [], []
        for chunk in _ordered_chunks(boxes):
            st, ar, ti = upsampled_stats(logits[chunk], boxes[chunk], side, rules)
            stability.append(st), area.append(ar), tight.append(ti)
        stability, area = torch.cat(stability), torch.cat(area)
        tight = torch.cat(tight) + boxes.new_tensor([window.x, window.y]).repeat(2)
        keep = (area > 0) & (area >= rules.min_area_px) & (area <= rules.max_area_px)
        if rules.stability_score_thresh > 0:
            keep &= stability >= rules.stability_score_thresh
        tile_box = [0, 0, tile_hw[1], tile_hw[0]]
        keep &= ~is_box_near_crop_edge(tight, window.crop_box, tile_box, EDGE_TOLERANCE_PX)
        return cls(
            logits[keep],
            iou[keep],
            boxes[keep],
            tight[keep],
            area[keep],
            [window],
            torch.zeros(int(keep.sum()), dtype=torch.long, device=logits.device),
        )

    @classmethod
    def cat(cls, parts: list[WindowMasks]) -> WindowMasks | None:
        """The candidates of several windows as one set."""
        if not parts:
            return None
        shape = max(p.logits.shape[-1] for p in parts)
        if any(p.logits.shape[-1] != shape for p in parts):
            raise ValueError("windows of one tile must share the decoder's output size")
        offsets = np.cumsum([0] + [len(p.windows) for p in parts])
        return cls(
            torch.cat([p.logits for p in parts]),
            torch.cat([p.iou for p in parts]),
            torch.cat([p.boxes for p in parts]),
            torch.cat([p.tight for p in parts]),
            torch.cat([p.area for p in parts]),
            [w for p in parts for w in p.windows],
            torch.cat([p.window_index + int(o) for p, o in zip(parts, offsets, strict=False)]),
        )

    def select(self, index: torch.Tensor) -> WindowMasks:
        """A subset, by index or boolean vector."""
        return WindowMasks(
            self.logits[index],
            self.iou[index],
            self.boxes[index],
            self.tight[index],
            self.area[index],
            self.windows,
            self.window_index[index],
        )

    def pixels(
        self, tile_hw: tuple[int, int], threshold: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat tile-pixel indices of every mask and the mask each belongs to."""
        flats, owners = [], []
        for w, window in enumerate(self.windows):
            members = torch.nonzero(self.window_index == w).flatten()
            side = (window.side, window.side)
            for chunk in _ordered_chunks(self.boxes[members]):
                index = members[chunk]
                masks = upsample_in_boxes(self.logits[index], self.boxes[index], side, threshold)
                shifted = self.boxes[index] + self.boxes.new_tensor([window.x, window.y]).repeat(2)
                flat, k = window_pixels(shifted, masks, tile_hw)
                flats.append(flat)
                owners.append(index[k])
        if not flats:
            empty = torch.zeros(0, dtype=torch.long, device=self.iou.device)
            return empty, empty
        return torch.cat(flats), torch.cat(owners)


def _ordered_chunks(boxes: torch.Tensor) -> list[torch.Tensor]:
    """:func:`window_chunks`, but each chunk's indices ascending, so results keep box order."""
    return [chunk.sort().values for chunk in window_chunks(boxes)] if len(boxes) else []


def paint_masks(
    masks: WindowMasks, tile_hw: tuple[int, int], rules: LowResFilter, containment: float
) -> Detections:
    """Suppress masks nested in a larger one, then paint the rest into one label image.

    Where masks still overlap, the one with the higher score (predicted IoU) keeps the pixels;
    a mask left below the minimum area by that is dropped.
    """
    flat, owner = masks.pixels(tile_hw, rules.mask_threshold)
    nested = nested_in_larger(flat, owner, masks.tight, tile_hw[1], masks.iou, containment)
    scores = masks.iou
    priority = score_priority(scores)
    painter = Painter(tile_hw, scores.device)
    keep = ~nested[owner]
    painter.add_pixels(flat[keep], priority[owner[keep]])
    log.debug("MK: %d masks, %d nested in a larger one", len(scores), int(nested.sum()))
    return painter.detections(scores, priority, rules.min_area_px)
