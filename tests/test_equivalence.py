"""Proof against the stock libraries: bmseg's SAM2 and Cellpose paths return what the stock
classes return on the same input, with the same (random, `make-test`) weights.

- MKs: :class:`bmseg.models.sam2_models.Sam2MKSegmenter` against SAM2's own
  ``SAM2AutomaticMaskGenerator`` with the same settings (thresholds loosened so that random
  weights let masks through). The tile is smaller than SAM2's input, so both resize it (a
  coordinate transform to get right) and bmseg uses one window: the proposals must match mask
  for mask (IoU ≥ 0.95), and the painted result must have the stock count less exactly the
  masks the documented rules remove (nested in a larger mask; left without a pixel).
- HSPCs: the Cellpose network output of :class:`CellposeHSPCSegmenter` against
  ``CellposeModel.eval(..., compute_masks=False)``: flows and cell probability within float
  tolerance, with and without a diameter.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bmseg.models import HSPCSettings, MKSettings, load_models
from bmseg.models.layout import read_manifest, weight_path
from bmseg.models.loading import load_sam2

PIXEL_UM = 0.5
TILE = 400  # < SAM2's 1024 px input: both sides resize by 2.56


@pytest.fixture(scope="module")
def models(test_models_dir: Path):
    return load_models(test_models_dir, "cpu", hspc_settings=HSPCSettings())


@pytest.fixture(scope="module")
def sam2_full_input(test_models_dir: Path) -> torch.nn.Module:
    """The test SAM2 at its config's 1024 px input, the only size the stock predictor takes."""
    manifest = read_manifest(test_models_dir)
    path = weight_path(test_models_dir, manifest.sam2_checkpoint)
    return load_sam2(path, manifest.sam2_config, torch.device("cpu"))


def textured_tile(seed: int = 0, size: int = TILE) -> np.ndarray:
    """Smooth blobs and noise: random weights give varied masks on it."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal((size, size, 3)), (12, 12, 0))
    field = (field - field.min()) / np.ptp(field)
    return (field * 255).astype(np.uint8)


MK_SETTINGS = dict(
    points_per_side=4,
    points_per_batch=16,
    pred_iou_thresh=0.0,  # the stock filter is off at 0; bmseg's keeps iou > 0
    stability_score_thresh=0.0,  # random logits are never stable (exact score: test_models)
    box_nms_thresh=1.0,  # random weights draw near-whole-tile masks: their boxes coincide
)


def stock_masks(model: torch.nn.Module, tile: np.ndarray) -> list[dict]:
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    generator = SAM2AutomaticMaskGenerator(model, **MK_SETTINGS)
    return [m for m in generator.generate(tile) if m["predicted_iou"] > 0]


def test_mk_proposals_match_sam2_automatic_mask_generator(sam2_full_input) -> None:
    from bmseg.models.sam2_models import Sam2Engine, Sam2MKSegmenter, paint_masks
    from bmseg.timing import StageTimer

    tile = textured_tile()
    stock = stock_masks(sam2_full_input, tile)
    assert len(stock) >= 20  # the loosened thresholds let random weights through
    engine = Sam2Engine(sam2_full_input, torch.device("cpu"), StageTimer(torch.device("cpu")))
    settings = MKSettings(min_area_um2=0.0, max_area_um2=1e9, **MK_SETTINGS)
    segmenter = Sam2MKSegmenter(engine, settings)
    windows = segmenter.windows(tile.shape[:2], PIXEL_UM)
    assert [(w.x, w.y, w.side) for w in windows] == [(0, 0, TILE)]
    (features,) = engine.encode([tile], [windows])
    proposals = segmenter.proposals(features, tile.shape[:2], PIXEL_UM)
    flat, owner = proposals.pixels(tile.shape[:2], 0.0)
    ours = np.zeros((len(proposals.iou), TILE * TILE), bool)
    ours[owner.numpy(), flat.numpy()] = True
    theirs = np.stack([m["segmentation"].ravel() for m in stock])
    assert len(ours) == len(theirs)
    # Both lists come out of box NMS in descending predicted IoU: compare them in order.
    stock_iou = np.array([m["predicted_iou"] for m in stock])
    np.testing.assert_allclose(proposals.iou.numpy(), stock_iou, rtol=0, atol=1e-5)
    inter = (ours & theirs).sum(1)
    union = (ours | theirs).sum(1)
    assert (inter / union >= 0.95).all(), inter / union
    assert np.abs(ours.sum(1) - theirs.sum(1)).max() <= 0.01 * theirs.sum(1).min()
    stock_box = np.array([m["bbox"] for m in stock])  # x, y, w, h of inclusive corners
    ours_box = proposals.tight.numpy().astype(float)
    ours_box[:, 2:] -= ours_box[:, :2]
    assert np.abs(ours_box - stock_box).max() <= 1

    # Painted: the stock masks less those nested in a larger one (containment rule, on the
    # stock masks), less those that keep no pixel once higher-scored masks took theirs.
    found = paint_masks(
        proposals, tile.shape[:2], segmenter._rules(PIXEL_UM), settings.containment_thresh
    )
    areas = theirs.sum(1)
    shared = theirs.astype(np.float32) @ theirs.T.astype(np.float32)
    order = np.lexsort((-stock_iou, areas))  # rank: larger area, then higher score
    rank = np.empty(len(order), int)
    rank[order] = np.arange(len(order))
    larger = rank[:, None] > rank[None, :]
    nested = ((shared >= settings.containment_thresh * areas[None, :]) & larger).any(axis=0)
    priority = np.where(theirs[~nested], stock_iou[~nested, None], -1.0)
    winners = np.unique(priority.argmax(axis=0)[priority.max(axis=0) > -1])
    assert found.count == len(winners) < len(stock)


def test_hspc_network_output_matches_cellpose_eval(models) -> None:
    tile = textured_tile(1, 300)
    d_p, cellprob = models.hspc.flows(tile, PIXEL_UM)
    _, flows, _ = models.hspc.cellpose.eval(tile, compute_masks=False)
    np.testing.assert_allclose(d_p, flows[1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(cellprob, flows[2], rtol=1e-4, atol=1e-4)


def test_hspc_rescaled_output_matches_cellpose_eval_with_diameter(models) -> None:
    from bmseg.models.cellpose_models import CellposeHSPCSegmenter

    tile = textured_tile(2, 240)
    diameter_um = 8.0  # 16 px at 0.5 µm/px: Cellpose rescales by 30 / 16
    segmenter = CellposeHSPCSegmenter(
        models.hspc.cellpose,
        models.hspc.engine,
        HSPCSettings(diameter_um=diameter_um),
        models.device,
    )
    d_p, cellprob = segmenter.flows(tile, PIXEL_UM)
    _, flows, _ = segmenter.cellpose.eval(
        tile, diameter=diameter_um / PIXEL_UM, compute_masks=False
    )
    np.testing.assert_allclose(d_p, flows[1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(cellprob, flows[2], rtol=1e-4, atol=1e-4)
    assert segmenter.niter(PIXEL_UM) == int(200 / (30 * PIXEL_UM / diameter_um))
