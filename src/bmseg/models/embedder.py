"""ResNet-50 embeddings of cell crops: 2048-d pooled features, batched on the device.

Two ways in: :meth:`ResNetEmbedder.embed` takes crops already cut on the host;
:meth:`ResNetEmbedder.embed_squares` takes the tile and the cells' squares and, on a GPU, cuts
the crops there (``torchvision.ops.roi_align``, as :class:`bmseg.features.CropSampler` does on
a GPU) and feeds them to the network without a host round trip, in ``channels_last``. On the
CPU roi_align's kernel is slow (docs/benchmarks.md), so there the crops are cut by the
CropSampler's OpenCV path as before. ResNet-50's global pooling makes the embedding 2048-d at
any crop size, so HSPCs (~70 px across) can be embedded at
:data:`bmseg.models.settings.HSPC_CROP_SIZE` instead of 224.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import numpy as np
import torch
import torchvision
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.ops import roi_align

from bmseg.features import CropSampler
from bmseg.models.device import inference
from bmseg.models.transfer import upload
from bmseg.timing import StageTimer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ResNetEmbedder:
    """torchvision ResNet-50 without its classifier (``fc`` is the identity)."""

    dim = 2048

    def __init__(
        self,
        net: torch.nn.Module,
        device: torch.device,
        timer: StageTimer,
        crop_size: int = 224,
        batch_size: int = 128,
        device_crops: bool | None = None,
        compiled: bool = False,
    ) -> None:
        self.net = net
        self._calling: contextlib.AbstractContextManager = (
            threading.Lock() if compiled else contextlib.nullcontext()
        )
        """Held around each call of a ``compiled`` (``torch.compile``) network: compiled modules
        are not thread-safe (pytorch issues 118260, 136833) and SEGMENT's worker threads embed
        at once, so they take turns; an eager network is called from all of them freely."""
        self.device_crops = device.type == "cuda" if device_crops is None else device_crops
        """Whether :meth:`embed_squares` cuts crops by roi_align on ``device`` (default: on a
        GPU only, roi_align's CPU kernel being slow); else by OpenCV on the host."""
        self.timer = timer
        self.device = device
        self._streams = threading.local()
        self.crop_size = crop_size
        self.batch_size = batch_size
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def embed(self, crops: np.ndarray) -> np.ndarray:
        """Embed (N, crop_size, crop_size, 3) uint8 crops into an (N, 2048) float32 array."""
        expected = (self.crop_size, self.crop_size, 3)
        if crops.ndim != 4 or crops.shape[1:] != expected or crops.dtype != np.uint8:
            raise ValueError(f"crops must be (N, *{expected}) uint8: {crops.shape} {crops.dtype}")
        with self._own_stream(), self.timer("embed"):
            return self._embed_batches(len(crops), lambda part: crops[part])

    def embed_squares(
        self, rgb: np.ndarray | torch.Tensor, squares: np.ndarray, size: int | None = None
    ) -> np.ndarray:
        """Embed the (N, 3) ``x, y, side`` squares of an (H, W, 3) uint8 tile, resampled to
        ``size`` (the embedder's ``crop_size`` by default): (N, 2048) float32. With
        ``device_crops`` (a GPU) the tile is uploaded once (or taken as the device tensor
        given) and the crops never leave the device; else they are cut on the host by OpenCV,
        as for :meth:`embed`."""
        size = size or self.crop_size
        with self._own_stream(), self.timer("embed"):
            if self.device_crops:
                return self._embed_on_device(rgb, squares, size)
            host = rgb.cpu().numpy() if isinstance(rgb, torch.Tensor) else rgb
            sampler = CropSampler(host, device="cpu")
            return self._embed_batches(
                len(squares), lambda part: sampler.sample(squares[part], size)
            )

    def _own_stream(self) -> contextlib.AbstractContextManager:
        """On CUDA, this thread's own stream (made on its first call) as the current one: the
        worker threads' embeddings queue apart from the device thread's segmentation and from
        each other, and the ``embed`` stage's events time this stream only. On the CPU,
        nothing."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        stream = getattr(self._streams, "stream", None)
        if stream is None:
            stream = self._streams.stream = torch.cuda.Stream(self.device)
        return torch.cuda.stream(stream)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """The network on (N, 3, S, S) float crops with values 0–255, ImageNet-normalised, on a
        GPU in ``channels_last`` (the layout cuDNN's convolutions run fastest in)."""
        images = (crops / 255.0 - self.mean) / self.std
        if self.device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with self._calling, inference(self.device):
            return self.net(images).float()

    def _embed_on_device(
        self, rgb: np.ndarray | torch.Tensor, squares: np.ndarray, size: int
    ) -> np.ndarray:
        """Crops by roi_align on the embedder's device, straight into the network."""
        tile = rgb.to(self.device) if isinstance(rgb, torch.Tensor) else upload(rgb, self.device)
        planes = tile.permute(2, 0, 1)[None].float()
        boxes = torch.as_tensor(np.asarray(squares), device=self.device)
        out = torch.empty((len(boxes), self.dim), device=self.device)
        with torch.no_grad():
            for start in range(0, len(boxes), self.batch_size):
                crops = roi_crops(planes, boxes[start : start + self.batch_size], size)
                out[start : start + len(crops)] = self.forward(crops)
        return out.cpu().numpy()

    def _embed_batches(self, count: int, crops_of: Callable[[slice], np.ndarray]) -> np.ndarray:
        """(count, 2048) embeddings of the host (n, S, S, 3) uint8 crops ``crops_of(part)``
        returns for each ``batch_size`` slice (so at most one batch of crops exists at once)."""
        out = np.empty((count, self.dim), dtype=np.float32)
        for start in range(0, count, self.batch_size):
            part = slice(start, min(start + self.batch_size, count))
            batch = torch.from_numpy(np.ascontiguousarray(crops_of(part)))
            crops = batch.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
            out[part] = self.forward(crops).cpu().numpy()
        return out


def roi_crops(planes: torch.Tensor, squares: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, size, size) crops of the (N, 3) ``x, y, side`` squares of a (1, 3, H, W) float
    tile by ``roi_align`` (adaptive sampling: each output pixel averages the source pixels
    under it; black outside the tile), rounded to the uint8 values the host path would hold."""
    boxes = squares.to(planes.dtype)
    rois = torch.cat([torch.zeros_like(boxes[:, :1]), boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], 1)
    crops = roi_align(planes, rois, output_size=size, sampling_ratio=-1, aligned=True)
    return crops.round().clamp(0, 255)


def fold_batch_norms(net: torch.nn.Module) -> int:
    """Fold every eval-mode BatchNorm of a torchvision ResNet into the convolution before it
    (the same affine map, one kernel less per convolution); returns how many were folded."""
    pairs = [(net, "conv1", "bn1")]
    for block in net.modules():
        if isinstance(block, torchvision.models.resnet.Bottleneck):
            pairs += [(block, f"conv{i}", f"bn{i}") for i in (1, 2, 3)]
            if block.downsample is not None:
                pairs.append((block.downsample, "0", "1"))
    for owner, conv, norm in pairs:
        fused = fuse_conv_bn_eval(getattr(owner, conv), getattr(owner, norm))
        setattr(owner, conv, fused)
        setattr(owner, norm, torch.nn.Identity())
    return len(pairs)
