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
    EmbedderSettings,
    HSPCSettings,
    MKSettings,
    load_models,
    resolve_device,
)
from bmseg.models.cellpose_models import choose_refined, fine_enough
from bmseg.models.masks import (
    LowResFilter,
    Painter,
    filter_lowres,
    label_boxes,
    lowres_boxes,
    nested_in_larger,
    pair_intersections,
    score_priority,
    upsample_in_boxes,
    upsampled_stats,
)
from bmseg.models.sam2_models import (
    PAD_RGB,
    SAM2_MEAN,
    SAM2_STD,
    Sam2Engine,
    Sam2MKSegmenter,
    Window,
    WindowFeatures,
    WindowMasks,
    mk_prompts,
    paint_masks,
    tile_windows,
    window_overlap_px,
    window_points,
)
from bmseg.testing.operators import OperatorCount
from bmseg.timing import StageTimer

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


def test_lowres_filter_applies_predicted_iou() -> None:
    sharp = disc_logits(8.0) * 10
    keep = filter_lowres(torch.stack([sharp, sharp]), torch.tensor([0.9, 0.3]), 1.0, RULES_ANY)
    assert keep.tolist() == [True, False]


def test_lowres_filter_range_without_a_whole_count_keeps_nothing() -> None:
    """[0.9 × 40, 1.1 × 40] px at 16 px per low-res pixel is [2.25, 2.75] low-res pixels: no
    whole count lies in it, so no mask passes (a clamp to an empty range would keep count 2);
    an upper bound beyond int64 still works."""
    logits = torch.full((4, 8, 8), -1.0)
    for k, count in enumerate([1, 2, 3, 64]):
        logits[k].view(-1)[:count] = 1.0
    narrow = LowResFilter(0.0, 0.5, 0.0, 1.0, min_area_px=40, max_area_px=40)
    assert filter_lowres(logits, torch.ones(4), 16.0, narrow).tolist() == [False] * 4
    huge = LowResFilter(0.0, 0.5, 0.0, 1.0, min_area_px=20, max_area_px=1e30)
    assert filter_lowres(logits, torch.ones(4), 16.0, huge).tolist() == [False, True, True, True]


RULES_ANY = LowResFilter(0.0, 0.5, 0.0, 1.0, min_area_px=1, max_area_px=1e9)


def test_stability_is_sam2s_on_upsampled_logits() -> None:
    # A 200 µm² disc at 0.1725 µm/px (radius 46 px) in a 3616 px tile seen whole: 14 px per
    # low-res pixel, radius 3.3 low-res px; confident logits, +-5 inside and out.
    from sam2.utils.amg import calculate_stability_score

    tile_hw = (3616, 3616)
    logits = (torch.sign(disc_logits(3.3, size=256, centre=(128, 128))) * 5.0)[None]
    rules = LowResFilter(0.0, 0.0, 0.95, 1.0, min_area_px=1, max_area_px=1e9)
    boxes = lowres_boxes(logits, -1.0, tile_hw)
    stability, area, tight = upsampled_stats(logits, boxes, tile_hw, rules)
    full = F.interpolate(logits[:, None], tile_hw, mode="bilinear", align_corners=False)[:, 0]
    expected = calculate_stability_score(full, 0.0, 1.0)
    assert float(stability[0]) == pytest.approx(float(expected[0]), abs=1e-6)
    assert int(area[0]) == int((full[0] > 0).sum())
    lowres = calculate_stability_score(logits, 0.0, 1.0)
    assert float(lowres[0]) == 1.0 and float(stability[0]) < 0.95  # the old score let it pass
    ys, xs = torch.nonzero(full[0] > 0, as_tuple=True)
    assert tight[0].tolist() == [xs.min(), ys.min(), xs.max(), ys.max()]


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
    # Low-res 64² of a 256² window (16 px per low-res px). Radii 6 and 9 low-res px give
    # ~113 and ~254 low-res px, i.e. ~1810 and ~4070 tile px; the range [1000, 3800] keeps
    # the first, and the second passes the low-res filter only through its 10 % slack.
    logits = torch.stack([disc_logits(6.0, centre=(16, 16)), disc_logits(9.0, centre=(44, 44))])
    rules = LowResFilter(0.0, 0.0, 0.0, 1.0, min_area_px=1000, max_area_px=3800)
    assert filter_lowres(logits, torch.ones(2), 16.0, rules).tolist() == [True, True]
    window = Window(0, 0, 256, 256, 256)
    masks = WindowMasks.measure(logits, torch.tensor([0.7, 0.8]), window, (256, 256), rules)
    found = paint_masks(masks, (256, 256), rules, containment=0.5)
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


class DiscDecoder:
    """A stand-in for SAM2's decoder over hand-made cells: discs ``(x, y, radius)``, tile px.

    A point prompt gets SAM2-like multimask output: the smallest disc holding the point (a
    nucleus, say), the largest, and the next-largest, as sharp signed-distance logits on the
    window's low-res grid, with fixed predicted IoUs per disc. Everything after the decoder is
    the real segmenter: windows, filters, NMS, containment, painter.
    """

    def __init__(self, discs: list[tuple[float, float, float]], ious: list[float], size: int):
        self.discs, self.ious = torch.tensor(discs, dtype=torch.float32), torch.tensor(ious)
        self.device = torch.device("cpu")
        self.timer = StageTimer(self.device)
        self.image_size = size
        self.decoded_points = 0

    def encode(self, tiles, windows):
        return [[WindowFeatures(None, [], window) for window in ws] for ws in windows]

    def prompts(self, window, points=None, boxes=None):
        return points, points  # the points stand for their own embeddings

    def decode(self, features, prompts, multimask=True):
        points, window = prompts[0], features.window
        low = self.image_size // 4
        step = window.side / low
        centres = (torch.arange(low) + 0.5) * step - 0.5
        x, y, r = (self.discs[:, i, None, None] for i in range(3))
        gy, gx = centres[:, None] + window.y, centres[None, :] + window.x
        logits = (r - torch.sqrt((gx - x) ** 2 + (gy - y) ** 2)) / step * 32  # (D, low, low)
        inside = torch.cdist(points.float(), self.discs[:, :2]) < self.discs[:, 2]  # (N, D)
        order = torch.argsort(self.discs[:, 2])  # small to large
        out = torch.full((len(points), 3, low, low), -20.0)
        iou = torch.zeros((len(points), 3))
        self.decoded_points += len(points)
        for n in range(len(points)):
            holding = order[inside[n, order]]
            for slot, d in enumerate([holding[:1], holding[-1:], holding[-2:-1]]):
                if len(d):
                    out[n, slot], iou[n, slot] = logits[d[0]], self.ious[d[0]]
        return out, iou


def disc_segmenter(discs, ious, size=512, **settings) -> Sam2MKSegmenter:
    defaults = dict(points_per_side=32, min_area_um2=100.0, max_area_um2=3000.0)
    return Sam2MKSegmenter(DiscDecoder(discs, ious, size), MKSettings(**{**defaults, **settings}))


def test_one_mk_per_cell_nested_masks_suppressed_touching_kept() -> None:
    # Pixel 0.25 µm: a 962 µm² cell (r 70 px) with a 240 µm² nucleus mask (r 35) that SAM2
    # rates higher, a 491 µm² cell (r 50) touching it (4 px overlap), and a lone cell.
    pixel_um = 0.25
    cell, nucleus, touching, lone = (180, 250, 70), (185, 245, 35), (296, 250, 50), (400, 420, 45)
    segmenter = disc_segmenter([cell, nucleus, touching, lone], [0.8, 0.95, 0.85, 0.9])
    tile = np.zeros((512, 512, 3), np.uint8)
    (found,) = segmenter.segment([tile], pixel_um)
    assert found.count == 3  # the nucleus is not a second MK
    yy, xx = np.mgrid[:512, :512]

    def disc(c):
        return (xx - c[0]) ** 2 + (yy - c[1]) ** 2 < c[2] ** 2

    areas = np.bincount(found.labels.ravel())[1:]
    label_at = {name: found.labels[c[1], c[0]] for name, c in (("cell", cell), ("touch", touching))}
    assert found.labels[nucleus[1], nucleus[0]] == label_at["cell"]  # the whole cell kept
    # Whole cells, less only the few pixels the higher-scored touching neighbour takes.
    assert areas[label_at["cell"] - 1] == pytest.approx(disc(cell).sum(), rel=0.02)
    assert areas[label_at["touch"] - 1] == pytest.approx(disc(touching).sum(), rel=0.01)
    # Without containment suppression (threshold above 1 is impossible: use the painter alone)
    # the nucleus splits the cell in two MKs sharing a centroid, as the old code did.
    split = disc_segmenter([cell, nucleus, touching, lone], [0.8, 0.95, 0.85, 0.9])
    object.__setattr__(split.settings, "containment_thresh", 1.0 + 1e-6)
    assert split.segment([tile], pixel_um)[0].count == 4


def test_cells_seen_by_several_windows_count_once() -> None:
    # A 512 x 900 tile in three 512 px windows (starts 0, 194, 388): one cell inside two
    # windows (a copy in each), one cut by the first window's edge and whole in the others.
    twice, edges, pixel_um = (300, 250, 60), (480, 250, 60), 0.25
    segmenter = disc_segmenter([twice, edges], [0.9, 0.8], size=512, max_downsample=1.0)
    tile = np.zeros((512, 900, 3), np.uint8)
    windows = segmenter.windows(tile.shape[:2], pixel_um)
    assert [w.x for w in windows] == [0, 194, 388]
    (found,) = segmenter.segment([tile], pixel_um)
    assert found.count == 2
    yy, xx = np.mgrid[:512, :900]
    for x, y, r in (twice, edges):
        disc = (xx - x) ** 2 + (yy - y) ** 2 < r**2
        label = found.labels[y, x]
        assert (
            label > 0
            and abs(int((found.labels == label).sum()) - int(disc.sum())) < 0.01 * disc.sum()
        )


def test_nested_in_larger_judges_pairs_by_shared_share() -> None:
    # On a 10-px-wide tile: 0 = rows 0-9 (100 px); 1 = 40 px of which 30 inside 0; 2 = 40 px
    # of which 5 inside 0 and 15 inside 1; 3 = an exact copy of 0 with a lower score; 4 = far away.
    big = torch.arange(100)
    inside = torch.arange(70, 110)
    edge = torch.arange(95, 135)
    far = torch.arange(500, 520)
    flat = torch.cat([big, inside, edge, big, far])
    owner = torch.repeat_interleave(torch.arange(5), torch.tensor([100, 40, 40, 100, 20]))
    boxes = torch.tensor([[0, 0, 9, 9], [0, 7, 9, 10], [0, 9, 9, 13], [0, 0, 9, 9], [0, 50, 9, 51]])
    scores = torch.tensor([0.9, 0.95, 0.5, 0.8, 0.1])
    nested = nested_in_larger(flat, owner, boxes, 10, scores, 0.5)
    assert nested.tolist() == [False, True, False, True, False]
    strict = nested_in_larger(flat, owner, boxes, 10, scores, 0.8)
    assert strict.tolist() == [False, False, False, True, False]
    dense = pair_intersections(flat, owner, boxes, 10)
    sparse = pair_intersections(flat, owner, boxes, 10, budget=1)  # the long-chain path
    assert [t.tolist() for t in dense] == [t.tolist() for t in sparse]
    i, j, shared = (t.tolist() for t in dense)
    assert dict(zip(zip(i, j, strict=True), shared, strict=True)) == {
        **{(0, 1): 30, (0, 2): 5, (1, 2): 15, (0, 3): 100, (1, 3): 30, (2, 3): 5},
        **{(1, 0): 30, (2, 0): 5, (2, 1): 15, (3, 0): 100, (3, 1): 30, (3, 2): 5},
    }


def test_windows_overlap_by_the_largest_mk_and_cover_the_tile() -> None:
    # The production read window (3000 + 2 x 308 px) at SAM2's 1024 px input, 2x at most.
    overlap = window_overlap_px(2000.0, 0.1725)
    windows = tile_windows((3616, 3616), 2048, overlap)
    assert len(windows) == 4 and all(w.side == 2048 == w.width == w.height for w in windows)
    assert windows[1].x == 3616 - 2048 and 2 * 2048 - 3616 >= overlap > 293 + 2 * 20
    # An edge tile: never stretched, padded to the square window.
    (*_, last) = edge = tile_windows((408, 3616), 2048, overlap)
    assert len(edge) == 2 and (last.height, last.width, last.side) == (408, 2048, 2048)


def test_edge_windows_are_padded_not_stretched() -> None:
    from types import SimpleNamespace

    engine = Sam2Engine(SimpleNamespace(image_size=64), torch.device("cpu"), None)
    tile = np.random.default_rng(0).integers(0, 256, (40, 128, 3), dtype=np.uint8)
    (window,) = tile_windows(tile.shape[:2], 128, 0)
    image = engine.window_input(tile, window)[0]  # 128 px square -> 64 px: 2x
    mean = torch.tensor(SAM2_MEAN).view(3, 1, 1)
    std = torch.tensor(SAM2_STD).view(3, 1, 1)
    pad = (torch.tensor(PAD_RGB).view(3, 1, 1) / 255 - mean) / std
    assert torch.allclose(image[:, 21:], pad.expand(3, 43, 64), atol=1e-6)  # padding
    expected = F.interpolate(
        torch.from_numpy(tile).permute(2, 0, 1)[None].float() / 255,
        size=(20, 64),
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )[0]
    assert torch.allclose(image[:, 2:18], ((expected - mean) / std)[:, 2:18], atol=0.02)


def test_default_prompts_reach_every_smallest_mk() -> None:
    # Discs of the smallest MK area anywhere in the production read window hold a prompt.
    settings, pixel_um, tile_hw = MKSettings(), 0.1725, (3616, 3616)
    points = torch.cat(
        [
            window_points(w, n, torch.device("cpu"))
            for w, n in mk_prompts(tile_hw, settings, pixel_um, 1024)
        ]
    )
    radius = np.sqrt(settings.min_area_um2 / np.pi) / pixel_um
    centres = torch.from_numpy(np.random.default_rng(0).uniform(radius, 3616 - radius, (5000, 2)))
    nearest = torch.cdist(centres, points.double()).min(dim=1).values
    assert bool((nearest < radius).all())
    # The old single 32 x 32 grid over the tile left about half of them without one.
    old = torch.cdist(centres, torch.from_numpy(build_grid(32)) * 3616).min(dim=1).values
    assert 0.4 < float((old < radius).double().mean()) < 0.7


def build_grid(n: int) -> np.ndarray:
    from sam2.utils.amg import build_point_grid

    return build_point_grid(n)


@pytest.mark.parametrize(("count", "most", "sizes"), [(1296, 768, [648, 648]), (10, 4, [3, 4, 3])])
def test_window_points_decode_in_even_batches(models, count, most, sizes, monkeypatch) -> None:
    """A window's points reach the decoder in as few calls as ``points_per_batch`` allows, all
    of one size (± 1), every point once, in order."""
    import dataclasses

    segmenter = Sam2MKSegmenter(
        models.mk.engine, dataclasses.replace(models.mk.settings, points_per_batch=most)
    )
    points = torch.arange(2 * count, dtype=torch.float32).view(count, 2)
    monkeypatch.setattr("bmseg.models.sam2_models.window_points", lambda *args: points)
    monkeypatch.setattr(segmenter.engine, "prompts", lambda window, points: (points, points))
    seen = []

    def decode(features, prompts):
        seen.append(prompts[0])
        return torch.zeros((len(prompts[0]), 3, 4, 4)), torch.zeros((len(prompts[0]), 3))

    monkeypatch.setattr(segmenter.engine, "decode", decode)
    window = WindowFeatures(None, [], Window(0, 0, 16, 16, 16))
    segmenter._candidates(window, 0, segmenter._rules(PIXEL_UM))
    assert [len(batch) for batch in seen] == sizes
    assert torch.equal(torch.cat(seen), points)


def test_a_window_without_points_decodes_nothing() -> None:
    """An edge window narrower than half a grid step holds no point: no decoder call."""
    from bmseg.models.sam2_models import even_batches

    assert even_batches(0, 768) == []
    assert even_batches(5, 768) == [slice(0, 5)]


def test_window_prompts_are_embedded_once_for_every_tile(models, monkeypatch) -> None:
    """A window's point grid embeds the same for every tile: the second tile of a run reuses
    the first's embeddings, and its candidates are those of a segmenter embedding afresh."""
    import dataclasses

    engine = models.mk.engine
    calls = []
    real = engine.prompts
    monkeypatch.setattr(engine, "prompts", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    settings = dataclasses.replace(models.mk.settings, min_area_um2=0.0, max_area_um2=1e6)
    reusing = Sam2MKSegmenter(engine, settings)
    tiles = [random_tile(256, 3), random_tile(256, 4)]
    reusing.segment(tiles[:1], PIXEL_UM)
    reusing.segment(tiles[1:], PIXEL_UM)
    windows = reusing.windows((256, 256), PIXEL_UM)
    assert calls == windows  # once per window, not per tile
    features = engine.encode(tiles[1:], [windows])[0]
    rules = reusing._rules(PIXEL_UM)
    for window_features in features:
        kept = reusing._candidates(window_features, 4, rules)
        fresh = Sam2MKSegmenter(engine, settings)._candidates(window_features, 4, rules)
        assert len(kept[1]) > 0  # no area filter: random weights' candidates pass
        for ours, theirs in zip(kept, fresh, strict=True):
            assert torch.equal(ours, theirs)


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
    fine = torch.ones(3, dtype=torch.bool)
    chosen, agree = choose_refined(refined, original, 0.5, fine)
    assert agree.tolist() == [True, False, True]
    assert torch.equal(chosen[0], refined[0]) and torch.equal(chosen[1], original[1])
    assert choose_refined(refined, original, 0.85, fine)[1].tolist() == [True, False, False]
    coarse = torch.tensor([True, True, False])
    assert choose_refined(refined, original, 0.5, coarse)[1].tolist() == [True, False, False]


def boundary_error_px(mask: np.ndarray, truth: np.ndarray) -> float:
    """Mean distance (px) from the boundary pixels of ``mask`` to those of ``truth``."""
    from scipy import ndimage

    edge_truth = truth ^ ndimage.binary_erosion(truth)
    edge_mask = mask ^ ndimage.binary_erosion(mask)
    return float(ndimage.distance_transform_edt(~edge_truth)[edge_mask].mean())


def test_refinement_never_coarser_on_cells_of_known_outline() -> None:
    # Synthetic HSPCs (bmseg.synth's, 6.3-9.7 µm at 0.1725 µm/px) whose rasterised outline is
    # the truth and Cellpose's mask. SAM2's best possible refinement at p px per decoder pixel:
    # the truth area-averaged onto the decoder grid, upsampled bilinearly (SAM2's own way).
    # p = 14.1: a 3616 px tile seen whole (the old refinement); 8: 2x windows; 4: native ones.
    import cv2

    from bmseg.synth import cell_mask, make_hspc

    rng = np.random.default_rng(0)
    field = 400
    for _ in range(12):
        cell = make_hspc(200.0 + rng.uniform(), 200.0 + rng.uniform(), rng)
        x0, y0, x1, y1 = cell.box
        truth = np.zeros((field, field), bool)
        truth[y0:y1, x0:x1] = cell_mask(cell)
        original = torch.from_numpy(truth)[None]
        for px_per_logit in (2.0, 4.0, 8.0, field / 28):
            side = round(field / px_per_logit)
            occupancy = cv2.resize(
                truth.astype(np.float32), (side, side), interpolation=cv2.INTER_AREA
            )
            logits = torch.from_numpy(occupancy - 0.5)[None]
            box = torch.tensor([[0, 0, field, field]])
            refined = upsample_in_boxes(logits, box, (field, field), 0.0)
            fine = fine_enough(
                original.sum(dim=(1, 2)), px_per_logit, HSPCSettings().refine_min_logits_across
            )
            chosen, replaced = choose_refined(refined, original, 0.5, fine)
            error = boundary_error_px(chosen[0].numpy(), truth)
            assert error <= 0.35, (px_per_logit, error)  # never coarser than a pixel's half
            assert bool(replaced[0]) == (px_per_logit <= 4.0)
            if px_per_logit > 8:
                assert boundary_error_px(refined[0].numpy(), truth) > error  # what was undone


def test_hspc_area_filter_and_fallback_to_cellpose(models) -> None:
    tile = random_tile(256, 3)
    features = models.hspc.engine.encode([tile], [models.hspc.windows((256, 256), PIXEL_UM)])[0]
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
        HSPCSettings(min_area_um2=20.0, max_area_um2=100.0, refine=True, refine_iou_thresh=1.0),
        models.device,
    )
    found = strict.refine(cellpose_labels, cellprob, features, PIXEL_UM)
    assert found.count == 2
    kept = np.isin(cellpose_labels, [1, 4])
    assert np.array_equal(found.labels > 0, kept)
    assert found.scores == pytest.approx([1 / (1 + np.exp(-3.0))] * 2, rel=1e-5)


def test_unrefined_hspcs_are_cellposes_cells_painted_by_score(models) -> None:
    """Without refinement the HSPCs are Cellpose's cells in the area range, numbered as the
    painter numbers overlapping masks (score descending), in a fixed handful of operators
    however many cells there are."""
    from scipy import ndimage

    from bmseg.models.cellpose_models import CellposeHSPCSegmenter

    rng = np.random.default_rng(8)
    labels, _ = ndimage.label(ndimage.gaussian_filter(rng.random((300, 300)), 2) > 0.52)
    labels = labels.astype(np.int32)
    count = int(labels.max())
    cellprob = rng.uniform(-2.0, 3.0, count + 1)[labels].astype(np.float32)
    settings = HSPCSettings(min_area_um2=5.0, max_area_um2=30.0)  # 20-120 px at 0.5 µm
    segmenter = CellposeHSPCSegmenter(None, None, settings, torch.device("cpu"))
    with OperatorCount() as ops:
        found = segmenter.refine(torch.from_numpy(labels), torch.from_numpy(cellprob), None, 0.5)
    # The painter, fed every cell in range as a mask of its own:
    area = np.bincount(labels.ravel())[1:]
    ids = np.flatnonzero((area >= 0.5 * 5.0 / 0.25) & (area <= 30.0 / 0.25)) + 1
    assert 20 < len(ids) < count  # some cells fall out of range
    scores = torch.sigmoid(torch.tensor([cellprob[labels == i][0] for i in ids]))
    boxes = label_boxes(torch.from_numpy(labels), count)[torch.from_numpy(ids - 1)]
    painter = Painter((300, 300), torch.device("cpu"))
    priority = score_priority(scores)
    for i, (x0, y0, x1, y1), p in zip(ids, boxes.tolist(), priority, strict=True):
        ys, xs = np.nonzero(labels[y0:y1, x0:x1] == i)
        painter.add_pixels(torch.from_numpy((ys + y0) * 300 + xs + x0), p.expand(len(ys)))
    expected = painter.detections(scores, priority, 0.0)
    assert found.fill_holes and np.array_equal(found.labels, expected.labels)
    np.testing.assert_allclose(found.scores, expected.scores, rtol=1e-5)  # float32 means
    assert ops.count <= 40, ops.count  # 37; 149 when the cells were painted


@pytest.mark.parametrize("refine", [False, True])
def test_hspc_segmentation_runs_cellpose_and_sam2(models, refine: bool) -> None:
    segmenter = type(models.hspc)(
        models.hspc.cellpose,
        models.hspc.engine,
        HSPCSettings(min_area_um2=20.0, max_area_um2=100.0, refine=refine),
        models.device,
    )
    found = segmenter.segment([random_tile(300, 4)], PIXEL_UM)  # refine: 2 x 2 windows
    assert len(found) == 1 and found[0].labels.shape == (300, 300)
    # Holes unfilled: down to half the minimum here; SEGMENT's workers fill and filter.
    areas = np.bincount(found[0].labels.ravel())[1:] * PIXEL_UM**2
    assert len(areas) == found[0].count and ((areas >= 10.0) & (areas <= 100.0)).all()
    assert found[0].fill_holes
    if refine:
        assert len(segmenter.windows((300, 300), PIXEL_UM)) == 4


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


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
@pytest.mark.parametrize("labels", [(1,), (2, 3)], ids=["point", "box"])
def test_prompt_tokens_equal_sam2s_prompt_encoder(
    models, labels: tuple[int, ...], autocast: bool
) -> None:
    """SEGMENT's prompt embedding (a few operators) gives what SAM2's own ``PromptEncoder``
    gives for the same prompts: one positive point, or a box's two corners, padded; also
    under the bf16 autocast SEGMENT runs SAM2 in on capable GPUs (here on the CPU)."""
    from bmseg.models.sam2_prompts import PromptTokens

    encoder = models.mk.engine.model.sam_prompt_encoder
    side = encoder.input_image_size[0]
    coords = torch.from_numpy(np.random.default_rng(3).uniform(0, side, (9, len(labels), 2)))
    stock_labels = torch.tensor([labels] * 9, dtype=torch.int)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        stock_sparse, stock_dense = encoder(
            points=(coords.float(), stock_labels), boxes=None, masks=None
        )
        sparse, dense = PromptTokens(encoder)(coords.float(), labels)
    assert sparse.dtype == stock_sparse.dtype
    assert sparse.shape == stock_sparse.shape == (9, len(labels) + 1, encoder.embed_dim)
    torch.testing.assert_close(sparse, stock_sparse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense, stock_dense, rtol=0, atol=0)


def test_hspc_area_rules_see_the_cells_as_filled(models) -> None:
    """SEGMENT fills Cellpose's holes on its CPU workers, after the HSPC segmenter's area
    filter: a cell whose filled area meets the minimum is kept, whole, even though its
    pixels without the hole fall short of it (holes only grow a cell; SEGMENT's own area
    filter on the workers has the last word)."""
    from bmseg.segment.cells import checked, filter_area

    segmenter = type(models.hspc)(
        models.hspc.cellpose,
        models.hspc.engine,
        HSPCSettings(min_area_um2=20.0, max_area_um2=100.0, refine=False),
        models.device,
    )
    labels = np.zeros((64, 64), np.int32)
    labels[10:19, 10:19] = 1  # 81 px = 20.25 µm² filled
    labels[14, 14] = 0  # a one-pixel hole: 80 px = 20 µm² ...
    labels[13, 13] = 0  # ... two: 79 px, under the minimum until filled
    labels[40:50, 40:50] = 2  # 100 px = 25 µm², no hole
    cellprob = np.where(labels > 0, 3.0, -3.0).astype(np.float32)

    found = checked(segmenter.refine(labels, cellprob, None, PIXEL_UM), (64, 64), "hspc")
    kept = filter_area(found, PIXEL_UM, 20.0, 100.0)

    assert kept.count == 2
    assert sorted(np.bincount(kept.labels.ravel())[1:]) == [81, 100]
