"""Writing model files: tiny random-initialised test checkpoints, and fetching the real ones."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from bmseg.models.layout import SAM2_URL, Manifest, write_manifest
from bmseg.storage import atomic_path

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
    from cellpose.vit import CPSAM
    from sam2.build_sam import build_sam2
    from torchvision.models import resnet50

    from bmseg.models.cellpose_models import sam_encoder_as

    torch.manual_seed(seed)
    manifest = FULL_SIZE_MANIFEST if full_size else TEST_MANIFEST
    dest.mkdir(parents=True, exist_ok=True)
    sam2 = build_sam2(manifest.sam2_config, None, device="cpu")
    with atomic_path(dest / manifest.sam2_checkpoint) as tmp:
        torch.save({"model": sam2.state_dict()}, tmp)
    del sam2

    if full_size:
        cellpose_net = CPSAM()
    else:
        with sam_encoder_as(**TEST_CELLPOSE_ENCODER):
            cellpose_net = CPSAM()
    with atomic_path(dest / manifest.cellpose_checkpoint) as tmp:
        cellpose_net.save_model(tmp)
    del cellpose_net

    with atomic_path(dest / manifest.resnet50_weights) as tmp:
        torch.save(resnet50(weights=None).state_dict(), tmp)
    write_manifest(manifest, dest)
    log.info("wrote random-initialised checkpoints (%s) to %s", manifest.sam2_config, dest)
    return manifest


def fetch_plan() -> dict[str, str]:
    """``{file name: URL}`` of the official weights, URLs taken from the libraries' sources."""
    from cellpose.models import _MODEL_URL
    from torchvision.models import ResNet50_Weights

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
