"""Inputs for flows → masks: label images of touching disks and of packed cells of marrow-like
shapes (oval, bilobed, kidney-shaped), and what a perfect (or noisy) Cellpose network would
output for them.

For tests and benchmarks (tests/test_flows.py, benchmarks/flows.py), not for production.
"""

from __future__ import annotations

import numpy as np
import torch
from cellpose.dynamics import masks_to_flows_gpu
from scipy import ndimage
from skimage.measure import label as connected_regions

from bmseg.flows import centre_flows


def touching_disks(size: int, n_cells: int, seed: int = 0) -> np.ndarray:
    """(size, size) int32 labels: ``n_cells`` disks on a jittered grid, radius 0.62 × spacing
    ± 15 %, each clipped to its Voronoi cell so that neighbours touch."""
    rng = np.random.default_rng(seed)
    labels, distance, _, spacing = _voronoi(size, n_cells, rng, jitter=0.2)
    radius = 0.62 * spacing * rng.uniform(0.85, 1.15, n_cells + 1)
    labels[distance > radius[labels]] = 0
    return labels


def _voronoi(
    size: int, n_cells: int, rng: np.random.Generator, jitter: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Seeds on a grid jittered by ± ``jitter`` × spacing: per pixel the label (1..n) of its
    nearest seed and the distance to it, the seeds' (y, x) per label (row 0 unused) and the
    grid spacing."""
    per_side = int(np.ceil(np.sqrt(n_cells)))
    spacing = size / per_side
    grid_y, grid_x = np.divmod(rng.permutation(per_side * per_side)[:n_cells], per_side)
    centre_y = (grid_y + 0.5 + rng.uniform(-jitter, jitter, n_cells)) * spacing
    centre_x = (grid_x + 0.5 + rng.uniform(-jitter, jitter, n_cells)) * spacing
    seed_y = np.clip(centre_y.astype(np.int64), 0, size - 1)
    seed_x = np.clip(centre_x.astype(np.int64), 0, size - 1)
    not_seed = np.ones((size, size), bool)
    not_seed[seed_y, seed_x] = False
    distance, (nearest_y, nearest_x) = ndimage.distance_transform_edt(not_seed, return_indices=True)
    seed_label = np.zeros((size, size), np.int32)
    seed_label[seed_y, seed_x] = np.arange(1, n_cells + 1, dtype=np.int32)
    labels = seed_label[nearest_y, nearest_x]
    seeds = np.zeros((n_cells + 1, 2), np.float32)
    seeds[1:, 0], seeds[1:, 1] = seed_y, seed_x
    return labels, distance, seeds, spacing


#: Shapes :func:`packed_cells` draws, in the order of its ``shape`` codes.
CELL_SHAPES = ("oval", "bilobed", "kidney")


def packed_cells(size: int, n_cells: int, seed: int = 0) -> np.ndarray:
    """(size, size) int32 labels, 1..n: ``n_cells`` cells packed on a jittered grid, a third
    each oval (axes ±25 %), bilobed (two overlapping lobes, a waist between them) and
    kidney-shaped (an oval with a bite out of one long side, so its centroid can lie outside
    it), randomly turned, 0.75 × the grid spacing in radius so that neighbours press into each
    other, then clipped to their Voronoi cell. A cell left in pieces by the clipping keeps only
    its pieces as separate labels; pieces under 15 px become background."""
    rng = np.random.default_rng(seed)
    labels, distance, seeds, spacing = _voronoi(size, n_cells, rng, jitter=0.3)
    del distance
    # Per cell (index 0: background): centre, radius, orientation, shape.
    centre_y, centre_x = seeds[:, 0], seeds[:, 1]
    radius = 0.75 * spacing * rng.uniform(0.85, 1.15, n_cells + 1)
    angle = rng.uniform(0, np.pi, n_cells + 1)
    shape = rng.integers(0, len(CELL_SHAPES), n_cells + 1)
    elongation = rng.uniform(1.0, 1.25, n_cells + 1)
    yy, xx = np.indices((size, size), dtype=np.float32)
    dy = yy - centre_y[labels]
    dx = xx - centre_x[labels]
    del yy, xx
    cos, sin = np.cos(angle)[labels], np.sin(angle)[labels]
    along = (dx * cos + dy * sin) / radius[labels]
    across = (-dx * sin + dy * cos) / radius[labels]
    del dy, dx, cos, sin
    stretch = elongation[labels]
    kind = shape[labels]
    oval = (along / stretch) ** 2 + (across * stretch) ** 2 <= 1
    lobes = np.minimum((np.abs(along) - 0.42) ** 2, 1.0) + across**2 <= 0.58**2
    bite = (along / 0.55) ** 2 + ((across - 0.95) / 0.55) ** 2 <= 1
    inside = np.select([kind == 0, kind == 1], [oval, lobes], oval & ~bite)
    del along, across, stretch, kind, oval, lobes, bite
    labels[~inside | (labels == 0)] = 0
    pieces = connected_regions(labels, background=0, connectivity=1).astype(np.int32)
    sizes = np.bincount(pieces.ravel())
    pieces[sizes[pieces] < 15] = 0
    kept = np.unique(pieces)
    kept = kept[kept > 0]
    lookup = np.zeros(int(pieces.max()) + 1, np.int32)
    lookup[kept] = np.arange(1, kept.size + 1, dtype=np.int32)
    return lookup[pieces]


def network_output(labels: np.ndarray, cellpose_flows: bool) -> tuple[np.ndarray, np.ndarray]:
    """What a perfect Cellpose network would output for ``labels``: flows 5 × unit vectors
    (Cellpose's masks_to_flows_gpu, or straight at each cell's centre) and ±5 logits."""
    if cellpose_flows:
        unit, _ = masks_to_flows_gpu(labels, device=torch.device("cpu"))
    else:
        unit = centre_flows(labels)
    flows = (5.0 * unit).astype(np.float32)
    cellprob = np.where(labels > 0, 5.0, -5.0).astype(np.float32)
    return flows, cellprob


def add_noise(
    flows: np.ndarray,
    cellprob: np.ndarray,
    noise: float,
    seed: int = 7,
    smoothing: tuple[float, float] = (1.5, 2.0),
) -> tuple[np.ndarray, np.ndarray]:
    """Network output made imperfect like a real network's: Gaussian noise of std ``noise`` on
    the flows (dP units, 5 × unit vectors) and of std 3 on the logits, smoothed over
    ``smoothing`` px (σ for the flows, for the logits; 0: white noise, pixel by pixel)."""
    rng = np.random.default_rng(seed)
    flow_sigma, prob_sigma = smoothing
    flow_noise = ndimage.gaussian_filter(rng.normal(size=flows.shape), (0, flow_sigma, flow_sigma))
    prob_noise = ndimage.gaussian_filter(rng.normal(size=cellprob.shape), prob_sigma)
    noisy_flows = flows + flow_noise * (noise / flow_noise.std())
    noisy_prob = cellprob + prob_noise * (3 / prob_noise.std())
    return noisy_flows.astype(np.float32), noisy_prob.astype(np.float32)
