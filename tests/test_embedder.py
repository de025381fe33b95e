"""bmseg.models.embedder: crops cut on the device by roi_align go straight into ResNet-50 and
give the embeddings of the host crop path; batch norms folded give the unfolded network's
output. CPU, float32, the `make-test` ResNet-50 (random weights)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from bmseg.features import CropSampler
from bmseg.models.embedder import ResNetEmbedder, fold_batch_norms
from bmseg.models.settings import HSPC_CROP_SIZE
from bmseg.timing import StageTimer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def resnet(test_models_dir: Path) -> torch.nn.Module:
    from bmseg.models.layout import read_manifest, weight_path
    from bmseg.models.loading import load_resnet50

    manifest = read_manifest(test_models_dir)
    return load_resnet50(weight_path(test_models_dir, manifest.resnet50_weights), CPU)


def tile_and_squares(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 160² RGB tile and squares inside it, across its edges and larger than 64 px."""
    rng = np.random.default_rng(seed)
    tile = rng.integers(0, 256, (160, 160, 3), dtype=np.uint8)
    squares = np.array(
        [[10, 20, 40], [0, 0, 64], [-12, 100, 50], [130, 140, 45], [30, 30, 100], [70, 5, 33]]
    )
    return tile, squares


def test_device_crops_give_the_embeddings_of_the_roi_align_host_crops(resnet) -> None:
    """The GPU path (run here on the CPU) against today's: CropSampler's roi_align crops
    rounded to uint8 on the host, then uploaded and embedded."""
    tile, squares = tile_and_squares()
    embedder = ResNetEmbedder(resnet, CPU, StageTimer(CPU), crop_size=64, batch_size=4)
    host_crops = CropSampler(tile, device="cpu")._roi_align(squares, 64)
    expected = embedder.embed(host_crops)
    ours = embedder._embed_on_device(tile, squares, 64)
    assert ours.shape == (6, 2048) and ours.dtype == np.float32
    assert not np.allclose(expected[0], expected[1])
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)
    on_device_tile = embedder._embed_on_device(torch.from_numpy(tile), squares, 64)
    np.testing.assert_allclose(on_device_tile, ours, rtol=0, atol=0)


def test_cpu_keeps_the_opencv_crops(resnet, monkeypatch) -> None:
    import bmseg.models.embedder as embedder_module

    def forbidden(*args, **kwargs):
        raise AssertionError("roi_align's CPU kernel is slow: not on the CPU")

    monkeypatch.setattr(embedder_module, "roi_align", forbidden)
    tile, squares = tile_and_squares(1)
    embedder = ResNetEmbedder(resnet, CPU, StageTimer(CPU), crop_size=64, batch_size=4)
    expected = embedder.embed(CropSampler(tile, device="cpu").sample(squares, 64))
    np.testing.assert_array_equal(embedder.embed_squares(tile, squares), expected)


def test_hspc_crops_at_112_keep_the_embedding_size(resnet) -> None:
    tile, squares = tile_and_squares(2)
    embedder = ResNetEmbedder(resnet, CPU, StageTimer(CPU), crop_size=224, batch_size=8)
    small = embedder.embed_squares(tile, squares[:2], size=HSPC_CROP_SIZE)
    assert HSPC_CROP_SIZE == 112 and small.shape == (2, embedder.dim) == (2, 2048)
    assert np.isfinite(small).all()


def test_folded_batch_norms_give_the_same_output() -> None:
    from torchvision.models import resnet50

    torch.manual_seed(0)
    net = resnet50(weights=None)
    net.fc = torch.nn.Identity()
    with torch.no_grad():  # batch norms with statistics and affine maps of their own
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    net.eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        stock = net(images)
        assert fold_batch_norms(net) == 1 + 16 * 3 + 4
        folded = net(images)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert stock.abs().max() > 0.1
    torch.testing.assert_close(folded, stock, rtol=1e-4, atol=1e-4)


def test_upload_on_the_cpu_is_the_array_itself() -> None:
    from bmseg.models.transfer import upload

    tile, _ = tile_and_squares()
    tensor = upload(tile, CPU)
    assert tensor.dtype == torch.uint8 and np.shares_memory(tensor.numpy(), tile)


class _OverlapProbe(torch.nn.Module):
    """A stand-in network that counts how many threads are inside its forward at once."""

    def __init__(self) -> None:
        super().__init__()
        self.inside = 0
        self.most_inside = 0
        self._count = threading.Lock()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with self._count:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        time.sleep(0.02)
        with self._count:
            self.inside -= 1
        return torch.zeros((len(images), ResNetEmbedder.dim))


@pytest.mark.parametrize("compiled", [True, False])
def test_a_compiled_network_is_called_by_one_worker_thread_at_a_time(compiled: bool) -> None:
    """torch.compile'd modules are not thread-safe (pytorch issues 118260, 136833): with
    ``compiled`` the embedder's worker threads take turns at the network; eager, they overlap."""
    probe = _OverlapProbe()
    embedder = ResNetEmbedder(probe, CPU, StageTimer(CPU), 16, 4, compiled=compiled)
    crops = np.zeros((4, 16, 16, 3), np.uint8)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: embedder.embed(crops), range(8)))
    assert all(r.shape == (4, ResNetEmbedder.dim) for r in results)
    assert (probe.most_inside == 1) == compiled


class _SizeRecorder:
    """A square embedder whose embedding of each square is the crop side it was asked for."""

    dim = 2
    crop_size = 224

    def embed(self, crops: np.ndarray) -> np.ndarray:
        raise AssertionError("a square embedder is given squares")

    def embed_squares(self, rgb, squares, size=None) -> np.ndarray:
        return np.full((len(squares), self.dim), size or self.crop_size, np.float32)


@pytest.mark.parametrize("hspc_px", [None, 224, 112])
def test_hspc_crops_are_embedded_at_the_hspc_crop_side(hspc_px) -> None:
    """``--hspc-embed-px 112``: HSPC squares are resampled to 112² (same 2048-d embedding), MK
    squares stay at the embedder's 224²; rows keep the cells' order."""
    from bmseg.segment.cells import TileCells, embed_cells

    tile, squares = tile_and_squares()
    types = ["MK", "HSPC", "HSPC", "MK", "HSPC", "MK"]
    cells = TileCells(None, None, None, {"cell_type": types}, squares, tile, [], np.zeros(6))
    (out,) = embed_cells(_SizeRecorder(), [cells], 8, hspc_px=hspc_px)
    hspc = np.array(types) == "HSPC"
    assert (out[~hspc] == 224).all()
    assert (out[hspc] == (hspc_px or 224)).all()


def test_upload_takes_a_strided_window_without_copying_on_the_cpu() -> None:
    """The HSPC window is a view into the read window: on the CPU its tensor is that view (no
    numpy copy on the device thread), with the same pixels."""
    from bmseg.models.transfer import upload

    read = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    window = read[5:50, 7:70]
    tensor = upload(window, torch.device("cpu"))
    assert tensor.data_ptr() == window.__array_interface__["data"][0]
    assert np.array_equal(tensor.numpy(), window)
