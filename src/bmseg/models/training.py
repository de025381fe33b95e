"""Training Cellpose-SAM with Cellpose's own code, and measuring it the way SEGMENT runs it.

Both `bmseg models make-demo` (a small network trained on synthetic slides) and `bmseg finetune`
(a lab's network adapted to its accepted HSPC masks) come here. A training *region* is an RGB
image as SEGMENT shows it to the models (:func:`bmseg.pixels.to_rgb8`) with its label image;
Cellpose's training targets (cell probability and Cellpose's own flows, laid out as
``cellpose.dynamics.labels_to_flows`` does) are computed once per region, then crops around the
cells are cut from image and targets together.
``cellpose.train.train_seg`` then trains on those crops (its own augmentation, loss, AdamW and
learning-rate schedule). Validation runs the HSPC path of SEGMENT (Cellpose's network through
``cellpose.core.run_net``, :mod:`bmseg.flows`) and scores AP@0.5 with ``cellpose.metrics``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cellpose import train
from cellpose.dynamics import masks_to_flows_gpu
from cellpose.metrics import average_precision
from cellpose.transforms import normalize_img
from scipy import ndimage
from scipy.sparse.csgraph import maximum_bipartite_matching
from scipy.spatial import cKDTree
from tqdm import tqdm

from bmseg.label_images import fill_single_mask_holes
from bmseg.models.cellpose_models import CellposeHSPCSegmenter
from bmseg.models.settings import HSPCSettings

log = logging.getLogger(__name__)

CELLPOSE_TRAIN_BLOCK = 256
"""Cellpose-SAM trains on 256 × 256 crops (``bsize``; its position embeddings fix it)."""


@dataclass(frozen=True)
class TrainSettings:
    """What ``cellpose.train.train_seg`` is run with, and how its crops are cut.

    Cellpose's schedule warms the learning rate up over 10 epochs, holds it, and from 100 epochs
    on halves it ten times over the last 50: so ``epochs`` ≥ 100 with few ``images_per_epoch``
    gives an annealed run for the same number of steps.
    """

    epochs: int = 100
    images_per_epoch: int = 8
    batch_size: int = 8
    learning_rate: float = 1e-3
    weight_decay: float = 0.1
    crop_px: int = 320
    seed: int = 0
    contrast_share: float = 0.0
    """Share of crops shown at a random contrast window (:func:`contrast_windowed`); 0 leaves
    every crop to Cellpose's own per-image normalisation."""

    def as_dict(self) -> dict[str, Any]:
        """The settings as a manifest records them."""
        return asdict(self)


@dataclass
class Region:
    """One training or validation region: what SEGMENT shows the models, and its cells.

    ``rgb`` is (H, W, 3) uint8, ``labels`` (H, W) int32 with 0 for background; ``centres`` are
    the (x, y) px of the cells crops are cut around.
    """

    rgb: np.ndarray
    labels: np.ndarray
    centres: np.ndarray


PACK_WIDTH = 2048
"""Width of the canvas the cells of many crops are packed into for one flow computation."""


def training_targets(label_images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Cellpose's training targets of label images: (4, H, W) float32 labels, cell probability,
    Y and X flow, as ``cellpose.dynamics.labels_to_flows`` lays them out.

    The flows are Cellpose's own (``masks_to_flows_gpu``: diffusion from each cell's centre
    within the cell), computed in one call for the cells of all images packed side by side on
    one canvas with a gap between them: a cell's diffusion never leaves the cell, so packing
    changes nothing but the cost (one call, instead of a fixed ~0.2 s per image on a CPU).
    """

    pieces = []  # (image index, label, box slices, packed y, packed x)
    cursor_x = cursor_y = row_height = 0
    for index, labels in enumerate(label_images):
        for label, box in enumerate(ndimage.find_objects(labels), start=1):
            if box is None:
                continue
            height, width = box[0].stop - box[0].start, box[1].stop - box[1].start
            if cursor_x + width + 1 > PACK_WIDTH:
                cursor_x, cursor_y, row_height = 0, cursor_y + row_height + 1, 0
            pieces.append((index, label, box, cursor_y + 1, cursor_x + 1))
            cursor_x += width + 1
            row_height = max(row_height, height)
    targets = []
    for labels in label_images:
        target = np.zeros((4, *labels.shape), np.float32)
        target[0] = labels
        target[1] = labels > 0
        targets.append(target)
    if not pieces:
        return targets
    canvas = np.zeros((cursor_y + row_height + 2, PACK_WIDTH + 1), np.int64)
    for number, (index, label, box, y, x) in enumerate(pieces, start=1):
        inside = label_images[index][box] == label
        window = canvas[y : y + inside.shape[0], x : x + inside.shape[1]]
        window[inside] = number
    flows, _ = masks_to_flows_gpu(canvas, device=torch.device("cpu"))
    for index, label, box, y, x in pieces:
        inside = label_images[index][box] == label
        packed = flows[:, y : y + inside.shape[0], x : x + inside.shape[1]]
        targets[index][2:][(slice(None), *box)][:, inside] = packed[:, inside]
    return targets


def crops_around(
    regions: Sequence[Region], crop_px: int, rng: np.random.Generator
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """One crop per cell centre of every region, placed at random around it (a third of the
    crop each way) and kept inside the region: images (3, S, S) float32, targets (4, S, S).

    Targets are computed once per region, so a cell pays its flows once however many crops
    hold it, and a cell cut by a crop's edge keeps the flows of the whole cell, as in a tile.
    """
    images, targets = [], []
    for region in regions:
        height, width = region.labels.shape
        side_y, side_x = min(crop_px, height), min(crop_px, width)
        (region_targets,) = training_targets([region.labels])
        for cx, cy in region.centres:
            jitter = rng.uniform(-crop_px / 3, crop_px / 3, size=2)
            x0 = int(np.clip(round(cx + jitter[0] - side_x / 2), 0, width - side_x))
            y0 = int(np.clip(round(cy + jitter[1] - side_y / 2), 0, height - side_y))
            rows, cols = slice(y0, y0 + side_y), slice(x0, x0 + side_x)
            images.append(region.rgb[rows, cols].transpose(2, 0, 1).astype(np.float32))
            targets.append(region_targets[:, rows, cols].copy())
    return images, targets


CONTRAST_LOW_MAX = 0.65
"""Highest low end of a contrast window, in a crop's own 0–1 range: brightfield's 1st
percentile over a 3000² window that is mostly light background (measured: 0.63)."""
CONTRAST_WIDTH_MIN = 0.2
"""Narrowest contrast window: fluorescence's 99th percentile over a window with under 1 % of
cell pixels, where the cells stand at ~4× it (measured for DAPI: 0.24; CD41's 0.06 is left out:
windows down to 0.05 halved the validation AP@0.5, docs/benchmarks.md)."""


def contrast_windowed(
    images: Sequence[np.ndarray], share: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Each crop normalised as Cellpose normalises an image (1st–99th percentile per channel),
    then, for ``share`` of them, each channel mapped from a random window [low, high] of its
    0–1 range to 0–1, values beyond it kept (not clipped).

    SEGMENT normalises a whole tile at once, as Cellpose's ``eval`` does; where a tile holds
    mostly background (a section's edge, a sparse slide) its percentiles sit far from a
    cell-centred crop's, and a network that only ever saw per-crop contrast misses the cells
    (the demo found 0 of 29 fluorescence HSPCs on a 3000² slide it segments whole, all of them
    on its 2000² middle). The windows span what such tiles give. A channel without range stays.
    """
    out = []
    for image in images:
        normalised = normalize_img(np.array(image, np.float32), axis=0)  # a copy: in place
        if rng.uniform() < share:
            for channel in normalised:
                if np.ptp(channel) <= 0:
                    continue
                low = rng.uniform(0.0, CONTRAST_LOW_MAX)
                width = np.exp(rng.uniform(np.log(CONTRAST_WIDTH_MIN), np.log(1.0 - low)))
                channel -= low
                channel /= width
        out.append(normalised)
    return out


class _TrainProgress(logging.Handler):
    """A tqdm bar over the training images, fed by a forward hook on the network (rate) and by
    the loss lines ``cellpose.train`` logs (postfix), since ``train_seg`` has no callback."""

    LOSS = re.compile(r"^(\d+), train_loss=([0-9.]+)")

    def __init__(self, net: torch.nn.Module, total: int, enabled: bool, desc: str) -> None:

        super().__init__(level=logging.INFO)
        self.bar = tqdm(total=total, desc=desc, unit="img", disable=not enabled, delay=1)
        self.losses: list[tuple[int, float]] = []
        self._hook = net.register_forward_hook(self._forward)

    def _forward(self, module: torch.nn.Module, inputs: tuple, output: Any) -> None:
        if module.training:
            self.bar.update(len(inputs[0]))

    def emit(self, record: logging.LogRecord) -> None:
        match = self.LOSS.match(record.getMessage())
        if match:
            epoch, loss = int(match.group(1)), float(match.group(2))
            self.losses.append((epoch, loss))
            self.bar.set_postfix(epoch=epoch, loss=f"{loss:.3f}")
            log.info("epoch %d: training loss %.4f", epoch, loss)

    def close(self) -> None:
        self._hook.remove()
        self.bar.close()
        super().close()


@contextlib.contextmanager
def _progress(net: torch.nn.Module, total: int, enabled: bool, desc: str) -> Iterator[Any]:
    train_log = logging.getLogger("cellpose.train")
    handler = _TrainProgress(net, total, enabled, desc)
    previous = train_log.level
    train_log.addHandler(handler)
    train_log.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        train_log.removeHandler(handler)
        train_log.setLevel(previous)
        handler.close()


def train_cellpose(
    net: torch.nn.Module,
    images: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    settings: TrainSettings,
    dest: Path,
    progress: bool = True,
    desc: str = "train Cellpose-SAM",
) -> dict[str, Any]:
    """Train ``net`` (a Cellpose ``CPSAM``) in place with ``cellpose.train.train_seg`` and save
    it to ``dest`` in Cellpose's format; return the record (seconds, losses, crops).

    Deterministic for a given seed and torch build on the CPU: ``train_seg`` seeds NumPy per
    epoch itself, torch (layer drop) is seeded here, and CPU kernels run on
    :data:`CPU_TRAIN_THREADS` threads with torch's deterministic algorithms while training
    (:func:`_deterministic_cpu`).
    """
    if not images:
        raise ValueError("no training crops")

    torch.manual_seed(settings.seed)
    started = time.perf_counter()
    total = settings.epochs * settings.images_per_epoch
    windowed = settings.contrast_share > 0
    if windowed:
        images = contrast_windowed(
            images, settings.contrast_share, np.random.default_rng([settings.seed, 1])
        )
    with (
        _deterministic_cpu(net),
        tempfile.TemporaryDirectory(prefix=".train-", dir=dest.parent) as work,
        _progress(net, total, progress, desc),
        warnings.catch_warnings(),
    ):
        warnings.filterwarnings("ignore", message="In CPU autocast")
        saved, train_losses, _ = train.train_seg(
            net,
            train_data=list(images),
            train_labels=list(targets),
            batch_size=settings.batch_size,
            learning_rate=settings.learning_rate,
            weight_decay=settings.weight_decay,
            n_epochs=settings.epochs,
            nimg_per_epoch=settings.images_per_epoch,
            normalize=not windowed,  # windowed crops are normalised already
            min_train_masks=0,
            bsize=CELLPOSE_TRAIN_BLOCK,
            save_path=work,
            save_every=settings.epochs + 1,
            model_name="cpsam",
        )
        Path(saved).replace(dest)
    seconds = time.perf_counter() - started
    log.info("trained %d epochs on %d crops in %.0f s", settings.epochs, len(images), seconds)
    return {
        "crops": len(images),
        "images_seen": total,
        "seconds": round(seconds, 1),
        "loss_first": round(float(train_losses[0]), 4),
        "loss_last": round(float(train_losses[-1]), 4),
        "threads": CPU_TRAIN_THREADS if _on_cpu(net) else None,
    }


CPU_TRAIN_THREADS = 2
"""Torch threads for training on the CPU, whatever the machine's cores: the weights depend on
how many threads split the sums, so a fixed count keeps a seed's weights the same everywhere
(two threads train the demo network 1.5× faster than one)."""


def _on_cpu(net: torch.nn.Module) -> bool:
    return next(net.parameters()).device.type == "cpu"


@contextlib.contextmanager
def _deterministic_cpu(net: torch.nn.Module) -> Iterator[None]:
    """For a network on the CPU: :data:`CPU_TRAIN_THREADS` threads and torch's deterministic
    algorithms inside (the backward of segment_anything's relative-position lookup, an
    accumulating ``index_put``, otherwise sums in a varying order on two threads and one
    seed gave different weights), the caller's settings restored after. On a GPU, nothing
    changes (cuBLAS would need its workspace configured to be deterministic)."""
    if not _on_cpu(net):
        yield
        return
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(CPU_TRAIN_THREADS)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_num_threads(threads)


def pooled_ap50(truths: Sequence[np.ndarray], predictions: Sequence[np.ndarray]) -> float:
    """AP@0.5 over all regions together: TP / (TP + FP + FN), matched by ``cellpose.metrics``
    (IoU ≥ 0.5, one-to-one), so a region with few cells weighs what its cells weigh."""

    if not truths:
        return float("nan")
    _, tp, fp, fn = average_precision(
        [t.astype(np.int32) for t in truths],
        [p.astype(np.int32) for p in predictions],
        threshold=[0.5],
    )
    denominator = float(tp.sum() + fp.sum() + fn.sum())
    return float(tp.sum()) / denominator if denominator else float("nan")


def hspc_masks(cellpose_model: Any, regions: Sequence[Region], pixel_size_um: float) -> list:
    """Each region's HSPC label image by SEGMENT's own Cellpose path (network through
    ``cellpose.core.run_net``, masks by :mod:`bmseg.flows`), without SAM2 or area filter."""

    device = cellpose_model.device
    segmenter = CellposeHSPCSegmenter(cellpose_model, None, HSPCSettings(refine=False), device)
    cellpose_model.net.eval()
    masks = []
    for region in regions:
        d_p, cellprob = segmenter.flows(region.rgb, pixel_size_um)
        labels = segmenter.masks(d_p, cellprob, pixel_size_um).cpu().numpy()
        fill_single_mask_holes(labels)  # what SEGMENT's workers do
        masks.append(labels)
    return masks


def validation_ap50(cellpose_model: Any, regions: Sequence[Region], pixel_size_um: float) -> float:
    """Pooled AP@0.5 of the model's HSPC masks against the regions' labels."""
    predicted = hspc_masks(cellpose_model, regions, pixel_size_um)
    return pooled_ap50([r.labels for r in regions], predicted)


def centroid_matches(truth_xy: np.ndarray, found_xy: np.ndarray, radius_px: float) -> int:
    """How many found cells pair one-to-one with a true cell whose centroid lies within
    ``radius_px`` (a maximum bipartite matching, so no cell counts twice)."""

    if not len(truth_xy) or not len(found_xy):
        return 0
    near = cKDTree(truth_xy).sparse_distance_matrix(
        cKDTree(found_xy), radius_px, output_type="coo_matrix"
    )
    adjacency = near.tocsr()
    adjacency.data[:] = 1  # a pair at distance 0 is still a pair
    adjacency.eliminate_zeros()
    pairs = maximum_bipartite_matching(adjacency, perm_type="column")
    return int((pairs >= 0).sum())
