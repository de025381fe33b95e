"""Segmentation settings for the two cell types, with the defaults the pipeline runs at.

Plain dataclasses (no torch), so the command line can build them before any model loads.
Areas are in µm² and converted to pixels with the tile's pixel size at segmentation time.
"""

from __future__ import annotations

from dataclasses import dataclass

from bmseg.errors import BmsegError
from bmseg.flows import DEFAULT_FLOWS_METHOD, FLOWS_METHODS

DEVICE_CHOICES = ("auto", "cpu", "cuda")
"""What ``--device`` takes: a GPU when there is one, the CPU, or a GPU or an error."""


@dataclass(frozen=True)
class MKSettings:
    """SAM2 automatic mask generation for megakaryocytes.

    Defaults follow the in-house script's production run (32 × 32 points, pred_iou_thresh 0.5,
    MK area 200–2000 µm²); the remaining values are SAM2's own automatic-mask-generator
    defaults. ``points_per_batch`` only trades device memory for speed.
    """

    min_area_um2: float = 200.0
    max_area_um2: float = 2000.0
    points_per_side: int = 32
    points_per_batch: int = 256
    pred_iou_thresh: float = 0.5
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    mask_threshold: float = 0.0
    box_nms_thresh: float = 0.7

    def __post_init__(self) -> None:
        _check_area_range("--mk-min-area-um2", self.min_area_um2, self.max_area_um2)
        if self.points_per_side < 1 or self.points_per_batch < 1:
            raise BmsegError("--mk-points-per-side: must be a positive integer; pass e.g. 32")


@dataclass(frozen=True)
class HSPCSettings:
    """Cellpose-SAM plus SAM2 box refinement for HSPCs.

    HSPCs are 6–10 µm across (≈ 28–80 µm² as discs). The default area range 15–200 µm² is
    deliberately wider: a tissue section cuts most cells off their equator, so profiles are
    smaller than the cell (down to ~4.5 µm across = 15 µm²), and boundaries drawn on a blurred
    brightfield edge add about a micrometre all round; the upper bound stops at the MK
    minimum (200 µm²) so the two size classes never overlap. ``refine_iou_thresh`` 0.5 is the
    usual same-object criterion (AP@0.5 in the Cellpose papers): SAM2's refined mask replaces
    Cellpose's only when both clearly outline the same cell.
    """

    min_area_um2: float = 15.0
    max_area_um2: float = 200.0
    refine: bool = True
    refine_iou_thresh: float = 0.5
    refine_box_batch: int = 256
    flows_method: str = DEFAULT_FLOWS_METHOD
    cellprob_threshold: float = 0.0
    flow_threshold: float = 0.4
    niter: int = 200
    diameter_um: float | None = None
    cellpose_batch_size: int = 32
    tile_overlap: float = 0.1

    def __post_init__(self) -> None:
        _check_area_range("--hspc-min-area-um2", self.min_area_um2, self.max_area_um2)
        if not 0.0 <= self.refine_iou_thresh <= 1.0:
            raise BmsegError("--hspc-refine-iou: must lie in [0, 1]; pass e.g. 0.5")
        if self.flows_method not in FLOWS_METHODS:
            raise BmsegError(f"--hspc-flows-method: must be one of {', '.join(FLOWS_METHODS)}")


@dataclass(frozen=True)
class EmbedderSettings:
    """ResNet-50 embeddings of cell crops (ImageNet normalisation, 224 px crops)."""

    crop_size: int = 224
    batch_size: int = 128


def area_px(area_um2: float, pixel_size_um: float) -> float:
    """Convert an area in µm² to pixels at ``pixel_size_um`` µm per pixel."""
    if pixel_size_um <= 0:
        raise BmsegError(f"pixel size {pixel_size_um} µm: must be positive; check the slide plan")
    return area_um2 / (pixel_size_um * pixel_size_um)


def _check_area_range(flag: str, low: float, high: float) -> None:
    if not 0 <= low < high:
        raise BmsegError(f"{flag}: area range [{low}, {high}] µm² is empty; pass min < max")
