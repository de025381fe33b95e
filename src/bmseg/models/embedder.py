"""ResNet-50 embeddings of cell crops: 2048-d pooled features, batched on the device."""

from __future__ import annotations

import numpy as np
import torch

from bmseg.models.device import StageTimer, inference

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
    ) -> None:
        self.net = net
        self.timer = timer
        self.device = device
        self.crop_size = crop_size
        self.batch_size = batch_size
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def embed(self, crops: np.ndarray) -> np.ndarray:
        """Embed (N, crop_size, crop_size, 3) uint8 crops into an (N, 2048) float32 array."""
        expected = (self.crop_size, self.crop_size, 3)
        if crops.ndim != 4 or crops.shape[1:] != expected or crops.dtype != np.uint8:
            raise ValueError(f"crops must be (N, *{expected}) uint8: {crops.shape} {crops.dtype}")
        with self.timer("embed"):
            return self._embed(crops)

    def _embed(self, crops: np.ndarray) -> np.ndarray:
        out = np.empty((len(crops), self.dim), dtype=np.float32)
        for start in range(0, len(crops), self.batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(crops[start : start + self.batch_size]))
            images = batch.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float() / 255.0
            with inference(self.device):
                features = self.net((images - self.mean) / self.std)
            out[start : start + len(batch)] = features.float().cpu().numpy()
        return out
