"""bmseg.flows: masks from Cellpose flows, against the source labels and Cellpose's own result.

Inputs are what a Cellpose network would output for known labels: flows made by Cellpose's own
masks_to_flows_gpu (on the CPU), cell probability from the labels, perfect or with smooth noise.
Images stay small because masks_to_flows_gpu and Cellpose's compute_masks are slow on the CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cellpose.metrics import average_precision
from scipy import ndimage

from bmseg.flows import (
    DEFAULT_FLOWS_METHOD,
    FLOWS_METHODS,
    cellpose_compute_masks,
    centre_flows,
    compute_masks,
    flows_to_labels,
    flows_to_masks,
    label_flows,
)
from bmseg.testing.flows import add_noise, network_output, packed_cells, touching_disks


def cellpose_flows(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Network output for ``labels``: 5 × Cellpose's diffusion flows, ±5 logits."""
    return network_output(labels, cellpose_flows=True)


def ap50(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Cellpose's AP at IoU 0.5."""
    return float(average_precision(truth, predicted, threshold=[0.5])[0][0])


def assert_label_image(masks: np.ndarray, shape: tuple[int, int]) -> None:
    """int32, right shape, labels exactly 1..n."""
    assert masks.dtype == np.int32
    assert masks.shape == shape
    present = np.unique(masks)
    assert np.array_equal(present[present > 0], np.arange(1, masks.max() + 1))


def disk(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    """Boolean disk."""
    yy, xx = np.indices(shape)
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


@pytest.fixture(scope="module")
def disks_case() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """50 touching disks on 192², their flows, and Cellpose's own masks for them."""
    labels = touching_disks(192, 50, seed=3)
    flows, cellprob = cellpose_flows(labels)
    return labels, flows, cellprob, cellpose_compute_masks(flows, cellprob)


@pytest.fixture(scope="module")
def coins_case() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Real object shapes: the coins photograph shipped with scikit-image, thresholded and
    labelled at half resolution (~20 irregular, partly touching objects of ~500 px)."""
    from skimage import data, filters, measure, morphology

    image = data.coins()[::2, ::2]
    edges = morphology.closing(filters.sobel(image) > 0.06, morphology.disk(1))
    foreground = ndimage.binary_opening(ndimage.binary_fill_holes(edges), iterations=2)
    labels = measure.label(foreground).astype(np.int32)
    flows, cellprob = cellpose_flows(labels)
    return labels, flows, cellprob, cellpose_compute_masks(flows, cellprob)


@pytest.mark.parametrize("case", ["disks_case", "coins_case"])
def test_at_least_cellpose_accuracy_and_agrees_with_it(case: str, request) -> None:
    labels, flows, cellprob, cellpose_masks = request.getfixturevalue(case)
    assert labels.max() >= 15  # the case really has many objects

    masks = compute_masks(flows, cellprob)

    assert_label_image(masks, labels.shape)
    assert ap50(labels, masks) >= ap50(labels, cellpose_masks)
    assert ap50(cellpose_masks, masks) >= 0.95


@pytest.mark.parametrize("noise", [1.0, 2.0])
def test_noisy_network_output_at_least_cellpose_accuracy(disks_case, noise: float) -> None:
    """Flows and probabilities with smooth noise, as a real network's: std ``noise`` in dP
    units (flows are 5 × unit vectors), 3 in logits."""
    labels, flows, cellprob, _ = disks_case
    noisy_flows, noisy_prob = add_noise(flows, cellprob, noise)

    ours = ap50(labels, compute_masks(noisy_flows, noisy_prob))
    theirs = ap50(labels, cellpose_compute_masks(noisy_flows, noisy_prob))

    assert ours >= theirs
    assert ours >= 0.5


@pytest.fixture(scope="module")
def packed_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """~70 packed oval, bilobed and kidney-shaped cells on 300² (production density, 7 000 per
    3000²), pressed into each other, and their flows."""
    labels = packed_cells(300, 70, seed=2)
    return (labels, *cellpose_flows(labels))


#: Noise on packed cells: flows std (dP units) and smoothing σ of flows and logits (logits std 3).
PACKED_NOISE = {
    "clean": (0.0, (0, 0)),
    "smooth 0.5": (0.5, (1.5, 2)),
    "smooth 1": (1.0, (1.5, 2)),
    "white 1": (1.0, (0, 0)),
}


@pytest.mark.parametrize("noise", PACKED_NOISE)
def test_packed_non_convex_cells_at_least_cellpose_accuracy(packed_case, noise: str) -> None:
    labels, flows, cellprob = packed_case
    assert labels.max() >= 60
    std, smoothing = PACKED_NOISE[noise]
    if std:
        flows, cellprob = add_noise(flows, cellprob, std, smoothing=smoothing)

    masks = compute_masks(flows, cellprob)
    cellpose_masks = cellpose_compute_masks(flows, cellprob)

    assert_label_image(masks, labels.shape)
    assert ap50(labels, masks) >= max(ap50(labels, cellpose_masks), 0.95)
    if not std:
        assert ap50(cellpose_masks, masks) == 1.0


def test_dips_in_cell_probability_do_not_split_cells(packed_case) -> None:
    """Noise on the logits leaves background specks inside cells; trajectories cross them to
    the cell's centre instead of stopping there as extra small masks (QC off, so nothing hides
    the fragments)."""
    labels, flows, cellprob = packed_case
    flows, cellprob = add_noise(flows, cellprob, 0.5)
    assert ((labels > 0) & (cellprob < 0)).sum() > 1000  # the specks are there

    masks = compute_masks(flows, cellprob, flow_threshold=0)
    cellpose_masks = cellpose_compute_masks(flows, cellprob, flow_threshold=0)

    assert ap50(labels, masks) >= max(ap50(labels, cellpose_masks), 0.8)


def test_torch_device_forms_agree(disks_case) -> None:
    _, flows, cellprob, _ = disks_case
    default = compute_masks(flows, cellprob)
    assert np.array_equal(compute_masks(flows, cellprob, device="cpu"), default)
    assert np.array_equal(compute_masks(flows, cellprob, device=torch.device("cpu")), default)


def test_thousands_of_touching_cells() -> None:
    labels = touching_disks(330, 1200, seed=5)  # ~10 px apart, every cell touching others
    flows, cellprob = cellpose_flows(labels)

    masks = compute_masks(flows, cellprob)
    cellpose_masks = cellpose_compute_masks(flows, cellprob)

    assert_label_image(masks, labels.shape)
    assert ap50(labels, masks) >= max(ap50(labels, cellpose_masks), 0.9)
    assert ap50(cellpose_masks, masks) >= 0.95


def test_no_cells() -> None:
    flows = np.zeros((2, 64, 80), np.float32)
    for cellprob in (np.full((64, 80), -5.0), np.full((64, 80), np.nan)):
        masks = compute_masks(flows, cellprob)
        assert_label_image(masks, (64, 80))
        assert masks.max() == 0


def test_zero_or_nan_flows_make_no_cells_like_cellpose() -> None:
    cellprob = np.where(disk((64, 64), (32, 32), 20), 5.0, -5.0)
    for value in (0.0, np.nan):
        flows = np.full((2, 64, 64), value, np.float32)
        masks = compute_masks(flows, cellprob)
        assert masks.max() == 0
        assert cellpose_compute_masks(np.nan_to_num(flows), cellprob).max() == 0


def test_a_few_nan_flows_inside_a_cell_do_not_break_it(disks_case) -> None:
    labels, flows, cellprob, _ = disks_case
    holed = flows.copy()
    rng = np.random.default_rng(0)
    holed[:, rng.integers(0, 192, 200), rng.integers(0, 192, 200)] = np.nan

    assert ap50(labels, compute_masks(holed, cellprob)) >= 0.95


def test_one_cell_touching_every_border() -> None:
    labels = disk((64, 64), (32, 32), 40).astype(np.int32)  # clipped by all four borders
    assert labels[0].any() and labels[-1].any() and labels[:, 0].any() and labels[:, -1].any()
    flows, cellprob = cellpose_flows(labels)

    # Larger than max_size_fraction (0.4) of the image: dropped, as Cellpose drops it.
    assert compute_masks(flows, cellprob).max() == 0
    assert cellpose_compute_masks(flows, cellprob).max() == 0
    masks = compute_masks(flows, cellprob, max_size_fraction=1.0)
    assert masks.max() == 1
    assert ap50(labels, masks) == 1.0


def test_flow_threshold_drops_cells_whose_flows_disagree_with_their_mask() -> None:
    shape = (80, 160)
    labels = np.zeros(shape, np.int32)
    labels[disk(shape, (40, 40), 22)] = 1
    labels[disk(shape, (40, 120), 22)] = 2
    flows, cellprob = cellpose_flows(labels)
    # Turn the right cell's flows by 40°: pixels still spiral into its centre, but its flows
    # no longer match its mask's (squared error 2 - 2 cos 40° ≈ 0.47 > 0.4).
    angle = np.deg2rad(40)
    right = labels == 2
    dy, dx = flows[0][right], flows[1][right]
    flows[0][right] = np.cos(angle) * dy - np.sin(angle) * dx
    flows[1][right] = np.sin(angle) * dy + np.cos(angle) * dx

    checked = compute_masks(flows, cellprob)
    unchecked = compute_masks(flows, cellprob, flow_threshold=0)

    assert checked.max() == 1 and (checked > 0).sum() == (labels == 1).sum()
    assert unchecked.max() == 2
    assert ap50(cellpose_compute_masks(flows, cellprob), checked) == 1.0


def test_min_size_and_cellprob_threshold() -> None:
    shape = (64, 96)
    labels = np.zeros(shape, np.int32)
    labels[disk(shape, (32, 30), 15)] = 1
    labels[30:34, 70:74] = 2  # 16 px
    flows, cellprob = cellpose_flows(labels)
    cellprob = np.where(labels > 0, 2.0, -5.0)

    assert compute_masks(flows, cellprob, min_size=15).max() == 2
    assert compute_masks(flows, cellprob, min_size=17).max() == 1
    assert compute_masks(flows, cellprob, cellprob_threshold=2.5).max() == 0


def test_fills_holes_enclosed_by_one_mask_only() -> None:
    shape = (80, 160)
    labels = np.zeros(shape, np.int32)
    labels[disk(shape, (40, 40), 25)] = 1
    labels[40:, 90:150] = 2
    labels[20:40, 90:150] = 3
    hole_in_one = disk(shape, (30, 30), 2)  # inside cell 1, off its centre
    hole_between = np.zeros(shape, bool)
    hole_between[38:42, 110:114] = True  # straddles cells 2 and 3
    labels[hole_in_one | hole_between] = 0
    flows, cellprob = cellpose_flows(labels)

    filled = compute_masks(flows, cellprob)
    unfilled = compute_masks(flows, cellprob, fill_holes=False)
    cellpose_filled = cellpose_compute_masks(flows, cellprob)

    assert ap50(labels, unfilled) == 1.0
    assert (unfilled[hole_in_one] == 0).all()
    assert (filled[hole_in_one] == filled[40, 40]).all() and filled[40, 40] > 0
    assert (filled[hole_between] == 0).all()
    assert np.array_equal(filled > 0, cellpose_filled > 0)


def test_label_flows_keep_the_labels_on_the_device_and_leave_holes_to_the_cpu(
    monkeypatch,
) -> None:
    """SEGMENT's path: by bmseg.flows the label image comes back as an int32 tensor, equal to
    the unfilled masks, and no SciPy hole filling runs for it (that is the CPU workers' job);
    by Cellpose's method, Cellpose's own result."""
    import bmseg.flows

    shape = (64, 64)
    labels = np.zeros(shape, np.int32)
    labels[disk(shape, (32, 32), 20)] = 1
    hole = disk(shape, (28, 28), 2)
    labels[hole] = 0
    flows, cellprob = cellpose_flows(labels)
    unfilled = compute_masks(flows, cellprob, fill_holes=False)

    def forbidden(*args, **kwargs):
        raise AssertionError("hole filling ran on the device thread's path")

    monkeypatch.setattr(bmseg.flows, "fill_single_mask_holes", forbidden)
    on_device = flows_to_labels(
        torch.from_numpy(flows), torch.from_numpy(cellprob), "bmseg", device="cpu"
    )
    assert isinstance(on_device, torch.Tensor) and on_device.dtype == torch.int32
    assert np.array_equal(on_device.numpy(), unfilled) and (unfilled[hole] == 0).all()
    on_device = label_flows(torch.from_numpy(flows), torch.from_numpy(cellprob), device="cpu")
    assert np.array_equal(on_device.numpy(), unfilled)
    # The baseline stays Cellpose 4's own post-processing, its hole filling included.
    baseline = flows_to_labels(flows, cellprob, "cellpose", device="cpu")
    assert np.array_equal(baseline.numpy(), cellpose_compute_masks(flows, cellprob))


def test_centre_flows_point_at_the_centre_cellpose_uses() -> None:
    shape = (60, 60)
    labels = np.zeros(shape, np.int32)
    ring = disk(shape, (30, 30), 20) & ~disk(shape, (30, 30), 10)
    labels[ring] = 1  # centroid (30, 30) lies in the hole: Cellpose moves to the nearest pixel

    flows = centre_flows(labels)

    assert flows.dtype == np.float32
    assert np.all(flows[:, labels == 0] == 0)
    norms = np.hypot(*flows)[labels > 0]
    assert np.allclose(norms[norms > 0], 1.0, atol=1e-5)
    # Cellpose's centre: the ring pixel nearest to (30, 30), first in raster order: (20, 29).
    assert np.allclose(flows[:, 15, 29], [1.0, 0.0]) and np.allclose(flows[:, 20, 34], [0, -1])
    assert np.allclose(flows[:, 20, 29], 0.0)


def test_method_switch() -> None:
    assert DEFAULT_FLOWS_METHOD == "bmseg" and set(FLOWS_METHODS) == {"bmseg", "cellpose"}
    labels = touching_disks(96, 9, seed=1)
    flows, cellprob = cellpose_flows(labels)
    assert np.array_equal(
        flows_to_masks(flows, cellprob, min_size=20),
        compute_masks(flows, cellprob, min_size=20),
    )
    cellpose_masks = flows_to_masks(flows, cellprob, method="cellpose", min_size=20)
    assert_label_image(cellpose_masks, labels.shape)
    assert ap50(labels, cellpose_masks) == 1.0
    with pytest.raises(ValueError, match="unknown flows method"):
        flows_to_masks(flows, cellprob, method="watershed")


def test_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(2, H, W\)"):
        compute_masks(np.zeros((2, 10, 12)), np.zeros((10, 11)))
    with pytest.raises(ValueError, match="niter"):
        compute_masks(np.zeros((2, 10, 12)), np.zeros((10, 12)), niter=0)
