"""bmseg.models.cellpose_net: Cellpose-SAM's network output as tensor operations equals
Cellpose's own numpy path (normalize_img, run_net, average_tiles) on the same input.

The network is the `make-test` Cellpose-SAM (Cellpose's CPSAM, random weights, float32 on
the CPU) loaded by SEGMENT's loader; the stock side is cellpose 4's own functions.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from cellpose import core, transforms

from bmseg.models.cellpose_net import (
    SUBSAMPLE_ABOVE_PX,
    Stitcher,
    disjoint_step,
    network_output,
    normalise,
    percentiles_uint8,
    tile_starts,
)
from bmseg.testing.operators import OperatorCount

PIXEL_UM = 0.5


@pytest.fixture(scope="module")
def cellpose_model(test_models_dir: Path):
    from bmseg.models.layout import read_manifest
    from bmseg.models.loading import load_cellpose

    manifest = read_manifest(test_models_dir)
    return load_cellpose(test_models_dir / manifest.cellpose_checkpoint, torch.device("cpu"))


def textured(seed: int, height: int, width: int) -> np.ndarray:
    """Smooth blobs plus noise, 3 channels of different ranges: random weights give varied
    flows on it, and each channel has its own percentiles."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal((height, width, 3)), (6, 6, 0))
    field = (field - field.min(axis=(0, 1))) / np.ptp(field, axis=(0, 1))
    field += 0.1 * rng.standard_normal(field.shape)
    return (np.clip(field, 0, 1) * np.array([255, 120, 60])).astype(np.uint8)


def stock_normalised(tile: np.ndarray) -> np.ndarray:
    """Cellpose's normalisation as SEGMENT's previous path called it, channels first."""
    image = transforms.normalize_img(tile[np.newaxis].astype(np.float32), normalize=True)
    return image[0].transpose(2, 0, 1)


@pytest.mark.parametrize("shape", [(1, 7, 3), (37, 53, 3), (128, 64, 2)])
def test_percentiles_equal_numpy(shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    image[..., 0] = np.minimum(image[..., 0], 17)  # a narrow channel: ties everywhere
    quantiles = (0.0, 1.0, 37.5, 99.0, 100.0)
    ours = percentiles_uint8(torch.from_numpy(image), quantiles).numpy()
    theirs = np.stack([np.percentile(image[..., c], quantiles) for c in range(shape[-1])])
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-9)


def test_normalise_equals_normalize_img_with_a_flat_channel() -> None:
    tile = textured(0, 90, 130)
    tile[..., 1] = 42  # flat: Cellpose leaves it 0
    ours = normalise(torch.from_numpy(tile)).numpy()
    theirs = stock_normalised(tile)
    assert np.ptp(theirs[0]) > 1 and not theirs[1].any()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)


def test_normalise_takes_cellposes_subsample_on_large_tiles() -> None:
    """Above 224³ pixels Cellpose reads the percentiles on every (side // 224)-th pixel; a
    full-tile percentile would differ on this tile (the subsample misses the bright stripe)."""
    side = int(np.ceil(np.sqrt(SUBSAMPLE_ABOVE_PX))) + 1  # 3354: stride 14
    tile = np.zeros((side, side, 3), np.uint8)
    tile[..., 0] = np.arange(side, dtype=np.uint8)[None, :] % 200  # varies along x
    tile[..., 1] = (np.arange(side)[:, None] * 7 % 251).astype(np.uint8)
    tile[1::14, :, 2] = 250  # rows the stride-14 subsample never reads
    tile[::14, :, 2] = 10
    tile[::14, ::3, 2] = 30
    ours = normalise(torch.from_numpy(tile))
    theirs = stock_normalised(tile)
    full_range = np.percentile(tile[..., 2], 99) - np.percentile(tile[..., 2], 1)
    sub = tile[::14, ::14, 2]
    assert full_range != np.percentile(sub, 99) - np.percentile(sub, 1)
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overlap", [0.0, 0.1, 0.37, 0.9])
@pytest.mark.parametrize("length", [256, 257, 400, 1024, 3616])
def test_tile_starts_are_make_tiles_corners(length: int, overlap: float) -> None:
    _, ysub, _, _, _ = transforms.make_tiles(
        np.zeros((1, length, 256), np.float32), bsize=256, tile_overlap=overlap
    )  # one column of blocks: ysub lists the row starts, repeats included (counted twice)
    assert tile_starts(length, 256, overlap) == [int(y[0]) for y in ysub]


@pytest.mark.parametrize(
    ("shape", "rescale", "overlap", "batch"),
    [
        ((300, 300), None, 0.1, 8),  # 2 × 2 tiles
        ((200, 170), None, 0.1, 8),  # smaller than a block: padded up to it
        ((420, 300), None, 0.25, 3),  # batches that split the tiles unevenly
        ((240, 260), 30 * PIXEL_UM / 8.0, 0.1, 8),  # 8 µm cells: resized by 1.875 and back
        ((257, 700), None, 0.5, 4),  # repeated row starts; blocks 3 apart are the first disjoint
    ],
)
def test_network_output_equals_run_net(cellpose_model, shape, rescale, overlap, batch) -> None:
    tile = textured(sum(shape), *shape)
    image = stock_normalised(tile)
    stock, _ = core.run_net(
        cellpose_model.net,
        image.transpose(1, 2, 0)[np.newaxis].copy(),
        batch_size=batch,
        tile_overlap=overlap,
        bsize=256,
        rsz=rescale,
    )
    stock = stock[0]
    if rescale is not None:
        stock = transforms.resize_image(stock, *shape)
    with torch.no_grad():
        ours = network_output(
            cellpose_model.net,
            torch.from_numpy(image),
            block=256,
            overlap=overlap,
            batch_size=batch,
            rescale=rescale,
        )
    assert ours.shape == (3, *shape) and ours.dtype == torch.float32
    assert np.ptp(stock[..., 2]) > 0.01  # the random network's output is not flat
    np.testing.assert_allclose(ours.numpy(), stock.transpose(2, 0, 1), rtol=1e-4, atol=1e-4)


class ThreeChannels(torch.nn.Module):
    """A network of Cellpose-SAM's interface that computes nothing: blocks in, blocks out."""

    dtype = torch.float32

    def forward(self, blocks: torch.Tensor) -> tuple[torch.Tensor]:
        return (blocks,)


class Accumulations(OperatorCount):
    """Also counts the accumulating ``index_put_`` calls (on CUDA each sorts its indices and
    syncs with the host to check their bounds)."""

    def __init__(self) -> None:
        super().__init__()
        self.accumulating = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "index_put" in str(func) and (kwargs or {}).get("accumulate", args[3:4] == (True,)):
            self.accumulating += 1
        return super().__torch_dispatch__(func, types, args, kwargs)


def test_block_operators_do_not_grow_with_the_blocks() -> None:
    """Cutting and stitching cost the device thread a fixed number of operators per tile and
    per batch, not per block: a 36-block image asks for as many as a 16-block one (one batch
    each, the layout made beforehand), none of them an accumulating scatter, and both give
    ``run_net``'s tiling of the identity."""
    net, counts = ThreeChannels(), []
    for side, batch in [(800, 16), (1100, 36)]:
        image = torch.from_numpy(stock_normalised(textured(side, side, side)))
        assert len(tile_starts(side, 256, 0.1)) ** 2 == batch
        stitcher = Stitcher(256, torch.device("cpu"))
        with torch.no_grad():
            run = functools.partial(
                network_output, net, image, block=256, overlap=0.1, batch_size=batch
            )
            run(stitcher=stitcher)  # makes the layout
            with Accumulations() as ops:
                out = run(stitcher=stitcher)
        assert ops.accumulating == 0
        torch.testing.assert_close(out, image, rtol=1e-6, atol=1e-6)  # tapers cancel
        counts.append(ops.count)
    assert counts[0] == counts[1], counts


@pytest.mark.parametrize(
    ("starts", "step"), [([0], 1), ([0, 44], 2), ([0, 186, 372, 558], 2), ([0, 0, 1], 3)]
)
def test_disjoint_step(starts: list[int], step: int) -> None:
    assert disjoint_step(starts, 256) == step


def test_segmenter_flows_stay_tensors_and_skip_cellposes_numpy_path(
    cellpose_model, monkeypatch
) -> None:
    """The HSPC segmenter's flows equal ``CellposeModel.eval(compute_masks=False)`` and come
    out as tensors on the model's device, without Cellpose's numpy tiling or normalisation."""
    from bmseg.models.cellpose_models import CellposeHSPCSegmenter
    from bmseg.models.settings import HSPCSettings

    tile = textured(5, 280, 310)
    _, flows, _ = cellpose_model.eval(tile, diameter=16.0, compute_masks=False)
    segmenter = CellposeHSPCSegmenter(
        cellpose_model, None, HSPCSettings(diameter_um=8.0), torch.device("cpu")
    )

    def forbidden(*args, **kwargs):
        raise AssertionError("Cellpose's numpy path was called")

    for module, name in [(core, "run_net"), (transforms, "normalize_img")]:
        monkeypatch.setattr(module, name, forbidden)
    d_p, cellprob = segmenter.flows(tile, PIXEL_UM)
    assert isinstance(d_p, torch.Tensor) and isinstance(cellprob, torch.Tensor)
    assert d_p.shape == (2, 280, 310) and cellprob.shape == (280, 310)
    np.testing.assert_allclose(d_p.numpy(), flows[1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(cellprob.numpy(), flows[2], rtol=1e-4, atol=1e-4)
    labels = segmenter.masks(d_p, cellprob, PIXEL_UM)  # tensors go straight into bmseg.flows
    assert isinstance(labels, torch.Tensor)  # and the labels stay on the device
    assert labels.shape == (280, 310) and labels.dtype == torch.int32


def test_cellpose_sam_runs_in_its_own_dtype_without_autocast(cellpose_model, monkeypatch) -> None:
    """Cellpose-SAM is loaded in bf16 on GPUs already; an autocast around it would only turn
    its softmax back to float32. Even where the models' autocast would switch on, the
    network sees none."""
    import bmseg.models.device as device
    from bmseg.models.cellpose_models import CellposeHSPCSegmenter
    from bmseg.models.settings import HSPCSettings

    monkeypatch.setattr(device, "use_bf16", lambda _: True)  # as on a bf16-capable GPU
    seen = []
    hook = cellpose_model.net.register_forward_pre_hook(
        lambda module, args: seen.append(torch.is_autocast_enabled("cpu"))
    )
    try:
        segmenter = CellposeHSPCSegmenter(cellpose_model, None, HSPCSettings(), torch.device("cpu"))
        segmenter.flows(textured(6, 100, 100), PIXEL_UM)
    finally:
        hook.remove()
    assert seen == [False]


def test_bf16_network_as_loaded_on_gpus_matches_run_net(test_models_dir: Path) -> None:
    """With Cellpose-SAM's weights in bf16 (as ``use_bfloat16`` loads it on GPUs) the blocks go
    in as bf16 and come out as float32 exactly as Cellpose's ``_forward`` does (here on the
    CPU, which runs bf16 too)."""
    from bmseg.models.layout import read_manifest
    from bmseg.models.loading import load_cellpose

    manifest = read_manifest(test_models_dir)
    model = load_cellpose(test_models_dir / manifest.cellpose_checkpoint, torch.device("cpu"))
    model.net.dtype = torch.bfloat16
    tile = textured(7, 300, 280)
    image = stock_normalised(tile)
    stock, _ = core.run_net(
        model.net, image.transpose(1, 2, 0)[np.newaxis].copy(), batch_size=8, bsize=256
    )
    with torch.no_grad():
        ours = network_output(
            model.net, torch.from_numpy(image), block=256, overlap=0.1, batch_size=8
        )
    assert next(model.net.parameters()).dtype == torch.bfloat16
    np.testing.assert_allclose(ours.numpy(), stock[0].transpose(2, 0, 1), rtol=1e-3, atol=1e-3)
