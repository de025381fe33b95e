"""SEGMENT's counting rules, measured: MKs counted on a tile with nested masks, and HSPC
boundary error with and without SAM2 refinement. No model weights needed.

1. **Nested masks.** A 3000² px tile at 0.1725 µm/px holds MKs of 250–1900 µm²; SAM2's
   multimask output proposes for each a whole-cell mask and a nucleus mask (42–56 % of its
   radius, ≥ 200 µm² where the cell allows) that it rates higher, as real SAM2 often does.
   Both go through the MK segmenter's own filters and painter (``WindowMasks.measure``, box
   NMS, ``paint_masks``) with and without containment suppression: MKs counted per cell.
2. **HSPC boundary error.** Synthetic HSPCs (bmseg.synth's, 6.3–9.7 µm) whose rasterised
   outline is the truth. SAM2's best possible refinement at ``p`` px per decoder pixel is the
   truth area-averaged onto that grid and upsampled bilinearly, as SAM2 upsamples; ``p`` is
   14.1 for the old whole-tile encoding (3616 px / 256), 8 for 2× windows, 4 for native ones.
   Mean distance (px) of the mask's boundary to the true one, for the refined mask and for
   the mask the rule keeps (``choose_refined``: refined only where the cell spans ≥ 8 decoder
   pixels), Cellpose's mask being the truth here.

    python benchmarks/segment_rules.py [--cells 40 --seed 0]
"""

from __future__ import annotations

import argparse

import numpy as np


def nested_counts(cells: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """(planted MKs, MKs counted without containment suppression, with it)."""
    import torch

    from bmseg.models.masks import LowResFilter
    from bmseg.models.sam2_models import Window, WindowMasks, paint_masks
    from bmseg.models.settings import MKSettings, area_px
    from bmseg.synth import PIXEL_SIZE_UM

    settings, tile, low = MKSettings(), 3000, 256
    step = tile / low  # window px per decoder pixel, one window (the filters' view)
    centres = (torch.arange(low) + 0.5) * step - 0.5
    logits, iou, placed = [], [], []
    while len(placed) < cells:
        area = np.exp(rng.uniform(np.log(250.0), np.log(1900.0))) / PIXEL_SIZE_UM**2
        radius = np.sqrt(area / np.pi)
        x, y = rng.uniform(radius + 30, tile - radius - 30, 2)
        if any(np.hypot(x - px, y - py) < radius + pr + 4 for px, py, pr in placed):
            continue
        placed.append((x, y, radius))
        smallest = np.sqrt(area_px(settings.min_area_um2, PIXEL_SIZE_UM) / np.pi)
        nucleus = max(rng.uniform(0.42, 0.56) * radius, 1.05 * smallest)
        for r, score in ((radius, 0.85), (min(nucleus, radius), 0.93)):
            distance = torch.sqrt((centres[None, :] - x) ** 2 + (centres[:, None] - y) ** 2)
            logits.append((r - distance) / step * 64)
            iou.append(score)
    rules = LowResFilter(
        settings.mask_threshold,
        settings.pred_iou_thresh,
        settings.stability_score_thresh,
        settings.stability_score_offset,
        area_px(settings.min_area_um2, PIXEL_SIZE_UM),
        area_px(settings.max_area_um2, PIXEL_SIZE_UM),
    )
    window = Window(0, 0, tile, tile, tile)
    masks = WindowMasks.measure(torch.stack(logits), torch.tensor(iou), window, (tile, tile), rules)
    from torchvision.ops import batched_nms

    keep = batched_nms(masks.tight.float(), masks.iou, torch.zeros_like(masks.iou), 0.7)
    masks = masks.select(keep)
    before = paint_masks(masks, (tile, tile), rules, containment=2.0).count  # never nested
    after = paint_masks(masks, (tile, tile), rules, settings.containment_thresh).count
    return cells, before, after


def boundary_error_px(mask: np.ndarray, truth: np.ndarray) -> float:
    """Mean distance (px) from the boundary pixels of ``mask`` to those of ``truth``."""
    from scipy import ndimage

    edge_truth = truth ^ ndimage.binary_erosion(truth)
    edge_mask = mask ^ ndimage.binary_erosion(mask)
    return float(ndimage.distance_transform_edt(~edge_truth)[edge_mask].mean())


def refinement_errors(cells: int, rng: np.random.Generator) -> dict[float, tuple[float, float]]:
    """Per px-per-decoder-pixel: mean boundary error of the refined and of the kept mask."""
    import cv2
    import torch

    from bmseg.models.cellpose_models import choose_refined, fine_enough
    from bmseg.models.masks import upsample_in_boxes
    from bmseg.models.settings import HSPCSettings
    from bmseg.synth import cell_mask, make_hspc

    field, settings = 400, HSPCSettings()
    results: dict[float, list[tuple[float, float]]] = {}
    for _ in range(cells):
        cell = make_hspc(200.0 + rng.uniform(), 200.0 + rng.uniform(), rng)
        x0, y0, x1, y1 = cell.box
        truth = np.zeros((field, field), bool)
        truth[y0:y1, x0:x1] = cell_mask(cell)
        original = torch.from_numpy(truth)[None]
        for p in (3616 / 256, 8.0, 4.0):
            side = round(field / p)
            occupancy = cv2.resize(
                truth.astype(np.float32), (side, side), interpolation=cv2.INTER_AREA
            )
            refined = upsample_in_boxes(
                torch.from_numpy(occupancy - 0.5)[None],
                torch.tensor([[0, 0, field, field]]),
                (field, field),
                0.0,
            )
            fine = fine_enough(original.sum(dim=(1, 2)), p, settings.refine_min_logits_across)
            chosen, _ = choose_refined(refined, original, settings.refine_iou_thresh, fine)
            results.setdefault(p, []).append(
                (
                    boundary_error_px(refined[0].numpy(), truth),
                    boundary_error_px(chosen[0].numpy(), truth),
                )
            )
    return {p: tuple(np.mean(v, axis=0)) for p, v in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=40, help="cells per figure (40)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    planted, before, after = nested_counts(args.cells, rng)
    print(f"MKs on a 3000² tile, each with a nucleus mask: planted {planted}, "
          f"counted before {before} (containment off), now {after}")  # fmt: skip
    for p, (refined, kept) in refinement_errors(args.cells, rng).items():
        print(f"HSPC boundary error at {p:5.1f} px per decoder pixel: refined {refined:.2f} px, "
              f"kept by the rule {kept:.2f} px (Cellpose's own: 0.00 px)")  # fmt: skip


if __name__ == "__main__":
    main()
