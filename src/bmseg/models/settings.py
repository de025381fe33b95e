"""Segmentation settings for the two cell types, with the defaults the pipeline runs at.

Plain dataclasses (no torch), so the command line can build them before any model loads.
Areas are in µm² and converted to pixels with the tile's pixel size at segmentation time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bmseg.errors import BmsegError
from bmseg.models.choices import DEFAULT_FLOWS_METHOD, FLOWS_METHODS


@dataclass(frozen=True)
class MKSettings:
    """SAM2 automatic mask generation for megakaryocytes.

    The MK area range 200–2000 µm² and ``pred_iou_thresh`` 0.5 follow the in-house script's
    production run; the remaining thresholds are SAM2's own automatic-mask-generator defaults.

    Coverage by design (docs/models.md): SAM2 sees each tile in windows of at most
    ``max_downsample`` × its input size (2048 px for 1024), overlapping by 1.5 × the largest
    MK's diameter, and each window gets one point prompt every ``point_spacing_radii`` radii of
    the smallest MK (a disc of ``min_area_um2``): 36 × 36 points per 2048 px window at
    0.1725 µm/px, so a 200 µm² MK always holds a prompt. ``points_per_side`` fixes the grid
    instead. ``containment_thresh``: a mask with at least this share of its pixels inside a
    larger mask is the same cell (a nucleus, a lobe, a second window's copy) and is dropped.
    ``points_per_batch`` only trades device memory for speed: a window's 1 296 points go to
    the decoder in two even calls of 648 (each call costs the thread that drives the device
    ~40 operators of host work; the decoder holds ~27 MB per point in float32 at SAM2's 1024 px
    input, about half that in bf16, so ~9 GB per call on a GPU).
    """

    min_area_um2: float = 200.0
    max_area_um2: float = 2000.0
    points_per_side: int | None = None
    point_spacing_radii: float = 1.25
    max_downsample: float = 2.0
    points_per_batch: int = 768
    pred_iou_thresh: float = 0.5
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    mask_threshold: float = 0.0
    box_nms_thresh: float = 0.7
    containment_thresh: float = 0.5

    def __post_init__(self) -> None:
        _check_area_range("--mk-min-area-um2", self.min_area_um2, self.max_area_um2)
        if (self.points_per_side is not None and self.points_per_side < 1) or (
            self.points_per_batch < 1
        ):
            raise BmsegError("--mk-points-per-side: must be a positive integer; pass e.g. 32")
        if not self.max_downsample > 0 or not self.point_spacing_radii > 0:
            raise BmsegError("--mk-max-downsample: must be positive; pass e.g. 2")
        if not 0.0 < self.containment_thresh <= 1.0:
            raise BmsegError("MK containment threshold must lie in (0, 1]; pass e.g. 0.5")


@dataclass(frozen=True)
class HSPCSettings:
    """Cellpose-SAM, optionally refined by SAM2 box prompts, for HSPCs.

    HSPCs are 6–10 µm across (≈ 28–80 µm² as discs). The default area range 15–200 µm² is
    deliberately wider: a tissue section cuts most cells off their equator, so profiles are
    smaller than the cell (down to ~4.5 µm across = 15 µm²), and boundaries drawn on a blurred
    brightfield edge add about a micrometre all round; the upper bound stops at the MK
    minimum (200 µm²) so the two size classes never overlap.

    ``refine`` is off by default (docs/models.md): SAM2's decoder draws on a grid 4× coarser
    than its input. When on, SAM2 encodes windows at ``refine_max_downsample`` (1: native
    resolution) and its mask replaces Cellpose's only when IoU ≥ ``refine_iou_thresh`` (0.5,
    the usual same-object criterion, AP@0.5 in the Cellpose papers) and the cell spans at least
    ``refine_min_logits_across`` decoder pixels (so the bilinear outline is no coarser).
    ``diameter_um`` rescales the image so cells are Cellpose's 30 px across; ``niter`` None
    is Cellpose's ``200 / rescale``.
    """

    min_area_um2: float = 15.0
    max_area_um2: float = 200.0
    refine: bool = False
    refine_iou_thresh: float = 0.5
    refine_max_downsample: float = 1.0
    refine_min_logits_across: float = 8.0
    refine_box_batch: int = 256
    flows_method: str = DEFAULT_FLOWS_METHOD
    cellprob_threshold: float = 0.0
    flow_threshold: float = 0.4
    niter: int | None = None
    diameter_um: float | None = None
    cellpose_batch_size: int = 32
    tile_overlap: float = 0.1

    def __post_init__(self) -> None:
        _check_area_range("--hspc-min-area-um2", self.min_area_um2, self.max_area_um2)
        if not 0.0 <= self.refine_iou_thresh <= 1.0:
            raise BmsegError("--hspc-refine-iou: must lie in [0, 1]; pass e.g. 0.5")
        if self.flows_method not in FLOWS_METHODS:
            raise BmsegError(f"--hspc-flows-method: must be one of {', '.join(FLOWS_METHODS)}")
        if self.diameter_um is not None and not 0 < self.diameter_um < 1000:
            raise BmsegError(
                f"--hspc-diameter-um {self.diameter_um}: must be a cell diameter in µm, e.g. 8"
            )
        if not self.refine_max_downsample > 0:
            raise BmsegError("--hspc-refine-max-downsample: must be positive; pass e.g. 1")


def hspc_margin_px(max_area_um2: float, pixel_size_um: float) -> int:
    """Margin around a tile's core for Cellpose: the diameter of a disc of the largest HSPC.

    A cell whose centroid lies in the core then lies wholly in core + margin, so ownership
    never cuts it (200 µm² at 0.1725 µm/px: 93 px, against the MK margin of 308 px).
    """
    diameter_um = 2 * math.sqrt(max_area_um2 / math.pi)
    return math.ceil(diameter_um / pixel_size_um)


HSPC_CROP_SIZE = 112
"""The smaller crop side offered for HSPC crops (a quarter of the pixels of 224², same 2048-d)."""


@dataclass(frozen=True)
class EmbedderSettings:
    """ResNet-50 embeddings of cell crops (ImageNet normalisation, 224 px crops)."""

    crop_size: int = 224
    batch_size: int = 128
    hspc_crop_size: int = 224
    """The side HSPC crops are resampled to (``--hspc-embed-px``): 224 as MKs, or 112."""


def area_px(area_um2: float, pixel_size_um: float) -> float:
    """Convert an area in µm² to pixels at ``pixel_size_um`` µm per pixel."""
    if pixel_size_um <= 0:
        raise BmsegError(f"pixel size {pixel_size_um} µm: must be positive; check the slide plan")
    return area_um2 / (pixel_size_um * pixel_size_um)


def _check_area_range(flag: str, low: float, high: float) -> None:
    if not 0 <= low < high:
        raise BmsegError(f"{flag}: area range [{low}, {high}] µm² is empty; pass min < max")
