"""Writing model files: tiny random-initialised test checkpoints, the demo model trained here on
synthetic slides, and fetching the real ones."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from cellpose.models import _MODEL_URL
from cellpose.vit import CPSAM
from sam2.build_sam import build_sam2
from torchvision.models import ResNet50_Weights, resnet50

from bmseg.contract import MODALITIES
from bmseg.errors import BmsegError
from bmseg.models.cellpose_models import sam_encoder_as
from bmseg.models.layout import SAM2_URL, Manifest, write_manifest
from bmseg.models.loading import load_cellpose
from bmseg.models.training import (
    Region,
    TrainSettings,
    crops_around,
    train_cellpose,
    validation_ap50,
)
from bmseg.pixels import to_rgb8
from bmseg.slide import Rect
from bmseg.storage import atomic_path
from bmseg.synthetic import MOSAIC_TILE, PIXEL_SIZE_UM, SyntheticLayout, truth_labels

log = logging.getLogger(__name__)

TEST_MANIFEST = Manifest(
    sam2_checkpoint="sam2.1_hiera_tiny_random.pt",
    sam2_config="configs/sam2.1/sam2.1_hiera_t.yaml",
    sam2_image_size=256,
    cellpose_checkpoint="cpsam_tiny_random",
    resnet50_weights="resnet50_random.pth",
    random_init=True,
)
"""SAM2.1 hiera-tiny (run at 256 px input instead of 1024), a narrow Cellpose-SAM and a full
ResNet-50, all with random weights."""

FULL_SIZE_MANIFEST = Manifest(
    sam2_checkpoint="sam2.1_hiera_large_random.pt",
    cellpose_checkpoint="cpsam_random",
    resnet50_weights="resnet50_random.pth",
    random_init=True,
)
"""The production architectures (SAM2.1 hiera-large, Cellpose-SAM ViT-L, ResNet-50) with random
weights: what the benchmark runs when no real weights are at hand (same cost, no meaning)."""

TEST_CELLPOSE_ENCODER = {"width": 64, "depth": 2, "heads": 2, "global_blocks": [1]}
"""The test Cellpose-SAM: Cellpose's CPSAM network (SAM ViT encoder with 8 px tokens, global
attention, the flow readout) but 64 wide and 2 blocks deep instead of ViT-L's 1024 × 24, so a
test builds and runs it in about a second instead of 1.2 GB of weights."""

CELLPOSE_URL_NAME = "cpsam"


def make_test_models(dest: Path, seed: int = 0, full_size: bool = False) -> Manifest:
    """Write random-initialised checkpoints in the official file formats, plus the manifest.

    ``full_size`` writes the production architectures (about 2.3 GB) instead of the tiny ones.
    """

    torch.manual_seed(seed)
    manifest = FULL_SIZE_MANIFEST if full_size else TEST_MANIFEST
    dest.mkdir(parents=True, exist_ok=True)
    _write_sam2(manifest, dest)
    cellpose_net = CPSAM() if full_size else test_cellpose_net(TEST_CELLPOSE_ENCODER)
    with atomic_path(dest / manifest.cellpose_checkpoint) as tmp:
        cellpose_net.save_model(tmp)
    del cellpose_net
    _write_resnet50(manifest, dest)
    write_manifest(manifest, dest)
    log.info("wrote random-initialised checkpoints (%s) to %s", manifest.sam2_config, dest)
    return manifest


def test_cellpose_net(encoder: dict) -> torch.nn.Module:
    """Cellpose's own ``CPSAM`` network with a SAM ViT encoder of these dimensions."""

    with sam_encoder_as(**encoder):
        return CPSAM()


def _write_sam2(manifest: Manifest, dest: Path) -> None:
    """SAM2 of the manifest's config, random weights, in SAM2's checkpoint format."""

    sam2 = build_sam2(manifest.sam2_config, None, device="cpu")
    with atomic_path(dest / manifest.sam2_checkpoint) as tmp:
        torch.save({"model": sam2.state_dict()}, tmp)


def _write_resnet50(manifest: Manifest, dest: Path) -> None:
    """torchvision's ResNet-50, random weights, as a state dict."""

    with atomic_path(dest / manifest.resnet50_weights) as tmp:
        torch.save(resnet50(weights=None).state_dict(), tmp)


def fetch_plan() -> dict[str, str]:
    """``{file name: URL}`` of the official weights, URLs taken from the libraries' sources."""

    manifest = Manifest()
    return {
        manifest.sam2_checkpoint: SAM2_URL,
        manifest.cellpose_checkpoint: _MODEL_URL + CELLPOSE_URL_NAME,
        manifest.resnet50_weights: ResNet50_Weights.IMAGENET1K_V2.url,
    }


def fetch_models(dest: Path) -> Manifest:
    """Download the official weights into ``dest`` (temporary names, renamed when complete)."""
    dest.mkdir(parents=True, exist_ok=True)
    for file_name, url in fetch_plan().items():
        target = dest / file_name
        if target.is_file():
            log.info("%s: present, not downloaded again", target)
            continue
        log.info("downloading %s → %s", url, target)
        with atomic_path(target) as tmp:
            torch.hub.download_url_to_file(url, str(tmp), progress=True)
    manifest = Manifest()
    write_manifest(manifest, dest)
    return manifest


# ------------------------------------------------------------------------------ demo model

DEMO_CELLPOSE_ENCODER = TEST_CELLPOSE_ENCODER
"""The demo Cellpose-SAM has the test architecture: small enough to train on a CPU."""

PATCH_EMBED_GAIN = 3.0
"""Norm of each row of the demo's orthonormal patch embedding (inputs are 0–1 normalised)."""


def demo_cellpose_net(encoder: dict) -> torch.nn.Module:
    """The test Cellpose-SAM initialised to be trained from scratch (draws from torch's RNG).

    Two of CPSAM's initial values only make sense under pretrained SAM weights:

    * the patch embedding: CPSAM's forward reads it through ``.data``, so training never
      changes it, and SAM's default initialisation, subsampled from 16 to 8 px, leaves a tiny
      random projection that loses most of a patch. An orthonormal one keeps it.
    * the position embedding: SAM starts it at zeros, so the tokens of a network trained from
      scratch know no position, and the flows (pointing at each cell's centre) learn slowly.
      A 2-D sine-cosine embedding (trainable, as SAM's) gives every token its place.

    Measured (docs/benchmarks.md "Demo model"): with SAM's initial values the demo network
    collapses to all-background or over-splits cells; with these it segments.
    """
    net = test_cellpose_net(encoder)
    proj = net.encoder.patch_embed.proj
    rows = torch.empty(proj.weight.shape[0], proj.weight[0].numel())
    torch.nn.init.orthogonal_(rows)
    proj.weight.data = (PATCH_EMBED_GAIN * rows).reshape(proj.weight.shape).contiguous()
    net.encoder.pos_embed.data = sincos_position_embedding(*net.encoder.pos_embed.shape[1:])
    net.rdrop = 0.0  # two blocks only: no random skipping of one in training (CPSAM: 0.4)
    return net


def sincos_position_embedding(rows: int, columns: int, width: int) -> torch.Tensor:
    """(1, rows, columns, width) 2-D sine-cosine position embedding: a quarter of the width
    each for sin / cos of the row and of the column, at geometric frequencies (as in MAE)."""
    quarter = width // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    row_angles = torch.arange(rows, dtype=torch.float32)[:, None, None] * frequencies
    column_angles = torch.arange(columns, dtype=torch.float32)[None, :, None] * frequencies
    size = (rows, columns, quarter)
    parts = [torch.sin(row_angles), torch.cos(row_angles)]
    parts += [torch.sin(column_angles), torch.cos(column_angles)]
    embedding = torch.cat([p.expand(size) for p in parts], dim=-1)
    padding = torch.zeros(rows, columns, width - 4 * quarter)
    return torch.cat([embedding, padding], dim=-1)[None].contiguous()


DEMO_TRAINING = TrainSettings(
    epochs=200, images_per_epoch=20, batch_size=2, learning_rate=1e-3, contrast_share=0.5
)
"""4 000 crops seen in 200 of Cellpose's epochs of 10 steps each: warm-up, 140 epochs held at
1e-3, halving over the last 50 (at 100 epochs, held for 40 only, validation AP@0.5 was 0.17).
Small batches: at batch 6 the same crops left the network at all-background. Half the crops
at a random contrast window, so whole tiles with much background are segmented too."""

DEMO_SLIDE_PX = 4000
"""Side of the synthetic layouts the demo trains and validates on (``bmseg synth``'s default)."""
DEMO_TRAIN_LAYOUTS = 2
"""Synthetic layouts per modality trained on; one more per modality is held out."""

DEMO_DESCRIPTION = (
    "DEMO weights: a small Cellpose-SAM trained here on synthetic slides (bmseg synth, "
    "brightfield and fluorescence) to segment their HSPC-like discs, with random-initialised "
    "SAM2 and ResNet-50. It finds most of them (validation AP@0.5 is in the training "
    "record), and it does NOT segment real bone marrow (use `bmseg models fetch` for the "
    "real weights)."
)

DEMO_MANIFEST = Manifest(
    sam2_checkpoint=TEST_MANIFEST.sam2_checkpoint,
    sam2_config=TEST_MANIFEST.sam2_config,
    sam2_image_size=TEST_MANIFEST.sam2_image_size,
    cellpose_checkpoint="cpsam_demo_synthetic",
    resnet50_weights=TEST_MANIFEST.resnet50_weights,
    random_init=True,
    description=DEMO_DESCRIPTION,
)


def demo_layout_seeds(seed: int) -> dict[str, tuple[list[int], int]]:
    """``{modality: (training layout seeds, held-out layout seed)}``, distinct, from ``seed``."""

    seeds = {}
    for index, modality in enumerate(MODALITIES):
        first = 1000 * seed + 10 * index + 1
        seeds[modality] = (list(range(first, first + DEMO_TRAIN_LAYOUTS)), first + 9)
    return seeds


def synthetic_regions(layout_seed: int, modality: str, side: int = DEMO_SLIDE_PX) -> list[Region]:
    """The mosaic tiles of a synthetic layout that hold a cell, as SEGMENT sees them (RGB by
    :func:`bmseg.pixels.to_rgb8`), with the planted HSPCs' masks. Crops centre on every HSPC
    and MK (so the network learns that an MK is no HSPC) and on as many random points of the
    tile (background, tissue, their edges: what a tile shows away from cells)."""

    layout = SyntheticLayout(side, side, layout_seed, modality)
    rng = np.random.default_rng(layout_seed)
    centroids = np.array([cell.outline.mean(axis=0) for cell in layout.cells]).reshape(-1, 2)
    regions = []
    for y in range(0, side, MOSAIC_TILE):
        for x in range(0, side, MOSAIC_TILE):
            rect = Rect(x, y, min(MOSAIC_TILE, side - x), min(MOSAIC_TILE, side - y))
            inside = (
                (centroids[:, 0] >= rect.x)
                & (centroids[:, 0] < rect.right)
                & (centroids[:, 1] >= rect.y)
                & (centroids[:, 1] < rect.bottom)
            )
            if not inside.any():
                continue
            random_points = rng.uniform((0, 0), (rect.w, rect.h), size=(int(inside.sum()), 2))
            centres = np.concatenate([centroids[inside] - (x, y), random_points])
            labels = truth_labels(layout, rect, "HSPC")
            rgb = to_rgb8(layout.render(rect), modality)
            regions.append(Region(rgb, labels, centres))
    return regions


def make_demo_models(
    dest: Path, seed: int = 0, settings: TrainSettings = DEMO_TRAINING, progress: bool = True
) -> Manifest:
    """Write the demo models folder: make-test's SAM2 and ResNet-50, and a small Cellpose-SAM
    trained by ``cellpose.train`` on the HSPC masks of synthetic slides of both modalities.

    Everything derives from ``seed`` (weights, layouts, crops, training order). The folder is
    built under a temporary name beside ``dest`` and renamed when complete.
    """

    if dest.exists() and any(dest.iterdir()):
        raise BmsegError(f"--dest {dest}: exists and is not empty; pass a new folder")
    started = time.perf_counter()
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp", dir=dest.parent))
    try:
        torch.manual_seed(seed)
        manifest = DEMO_MANIFEST
        _write_sam2(manifest, work)
        _write_resnet50(manifest, work)
        net = demo_cellpose_net(DEMO_CELLPOSE_ENCODER)
        rng = np.random.default_rng(seed)
        train_regions, val_regions = [], []
        layouts = demo_layout_seeds(seed)
        for modality, (train_seeds, val_seed) in layouts.items():
            for layout_seed in train_seeds:
                train_regions += synthetic_regions(layout_seed, modality)
            val_regions += synthetic_regions(val_seed, modality)
        images, targets = crops_around(train_regions, settings.crop_px, rng)
        log.info(
            "demo: %d training crops from %d synthetic tiles, %d held-out tiles",
            len(images),
            len(train_regions),
            len(val_regions),
        )
        record = train_cellpose(
            net, images, targets, settings, work / manifest.cellpose_checkpoint, progress
        )
        model = load_cellpose(work / manifest.cellpose_checkpoint, torch.device("cpu"))
        ap50 = validation_ap50(model, val_regions, PIXEL_SIZE_UM)
        cells = int(sum(len(np.unique(r.labels)) - 1 for r in val_regions))
        log.info("demo: validation AP@0.5 %.3f on %d held-out HSPCs", ap50, cells)
        training = {
            "kind": "demo",
            "parent": "random initialisation",
            "encoder": DEMO_CELLPOSE_ENCODER,
            "initialisation": "orthonormal patch embedding, sine-cosine position embedding, "
            "no layer drop (demo_cellpose_net)",
            "data": {
                "synthetic_layouts": {
                    m: {"train": t, "validation": v} for m, (t, v) in layouts.items()
                },
                "slide_px": DEMO_SLIDE_PX,
                "training_tiles": len(train_regions),
                "validation_tiles": len(val_regions),
                "validation_hspcs": cells,
            },
            "settings": settings.as_dict(),
            "seed": seed,
            **record,
            "validation_ap50": round(ap50, 4),
            "total_seconds": round(time.perf_counter() - started, 1),
        }
        manifest = dataclasses.replace(manifest, training=training)
        write_manifest(manifest, work)
        if dest.exists():
            dest.rmdir()  # empty, checked above
        work.replace(dest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest
