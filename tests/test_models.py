"""Models: loading through the libraries' own builders, errors, and the mask logic."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bmseg.cli import main
from bmseg.errors import BmsegError
from bmseg.models import (
    Detections,
    EmbedderSettings,
    HSPCSettings,
    MKSettings,
    exclude_claimed,
    load_models,
    resolve_device,
)
from bmseg.models.cellpose_models import choose_refined
from bmseg.models.masks import (
    LowResFilter,
    Painter,
    filter_lowres,
    label_boxes,
    lowres_boxes,
    score_priority,
    upsample_in_boxes,
)
from bmseg.models.sam2_models import paint_lowres

PIXEL_UM = 0.5  # 4 px per µm²: areas stay small on small test tiles


@pytest.fixture(scope="module")
def models(test_models_dir: Path):
    """The test models, loaded once with filters loose enough for random weights."""
    return load_models(
        test_models_dir,
        "cpu",
        mk_settings=MKSettings(
            points_per_side=4,
            points_per_batch=8,
            pred_iou_thresh=-100.0,
            stability_score_thresh=0.0,
            min_area_um2=50.0,
            max_area_um2=5000.0,
        ),
        hspc_settings=HSPCSettings(min_area_um2=20.0, max_area_um2=100.0),
        embedder_settings=EmbedderSettings(crop_size=64, batch_size=3),  # 224 in production
    )


def random_tile(size: int = 256, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


# --- loading ----------------------------------------------------------------------------------


def test_make_test_writes_official_formats(test_models_dir: Path) -> None:
    manifest = json.loads((test_models_dir / "manifest.json").read_text())
    assert manifest["random_init"] is True
    assert manifest["sam2_config"] == "configs/sam2.1/sam2.1_hiera_t.yaml"
    sam2 = torch.load(test_models_dir / manifest["sam2_checkpoint"], weights_only=True)
    assert "image_encoder.trunk.patch_embed.proj.weight" in sam2["model"]
    cellpose = torch.load(test_models_dir / manifest["cellpose_checkpoint"], weights_only=True)
    assert "W2" in cellpose and "encoder.patch_embed.proj.weight" in cellpose
    resnet = torch.load(test_models_dir / manifest["resnet50_weights"], weights_only=True)
    assert resnet["fc.weight"].shape == (1000, 2048)


def test_loaded_models_are_the_libraries_own(models) -> None:
    from cellpose.models import CellposeModel
    from sam2.modeling.sam2_base import SAM2Base
    from torchvision.models import ResNet

    assert isinstance(models.mk.engine.model, SAM2Base)
    assert models.hspc.engine is models.mk.engine
    assert isinstance(models.hspc.cellpose, CellposeModel)
    assert isinstance(models.embedder.net, ResNet)
    assert models.device == torch.device("cpu")


def test_missing_weights_name_the_file_and_fetch(test_models_dir: Path, tmp_path: Path) -> None:
    partial = tmp_path / "models"
    shutil.copytree(test_models_dir, partial)
    (partial / "resnet50_random.pth").unlink()
    with pytest.raises(BmsegError, match=r"resnet50_random\.pth.*bmseg models fetch --dest"):
        load_models(partial, "cpu")
    (tmp_path / "empty").mkdir()  # no manifest: the production file names are expected
    with pytest.raises(BmsegError, match=r"sam2\.1_hiera_large\.pt.*bmseg models fetch"):
        load_models(tmp_path / "empty", "cpu")
    with pytest.raises(BmsegError, match=r"nowhere.*models directory not found"):
        load_models(tmp_path / "nowhere", "cpu")


@pytest.mark.parametrize(
    "victim", ["sam2.1_hiera_tiny_random.pt", "cpsam_tiny_random", "resnet50_random.pth"]
)
def test_corrupt_checkpoint_is_one_line_error(
    test_models_dir: Path, tmp_path: Path, victim: str
) -> None:
    broken = tmp_path / "models"
    shutil.copytree(test_models_dir, broken)
    data = (broken / victim).read_bytes()
    (broken / victim).write_bytes(data[: len(data) // 3])  # a download cut short
    with pytest.raises(BmsegError) as error:
        load_models(broken, "cpu")
    message = str(error.value)
    assert victim in message and "bmseg models fetch" in message and "\n" not in message


def test_wrong_architecture_is_corrupt_not_traceback(test_models_dir: Path, tmp_path: Path) -> None:
    swapped = tmp_path / "models"
    shutil.copytree(test_models_dir, swapped)
    torch.save({"conv.weight": torch.zeros(3)}, swapped / "resnet50_random.pth")
    with pytest.raises(BmsegError, match="not a valid ResNet-50 checkpoint"):
        load_models(swapped, "cpu")


def test_cuda_without_gpu_is_an_error_not_a_cpu_run() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(BmsegError, match="--device cuda"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(BmsegError, match="--device tpu"):
        resolve_device("tpu")


def test_fetch_list_names_files_without_network(tmp_path: Path, capsys) -> None:
    assert main(["models", "fetch", "--dest", str(tmp_path / "m"), "--list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    targets = dict(line.split("\t") for line in lines)
    assert {Path(t).name for t in targets} == {"sam2.1_hiera_large.pt", "cpsam", "resnet50.pth"}
    assert all(url.startswith("https://") for url in targets.values())
    assert not (tmp_path / "m").exists()


def test_fetch_requires_dest() -> None:
    with pytest.raises(SystemExit):
        main(["models", "fetch"])


# --- MK: low-resolution filtering ---------------------------------------------------------------


def disc_logits(radius: float, size: int = 64, centre: tuple[float, float] = (32, 32)):
    """Signed-distance logits of a disc: positive inside, like a confident decoder output."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return radius - torch.sqrt((y - centre[0]) ** 2 + (x - centre[1]) ** 2)


def test_lowres_filter_keeps_only_areas_in_range() -> None:
    # A 64x64 low-res map of a 640x640 tile: every low-res pixel stands for 100 tile px.
    radii = torch.tensor([3.0, 5.0, 8.0, 11.0, 20.0])  # π r² ≈ 28, 79, 201, 380, 1257
    logits = torch.stack([disc_logits(float(r)) for r in radii]) * 10
    rules = LowResFilter(0.0, 0.5, 0.0, 1.0, min_area_px=5000, max_area_px=30000)
    keep = filter_lowres(logits, torch.ones(5), 100.0, rules)
    areas = (logits > 0).sum((1, 2)) * 100.0
    assert keep.tolist() == [bool(5000 * 0.9 <= a <= 30000 * 1.1) for a in areas]
    assert keep.tolist() == [False, True, True, False, False]


def test_lowres_filter_applies_iou_and_stability() -> None:
    sharp = disc_logits(8.0) * 10
    soft = disc_logits(8.0) * 0.2  # the mask moves a lot when the cut-off shifts by ±1
    logits = torch.stack([sharp, sharp, soft])
    rules = LowResFilter(0.0, 0.5, 0.9, 1.0, min_area_px=1, max_area_px=1e9)
    keep = filter_lowres(logits, torch.tensor([0.9, 0.3, 0.9]), 1.0, rules)
    assert keep.tolist() == [True, False, False]


def test_upsample_in_boxes_equals_full_interpolation() -> None:
    logits = torch.stack([disc_logits(6.0, centre=(20, 30)), disc_logits(9.0, centre=(44, 18))])
    tile_hw = (300, 250)
    boxes = lowres_boxes(logits, 0.0, tile_hw)
    windows = upsample_in_boxes(logits, boxes, tile_hw, 0.0)
    full = F.interpolate(logits[:, None], tile_hw, mode="bilinear", align_corners=False)[:, 0] > 0
    for k in range(2):
        x0, y0, x1, y1 = boxes[k].tolist()
        assert torch.equal(windows[k, : y1 - y0, : x1 - x0], full[k, y0:y1, x0:x1])
        assert int(full[k].sum()) == int(windows[k].sum())  # nothing outside the box


def test_exact_area_decides_after_upsampling() -> None:
    # Low-res 64² of a 256² tile (16 tile px per low-res px). Radii 6 and 9 low-res px give
    # ~113 and ~254 low-res px, i.e. ~1810 and ~4070 tile px; the range [1000, 3800] keeps
    # the first, and the second passes the low-res filter only through its 10 % slack.
    logits = torch.stack([disc_logits(6.0, centre=(16, 16)), disc_logits(9.0, centre=(44, 44))])
    rules = LowResFilter(0.0, 0.0, 0.0, 1.0, min_area_px=1000, max_area_px=3800)
    assert filter_lowres(logits, torch.ones(2), 16.0, rules).tolist() == [True, True]
    boxes = lowres_boxes(logits, 0.0, (256, 256))
    found = paint_lowres(logits, torch.tensor([0.7, 0.8]), boxes, (256, 256), rules)
    full = F.interpolate(logits[:, None], (256, 256), mode="bilinear", align_corners=False)[:, 0]
    assert int((full[1] > 0).sum()) > 3800  # the exact area is out of range
    assert found.count == 1 and found.scores.tolist() == pytest.approx([0.7])
    assert np.array_equal(found.labels == 1, (full[0] > 0).numpy())


def test_painter_gives_overlaps_to_the_higher_score() -> None:
    tile = torch.zeros((40, 40), dtype=torch.bool)
    left, right = tile.clone(), tile.clone()
    left[10:30, 5:25] = True  # 400 px
    right[10:30, 15:35] = True  # 400 px, 200 shared with left
    windows = torch.stack([left, right])
    boxes = torch.tensor([[0, 0, 40, 40], [0, 0, 40, 40]])
    scores = torch.tensor([0.6, 0.9])
    painter = Painter((40, 40), torch.device("cpu"))
    painter.add(boxes, windows, score_priority(scores))
    found = painter.detections(scores, score_priority(scores), min_area_px=150)
    assert found.scores.tolist() == pytest.approx([0.9, 0.6])
    assert (found.labels[10:30, 15:35] == 1).all()  # the shared pixels went to the 0.9 mask
    assert int((found.labels == 2).sum()) == 200
    # With a larger minimum area, the loser (now 200 px) is dropped.
    painter = Painter((40, 40), torch.device("cpu"))
    painter.add(boxes, windows, score_priority(scores))
    assert painter.detections(scores, score_priority(scores), min_area_px=300).count == 1


def test_label_boxes_match_scipy() -> None:
    from scipy import ndimage

    labels = np.zeros((50, 60), np.int64)
    labels[3:9, 4:20] = 1
    labels[30:49, 40:41] = 2
    labels[10, 59] = 3
    boxes = label_boxes(torch.from_numpy(labels), 3).tolist()
    expected = [
        [s[1].start, s[0].start, s[1].stop, s[0].stop] for s in ndimage.find_objects(labels)
    ]
    assert boxes == expected


def test_mk_segmentation_through_sam2(models) -> None:
    tiles = [random_tile(256, 1), random_tile(200, 2)]
    found = models.mk.segment(tiles, PIXEL_UM)
    assert len(found) == 2
    for tile, detections in zip(tiles, found, strict=True):
        assert detections.labels.shape == tile.shape[:2] and detections.labels.dtype == np.int32
        areas = np.bincount(detections.labels.ravel())[1:] * PIXEL_UM**2
        assert len(areas) == detections.count
        assert ((areas >= 50.0) & (areas <= 5000.0)).all()
        assert ((detections.scores >= 0) & (detections.scores <= 1)).all()


# --- HSPC: refinement rule --------------------------------------------------------------------


def test_refined_mask_kept_only_when_it_agrees() -> None:
    original = torch.zeros((3, 20, 20), dtype=torch.bool)
    original[:, 5:15, 5:15] = True  # 100 px each
    refined = torch.zeros_like(original)
    refined[0, 6:15, 5:15] = True  # IoU 0.9: agrees
    refined[1, 5:15, 10:20] = True  # IoU 50/150 = 0.33: disagrees
    refined[2, 5:15, 7:15] = True  # IoU 0.8: agrees at 0.5, not at 0.85
    chosen, agree = choose_refined(refined, original, 0.5)
    assert agree.tolist() == [True, False, True]
    assert torch.equal(chosen[0], refined[0]) and torch.equal(chosen[1], original[1])
    assert choose_refined(refined, original, 0.85)[1].tolist() == [True, False, False]


def test_hspc_area_filter_and_fallback_to_cellpose(models) -> None:
    tile = random_tile(256, 3)
    features = models.hspc.engine.encode([tile])[0]
    cellpose_labels = np.zeros((256, 256), np.int32)
    cellpose_labels[10:20, 10:20] = 1  # 100 px = 25 µm²: an HSPC
    cellpose_labels[100:103, 100:103] = 2  # 2.25 µm²: too small
    cellpose_labels[150:250, 150:250] = 3  # 2500 µm²: too large
    cellpose_labels[40:56, 60:70] = 4  # 160 px = 40 µm²: an HSPC
    cellprob = np.where(cellpose_labels > 0, 3.0, -3.0).astype(np.float32)
    # IoU threshold 1: SAM2's random masks never match exactly, so Cellpose's are kept.
    strict = type(models.hspc)(
        models.hspc.cellpose,
        models.hspc.engine,
        HSPCSettings(min_area_um2=20.0, max_area_um2=100.0, refine_iou_thresh=1.0),
        models.device,
    )
    found = strict.refine(cellpose_labels, cellprob, features, PIXEL_UM)
    assert found.count == 2
    kept = np.isin(cellpose_labels, [1, 4])
    assert np.array_equal(found.labels > 0, kept)
    assert found.scores == pytest.approx([1 / (1 + np.exp(-3.0))] * 2, rel=1e-5)


def test_hspc_segmentation_runs_cellpose_and_sam2(models) -> None:
    found = models.hspc.segment([random_tile(256, 4)], PIXEL_UM)
    assert len(found) == 1 and found[0].labels.shape == (256, 256)
    areas = np.bincount(found[0].labels.ravel())[1:] * PIXEL_UM**2
    assert len(areas) == found[0].count and ((areas >= 20.0) & (areas <= 100.0)).all()


def test_mk_pixels_excluded_from_hspcs() -> None:
    mk = np.zeros((20, 20), np.int32)
    mk[0:10, 0:10] = 1
    hspc = np.zeros((20, 20), np.int32)
    hspc[8:12, 8:12] = 1  # 16 px, 4 inside the MK: keeps 12
    hspc[2:5, 2:5] = 2  # inside the MK: dropped
    hspc[15:18, 15:18] = 3  # untouched
    result = exclude_claimed(
        Detections(mk, np.array([0.9], np.float32)),
        Detections(hspc, np.array([0.5, 0.6, 0.7], np.float32)),
    )
    assert result.scores.tolist() == pytest.approx([0.5, 0.7])
    assert int((result.labels == 1).sum()) == 12 and int((result.labels == 2).sum()) == 9
    assert not ((result.labels > 0) & (mk > 0)).any()


# --- embedder ----------------------------------------------------------------------------------


def test_embedder_shape_dtype_and_batching(models) -> None:
    crops = np.random.default_rng(5).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    batched = models.embedder.embed(crops)  # batches of 3: 3 + 2
    assert batched.shape == (5, 2048) and batched.dtype == np.float32
    assert models.embedder.crop_size == 64 and EmbedderSettings().crop_size == 224
    one_by_one = np.concatenate([models.embedder.embed(crops[i : i + 1]) for i in range(5)])
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-3, atol=1e-4)
    assert not np.allclose(batched[0], batched[1])
    assert models.embedder.embed(crops[:0]).shape == (0, 2048)
    with pytest.raises(ValueError, match="crops must be"):
        models.embedder.embed(crops[:, :32])
