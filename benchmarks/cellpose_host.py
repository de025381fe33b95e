"""Benchmark the work around Cellpose-SAM's network: bmseg.models.cellpose_net against
Cellpose's numpy path (``normalize_img`` → ``core.run_net`` with ``make_tiles`` /
``average_tiles``), in the same process, on one tile.

The network is replaced on both sides by a stand-in that returns zeros of the right shape at
once, so what is timed is everything else: normalisation, resizing, tiling, the host copies
to and from the "device" (both run on the CPU here) and the taper stitching. This is the
host work Cellpose leaves on the thread that drives the GPU. Prints seconds per tile and the
ratio stock / ours, best of ``--repeats``.

    python benchmarks/cellpose_host.py                 # 3186² (core + HSPC margin), no resize
    python benchmarks/cellpose_host.py --side 2000 --rescale 0.8
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from cellpose import core, transforms

from bmseg.models.cellpose_net import Stitcher, network_output, normalise

BLOCK = 256


class InstantNetwork(torch.nn.Module):
    """Cellpose-SAM's interface (flows + cell probability per block, a style vector), no work."""

    dtype = torch.float32
    device = torch.device("cpu")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.new_zeros((x.shape[0], 3, *x.shape[-2:])), x.new_zeros((x.shape[0], 256))


def stock(net: torch.nn.Module, tile: np.ndarray, rescale: float | None, batch: int) -> None:
    image = transforms.normalize_img(tile[np.newaxis].astype(np.float32), normalize=True)
    out, _ = core.run_net(net, image, batch_size=batch, tile_overlap=0.1, bsize=BLOCK, rsz=rescale)
    if rescale is not None:
        transforms.resize_image(out[0], tile.shape[0], tile.shape[1])


def ours(
    net: torch.nn.Module, tile: np.ndarray, rescale: float | None, batch: int, stitcher: Stitcher
) -> None:
    with torch.no_grad():
        image = normalise(torch.from_numpy(tile))
        network_output(
            net,
            image,
            block=BLOCK,
            overlap=0.1,
            batch_size=batch,
            rescale=rescale,
            stitcher=stitcher,
        )


def best_of(repeats: int, run) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=3186, help="tile side, px (%(default)s)")
    parser.add_argument("--rescale", type=float, default=None, help="Cellpose resize factor")
    parser.add_argument("--batch", type=int, default=32, help="blocks per forward (%(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="best of (%(default)s)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    tile = rng.integers(0, 256, (args.side, args.side, 3), dtype=np.uint8)
    net, stitcher = InstantNetwork(), Stitcher(BLOCK, torch.device("cpu"))
    stock_s = best_of(args.repeats, lambda: stock(net, tile, args.rescale, args.batch))
    ours_s = best_of(args.repeats, lambda: ours(net, tile, args.rescale, args.batch, stitcher))
    print(f"tile {args.side}², rescale {args.rescale}, torch threads {torch.get_num_threads()}")
    print(f"Cellpose numpy path: {stock_s:.3f} s per tile")
    print(f"bmseg.models.cellpose_net: {ours_s:.3f} s per tile")
    print(f"ratio stock / ours: {stock_s / ours_s:.1f}x")


if __name__ == "__main__":
    main()
