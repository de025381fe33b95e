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
  ``run_net`` does, tiles cut at ``make_tiles``' corners (one gather), the network called
  directly in batches (in its own dtype: bf16 on GPUs, float32 on the CPU, no autocast), and
  the outputs stitched with ``average_tiles``' taper (one ``index_add_`` per group of
  disjoint blocks).

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
    (linear) ``np.percentile`` gives them, to float64 rounding: a (C, len(quantiles)) float64
    tensor.

    The order statistics come from one histogram of 256 bins per channel: one pass, no sort,
    and no host round trip; the ranks they are read at are known from the shape alone.
    """
    channels, device = image.shape[-1], image.device
    n = image.numel() // channels
    bins = torch.arange(0, 256 * channels, 256, dtype=torch.int32, device=device)
    counts = torch.bincount((image.to(torch.int32) + bins).flatten(), minlength=256 * channels)
    cumulative = counts.view(channels, 256).cumsum(dim=1)
    positions = [q / 100 * (n - 1) for q in quantiles]
    ranks = [rank for p in positions for rank in (math.floor(p), min(math.floor(p) + 1, n - 1))]
    # The value of order statistic r is the first grey level whose cumulative count exceeds r.
    order = torch.searchsorted(
        cumulative, torch.tensor([ranks] * channels, device=device), right=True
    )
    order = order.view(channels, len(quantiles), 2).double()
    fraction = [p - math.floor(p) for p in positions]
    fraction = torch.tensor(fraction, dtype=torch.float64, device=device)
    return torch.addcmul(order[..., 0], fraction, order[..., 1] - order[..., 0])


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
    lowest, highest = torch.aminmax(tile.reshape(-1, tile.shape[-1]), dim=0)
    span = high - low
    good = (highest > lowest) & (span > MIN_SPAN)
    scale = torch.where(good, 1.0 / torch.where(good, span, 1.0), 0.0)[:, None, None]
    # One affine pass, x · scale − low · scale: (x − low) / span to float32 rounding.
    return tile.permute(2, 0, 1).float().mul_(scale).sub_(low[:, None, None] * scale)


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


def disjoint_step(starts: list[int], block: int) -> int:
    """The least ``k`` such that blocks ``k`` or more places apart along an axis never overlap
    (``starts`` ascending, as :func:`tile_starts` gives them; repeats allowed)."""
    for k in range(1, len(starts)):
        if all(
            later - earlier >= block for earlier, later in zip(starts, starts[k:], strict=False)
        ):
            return k
    return max(1, len(starts))


class BlockGrid:
    """The blocks ``make_tiles`` cuts from a padded (C, H, W) image, as flat pixel indices on
    the device: every block is cut by one gather and added back by a few scatters, whatever
    their number (a slice and an in-place add per block cost the thread that drives the
    device ~3 operators per block, 225 blocks per tile).

    Blocks ``k`` places apart along both axes (:func:`disjoint_step`, 2 at Cellpose's overlap)
    never overlap, so each such group is added by one ``index_add_`` in which no pixel is
    added to twice: the sums are the same on every device, thread count and run (no
    accumulating ``index_put_``, which on CUDA sorts its indices and syncs with the host).
    The indices take 12 bytes per block pixel (225 blocks of 256²: 177 MB).
    """

    def __init__(self, shape: tuple[int, int], block: int, overlap: float, taper: torch.Tensor):
        rows, cols = shape
        device = taper.device
        ys, xs = tile_starts(rows, block, overlap), tile_starts(cols, block, overlap)
        self.key = (shape, block, overlap)
        self.grid = (len(ys), len(xs))
        self.block = block
        span = torch.arange(block, device=device)
        block_rows = torch.tensor(ys, device=device)[:, None] + span  # (rows of blocks, block)
        block_cols = torch.tensor(xs, device=device)[:, None] + span
        pixels = block_rows[:, None, :, None] * cols + block_cols[None, :, None, :]
        # (rows of blocks, columns of blocks, block, block) flat pixel indices; gathers read
        # int32 fastest, index_add_ int64 (on the CPU), so the cut's copy is int32 if it fits.
        small = torch.int32 if rows * cols < 2**31 else torch.int64
        self._pixels = pixels.flatten().to(small)
        step_y, step_x = disjoint_step(ys, block), disjoint_step(xs, block)
        self._groups = [
            (pixels[y::step_y, x::step_x].flatten(), slice(y, None, step_y), slice(x, None, step_x))
            for y in range(step_y)
            for x in range(step_x)
        ]
        weight = torch.zeros((1, rows, cols), device=device)
        self.add(weight, taper.expand(len(ys) * len(xs), 1, block, block))
        self.inverse_weight = weight.reciprocal_()
        """1 / the summed taper: what the summed tapered outputs are divided by."""

    def __len__(self) -> int:
        return self.grid[0] * self.grid[1]

    def cut(self, image: torch.Tensor) -> torch.Tensor:
        """The (N, C, block, block) blocks of a contiguous (C, H, W) image, in ``make_tiles``'
        order (rows of blocks, then columns): one gather and one copy."""
        channels = image.shape[0]
        flat = image.view(channels, -1).index_select(1, self._pixels)
        return flat.view(channels, len(self), self.block, self.block).transpose(0, 1).contiguous()

    def add(self, canvas: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """Add (N, C, block, block) ``blocks`` into the contiguous (C, H, W) ``canvas`` where
        they were cut, in place: one ``index_add_`` per group of mutually disjoint blocks."""
        channels = canvas.shape[0]
        flat = canvas.view(channels, -1)
        grid = blocks.view(*self.grid, *blocks.shape[1:])
        for pixels, grid_rows, grid_cols in self._groups:
            values = grid[grid_rows, grid_cols].permute(2, 0, 1, 3, 4).reshape(channels, -1)
            flat.index_add_(1, pixels, values)
        return canvas


class Stitcher:
    """The taper ``average_tiles`` weights each block's output with, and the
    :class:`BlockGrid` of the last layout (every tile of a run has the same), on the device."""

    def __init__(self, block: int, device: torch.device) -> None:
        self.block = block
        taper = torch.from_numpy(_taper_mask(ly=block, lx=block))
        self.taper = taper.to(device=device, dtype=torch.float32)
        self._grid: BlockGrid | None = None

    def grid(self, shape: tuple[int, int], overlap: float) -> BlockGrid:
        """The block grid of a padded ``shape``, made once per layout."""
        if self._grid is None or self._grid.key != (shape, self.block, overlap):
            self._grid = BlockGrid(shape, self.block, overlap, self.taper)
        return self._grid


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
    ``block``² tiles at ``make_tiles``' corners (one gather, :class:`BlockGrid`), the network
    runs ``batch_size`` tiles at a time, and the tapered outputs are added back (a few
    scatters), divided by the summed taper and brought back to (H, W).
    """
    _, height, width = image.shape
    if rescale is not None:
        size = (int(height * rescale), int(width * rescale))
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    rows, cols = image.shape[-2:]
    top, bottom, left, right = get_pad_yx(rows, cols, min_size=(block, block))
    padded = F.pad(image, (left, right, top, bottom))
    _, padded_rows, padded_cols = padded.shape
    stitcher = stitcher or Stitcher(block, image.device)
    grid = stitcher.grid((padded_rows, padded_cols), overlap)
    blocks = grid.cut(padded)
    outputs: torch.Tensor | None = None
    for start in range(0, len(grid), batch_size):
        out = net(blocks[start : start + batch_size].to(net.dtype))[0]
        if outputs is None:
            outputs = torch.empty((len(grid), *out.shape[1:]), device=image.device)
        outputs[start : start + len(out)] = out
    summed = torch.zeros((outputs.shape[1], padded_rows, padded_cols), device=image.device)
    grid.add(summed, outputs.mul_(stitcher.taper))
    stitched = summed.mul_(grid.inverse_weight)[
        :, top : padded_rows - bottom, left : padded_cols - right
    ]
    if rescale is not None:
        stitched = F.interpolate(
            stitched[None], size=(height, width), mode="bilinear", align_corners=False
        )[0]
    return stitched
