"""Cellpose-SAM's network output computed on the device, tensors in and tensors out.

Cellpose's own path (``transforms.normalize_img`` → ``core.run_net`` → ``average_tiles``)
builds every tile, every network output and the stitched image in numpy on the thread that
drives the device, copying each batch to the device and back. Here the same function runs as
tensor operations where the tile already lives:

- :func:`normalise`: each channel to its 1st–99th percentile, the percentiles read from a
  256-bin histogram of the uint8 tile (exact: numpy's linear interpolation between order
  statistics), on the same strided subsample ``normalize99(downsample=True)`` takes above
  224³ pixels;
- :func:`network_output`: the image resized (bilinear, as cv2's ``INTER_LINEAR``) and padded as
  ``run_net`` does, tiles cut at ``make_tiles``' corners with one gather, the network called
  directly in batches (in its own dtype: bf16 on GPUs, float32 on the CPU, no autocast), and
  the outputs stitched with ``average_tiles``' taper by ``index_add_``.

The test of this module runs both on the same input and compares.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from cellpose.transforms import _taper_mask, get_pad_yx

NORMALISE_PERCENTILES = (1.0, 99.0)
"""Cellpose's default normalisation range."""
SUBSAMPLE_ABOVE_PX = 224**3
"""``normalize99(downsample=True)`` reads percentiles from a strided subsample above this size."""
SUBSAMPLE_GRID = 224
"""... taking every ``side // 224``-th row and column."""
MIN_SPAN = 1e-3
"""A channel whose percentile range is at most this becomes 0 (Cellpose's rule)."""


def percentiles_uint8(image: torch.Tensor, quantiles: tuple[float, ...]) -> torch.Tensor:
    """Per channel of an (H, W, C) uint8 image, its ``quantiles`` (percent) as numpy's default
    (linear) ``np.percentile`` gives them: a (C, len(quantiles)) float64 tensor.

    The order statistics come from each channel's 256-bin histogram: one pass, no sort, and
    no host round trip.
    """
    channels = image.shape[-1]
    values = image.reshape(-1, channels).long() + 256 * torch.arange(channels, device=image.device)
    counts = torch.bincount(values.flatten(), minlength=256 * channels).view(channels, 256)
    cumulative = counts.cumsum(dim=1)
    n = image.numel() // channels
    position = torch.tensor(quantiles, dtype=torch.float64, device=image.device) / 100 * (n - 1)
    below = position.floor()
    ranks = torch.stack([below, (below + 1).clamp(max=n - 1)]).long()  # (2, Q)
    # The value of order statistic r is the first grey level whose cumulative count exceeds r.
    order = torch.searchsorted(
        cumulative, ranks.T.reshape(1, -1).expand(channels, -1).contiguous(), right=True
    )
    order = order.view(channels, len(quantiles), 2).double()
    return order[..., 0] + (position - below) * (order[..., 1] - order[..., 0])


def normalise(tile: torch.Tensor) -> torch.Tensor:
    """An (H, W, C) uint8 tile as Cellpose's ``normalize_img(tile[None], normalize=True)``
    makes it, channels first: (C, H, W) float32, 0 at each channel's 1st percentile and 1 at its
    99th; a flat channel (or one whose range is ≤ 1e-3) is all 0."""
    if tile.dtype != torch.uint8 or tile.ndim != 3:
        raise ValueError(f"tile must be (H, W, C) uint8: {tuple(tile.shape)} {tile.dtype}")
    height, width, _ = tile.shape
    sample = tile
    if height * width > SUBSAMPLE_ABOVE_PX:
        sample = tile[:: max(1, height // SUBSAMPLE_GRID), :: max(1, width // SUBSAMPLE_GRID)]
    low, high = percentiles_uint8(sample, NORMALISE_PERCENTILES).float().unbind(dim=1)
    flat = tile.reshape(-1, tile.shape[-1])
    varies = flat.amax(dim=0) > flat.amin(dim=0)
    span = high - low
    good = (varies & (span > MIN_SPAN))[:, None, None]
    image = tile.permute(2, 0, 1).float()
    scaled = (image - low[:, None, None]) / torch.where(good, span[:, None, None], 1.0)
    return torch.where(good, scaled, 0.0)


def tile_starts(length: int, block: int, overlap: float) -> list[int]:
    """Where ``make_tiles`` starts its blocks along an axis of ``length`` ≥ ``block`` pixels:
    ``ceil((1 + 2·overlap)·length / block)`` evenly spaced starts (``np.linspace`` truncated),
    ``overlap`` clamped to [0.05, 0.5] as Cellpose clamps it."""
    overlap = min(0.5, max(0.05, overlap))
    count = 1 if length <= block else math.ceil((1.0 + 2 * overlap) * length / block)
    if count == 1:
        return [0]
    step = (length - block) / (count - 1)
    return [int(i * step) for i in range(count - 1)] + [length - block]


class Stitcher:
    """The taper ``average_tiles`` weights each block's output with, kept on the device."""

    def __init__(self, block: int, device: torch.device) -> None:
        self.block = block
        taper = torch.from_numpy(_taper_mask(ly=block, lx=block))
        self.taper = taper.to(device=device, dtype=torch.float32)

    def pixels(self, corners: torch.Tensor, width: int) -> torch.Tensor:
        """Flat indices (N, block, block) into a ``width``-wide image of the blocks whose
        top-left corners (N, 2: y, x) are given."""
        span = torch.arange(self.block, device=corners.device)
        rows = corners[:, 0, None] + span  # (N, block)
        cols = corners[:, 1, None] + span
        return rows[:, :, None] * width + cols[:, None, :]


def network_output(
    net: torch.nn.Module,
    image: torch.Tensor,
    *,
    block: int,
    overlap: float,
    batch_size: int,
    rescale: float | None = None,
    stitcher: Stitcher | None = None,
) -> torch.Tensor:
    """``run_net``'s output for one normalised (C, H, W) float32 image: (3, H, W) float32 flows
    (dy, dx) and cell probability logits, on the image's device.

    The image is resized by ``rescale`` (if given), padded as ``run_net`` pads it, cut into
    ``block``² tiles at ``make_tiles``' corners, the network runs ``batch_size`` tiles at a
    time, and the outputs are stitched with the taper and brought back to (H, W).
    """
    _, height, width = image.shape
    if rescale is not None:
        size = (int(height * rescale), int(width * rescale))
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    rows, cols = image.shape[-2:]
    top, bottom, left, right = get_pad_yx(rows, cols, min_size=(block, block))
    padded = F.pad(image, (left, right, top, bottom))
    channels, padded_rows, padded_cols = padded.shape
    stitcher = stitcher or Stitcher(block, image.device)
    corners = torch.tensor(
        [
            (y, x)
            for y in tile_starts(padded_rows, block, overlap)
            for x in tile_starts(padded_cols, block, overlap)
        ],
        device=image.device,
    )
    flat_image = padded.reshape(channels, -1)
    summed: torch.Tensor | None = None
    weight = torch.zeros(padded_rows * padded_cols, device=image.device)
    for start in range(0, len(corners), batch_size):
        pixels = stitcher.pixels(corners[start : start + batch_size], padded_cols)
        tiles = flat_image[:, pixels].transpose(0, 1)  # (N, C, block, block)
        out = net(tiles.to(net.dtype))[0].float() * stitcher.taper
        if summed is None:
            summed = torch.zeros(out.shape[1], padded_rows * padded_cols, device=image.device)
        flat_pixels = pixels.flatten()
        summed.index_add_(1, flat_pixels, out.transpose(0, 1).reshape(out.shape[1], -1))
        weight.index_add_(0, flat_pixels, stitcher.taper.expand(len(pixels), -1, -1).flatten())
    stitched = (summed / weight).view(-1, padded_rows, padded_cols)
    stitched = stitched[:, top : padded_rows - bottom, left : padded_cols - right]
    if rescale is not None:
        stitched = F.interpolate(
            stitched[None], size=(height, width), mode="bilinear", align_corners=False
        )[0]
    return stitched
