"""Instant stand-ins for SEGMENT's networks, for ``benchmarks/segment.py --host-only``: the
real segmenters and embedder run with each network replaced by a module that returns tensors
of the right shape at once (Cellpose-SAM: the blocks of the planted cells' flows)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch

SAM2_IMAGE_SIZE = 1024
"""SAM2's production input side (make-test's tiny SAM2 is built at 256 by default)."""


class Zeros:
    """Zeros of a shape (one zero expanded: nothing is computed or written), made once per
    shape, so that a stand-in asks torch for no operator at all: a network's own launches are
    not the host work ``--host-only`` measures."""

    def __init__(self) -> None:
        self._made: dict[tuple, torch.Tensor] = {}

    def __call__(self, like: torch.Tensor, *shape: int) -> torch.Tensor:
        key = (like.dtype, like.device, shape)
        if key not in self._made:
            self._made[key] = like.new_zeros(()).expand(*shape)
        return self._made[key]


class InstantConv(torch.nn.Module):
    """Stands for a convolution of SAM2's: zeros of its output channels at once."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.zeros = Zeros()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.zeros(x, len(x), self.channels, *x.shape[-2:])


class InstantImageEncoder(torch.nn.Module):
    """Stands for SAM2's image encoder: its output (feature pyramid and positional encodings,
    shapes taken from one real forward before the clock) as zeros expanded to the batch."""

    def __init__(self, example: dict) -> None:
        super().__init__()
        self.fpn = [t.shape[1:] for t in example["backbone_fpn"]]
        self.pos = [t.shape[1:] for t in example["vision_pos_enc"]]
        self.zeros = Zeros()

    def forward(self, images: torch.Tensor) -> dict:
        fpn = [self.zeros(images, len(images), *shape) for shape in self.fpn]
        pos = [self.zeros(images, len(images), *shape) for shape in self.pos]
        return {"vision_features": fpn[-1], "vision_pos_enc": pos, "backbone_fpn": fpn}


class InstantMaskDecoder(torch.nn.Module):
    """Stands for SAM2's mask decoder (and its high-resolution projections conv_s0/conv_s1):
    zero logits at 4× the embedding's side and zero predicted IoUs, so every MK candidate
    fails the filters (what follows the filters, upsampling and painting, is not exercised)."""

    def __init__(self, real: torch.nn.Module) -> None:
        super().__init__()
        self.conv_s0 = InstantConv(real.conv_s0.out_channels)
        self.conv_s1 = InstantConv(real.conv_s1.out_channels)
        self.token_dim = real.transformer_dim
        self.zeros = Zeros()

    def forward(
        self,
        image_embeddings,
        image_pe,
        sparse_prompt_embeddings,
        dense_prompt_embeddings,
        multimask_output,
        repeat_image,
        high_res_features=None,
    ):
        count, masks = len(sparse_prompt_embeddings), 3 if multimask_output else 1
        side = [4 * s for s in image_embeddings.shape[-2:]]
        like = image_embeddings
        return (
            self.zeros(like, count, masks, *side),
            self.zeros(like, count, masks),
            self.zeros(like, count, masks, self.token_dim),
            self.zeros(like, count, 1),
        )


class InstantResNet(torch.nn.Module):
    """Stands for ResNet-50 without its classifier: (N, 2048) zeros at once."""

    def __init__(self) -> None:
        super().__init__()
        self.zeros = Zeros()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.zeros(images, len(images), 2048)


class BlockRecorder(torch.nn.Module):
    """Fed the planted truth's flows in place of an image by
    ``network_output``, records the blocks it cuts, call by call, and returns them."""

    dtype = torch.float32

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[torch.Tensor] = []

    def forward(self, blocks: torch.Tensor) -> tuple[torch.Tensor]:
        self.batches.append(blocks.clone())
        return (blocks,)


class InstantCellposeNet(torch.nn.Module):
    """Stands for Cellpose-SAM: returns, call by call, the recorded blocks of the planted
    truth's flows (:func:`centre_flows`, in the network's (B, 3, 256, 256) output layout), so
    flows → masks and everything after see realistic cells; after the last, from the first
    again (the benchmark runs the batch several times)."""

    dtype = torch.float32

    def __init__(self, batches: list[torch.Tensor]) -> None:
        super().__init__()
        self._batches = itertools.cycle(batches)

    def forward(self, blocks: torch.Tensor) -> tuple[torch.Tensor]:
        out = next(self._batches)
        if out.shape != blocks.shape:
            raise RuntimeError(f"recorded {tuple(out.shape)} for a call of {tuple(blocks.shape)}")
        return (out,)


def centre_flows(labels: np.ndarray) -> np.ndarray:
    """Network-like output for a label image: (3, H, W) float32 of 5 × the unit vector (dy, dx)
    from each cell pixel towards its cell's centroid, and cell probability logits +5 in cells,
    −5 outside. Cellpose's own training targets (diffusion flows,
    ``bmseg.models.training.training_targets``) take minutes per 3000² window on this CPU; the
    centroid field is what they approximate for compact cells and converges the same way."""
    count = int(labels.max())
    rows, cols = np.indices(labels.shape, dtype=np.float32)
    flat = labels.ravel()
    area = np.bincount(flat, minlength=count + 1).clip(min=1)
    centre_y = np.bincount(flat, rows.ravel(), minlength=count + 1) / area
    centre_x = np.bincount(flat, cols.ravel(), minlength=count + 1) / area
    dy, dx = centre_y[labels] - rows, centre_x[labels] - cols
    norm = np.hypot(dy, dx).clip(min=1e-6)
    inside = labels > 0
    out = np.stack([5 * dy / norm, 5 * dx / norm, np.where(inside, 5.0, -5.0)])
    out[:2, ~inside] = 0
    return out.astype(np.float32)


def cellpose_blocks(label_images: list[np.ndarray], hspc, pixel_size_um: float) -> list:
    """The network outputs Cellpose-SAM would give on each HSPC window if it found exactly
    the planted cells (:func:`centre_flows`), cut into blocks by the segmenter's own tiling
    (``network_output``), per batch in its call order, all windows after one another."""
    from bmseg.models.cellpose_models import CELLPOSE_BLOCK
    from bmseg.models.cellpose_net import network_output

    recorder = BlockRecorder()
    for labels in label_images:
        network_output(
            recorder,
            torch.from_numpy(centre_flows(labels)),
            block=CELLPOSE_BLOCK,
            overlap=hspc.settings.tile_overlap,
            batch_size=hspc.settings.cellpose_batch_size,
            rescale=hspc.rescale(pixel_size_um),
        )
    return recorder.batches


def instant_models(models_dir: Path, cellpose_label_images: list[np.ndarray], pixel_size_um: float):
    """SEGMENT's real segmenters and embedder (``make-test`` weights, SAM2 at its production
    1024 px input so the windows are production's) with every network swapped for an instant
    module: the MK segmenter, the HSPC segmenter, the embedder and the models' StageTimer."""
    from bmseg.models import HSPCSettings, MKSettings
    from bmseg.models.cellpose_models import CellposeHSPCSegmenter
    from bmseg.models.embedder import ResNetEmbedder
    from bmseg.models.layout import read_manifest, weight_path
    from bmseg.models.loading import load_cellpose, load_sam2
    from bmseg.models.sam2_models import Sam2Engine, Sam2MKSegmenter
    from bmseg.timing import StageTimer

    cpu = torch.device("cpu")
    manifest = read_manifest(models_dir)
    paths = {name: weight_path(models_dir, file) for name, file in manifest.files().items()}
    sam2 = load_sam2(paths["sam2"], manifest.sam2_config, cpu, SAM2_IMAGE_SIZE)
    with torch.no_grad():
        example = sam2.image_encoder(torch.zeros(1, 3, SAM2_IMAGE_SIZE, SAM2_IMAGE_SIZE))
    sam2.image_encoder = InstantImageEncoder(example)
    sam2.sam_mask_decoder = InstantMaskDecoder(sam2.sam_mask_decoder)
    timer = StageTimer(cpu)
    engine = Sam2Engine(sam2, cpu, timer)
    hspc = CellposeHSPCSegmenter(load_cellpose(paths["cellpose"], cpu), engine, HSPCSettings(), cpu)
    hspc.cellpose.net = InstantCellposeNet(
        cellpose_blocks(cellpose_label_images, hspc, pixel_size_um)
    )
    embedder = ResNetEmbedder(InstantResNet(), cpu, timer)
    return Sam2MKSegmenter(engine, MKSettings()), hspc, embedder, timer
