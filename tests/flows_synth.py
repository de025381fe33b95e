"""Inputs for flows → masks, shared by the flows tests and benchmark: touching disks and what
a perfect (or noisy) Cellpose network would output for them."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def touching_disks(size: int, n_cells: int, seed: int = 0) -> np.ndarray:
    """(size, size) int32 labels: ``n_cells`` disks on a jittered grid, radius 0.62 × spacing
    ± 15 %, each clipped to its Voronoi cell so that neighbours touch."""
    rng = np.random.default_rng(seed)
    per_side = int(np.ceil(np.sqrt(n_cells)))
    spacing = size / per_side
    grid_y, grid_x = np.divmod(rng.permutation(per_side * per_side)[:n_cells], per_side)
    centre_y = (grid_y + 0.5 + rng.uniform(-0.2, 0.2, n_cells)) * spacing
    centre_x = (grid_x + 0.5 + rng.uniform(-0.2, 0.2, n_cells)) * spacing
    seed_y = np.clip(centre_y.astype(np.int64), 0, size - 1)
    seed_x = np.clip(centre_x.astype(np.int64), 0, size - 1)
    not_seed = np.ones((size, size), bool)
    not_seed[seed_y, seed_x] = False
    distance, (nearest_y, nearest_x) = ndimage.distance_transform_edt(not_seed, return_indices=True)
    seed_label = np.zeros((size, size), np.int32)
    seed_label[seed_y, seed_x] = np.arange(1, n_cells + 1, dtype=np.int32)
    labels = seed_label[nearest_y, nearest_x]
    del nearest_y, nearest_x
    radius = 0.62 * spacing * rng.uniform(0.85, 1.15, n_cells + 1)
    labels[distance > radius[labels]] = 0
    return labels


def network_output(labels: np.ndarray, cellpose_flows: bool) -> tuple[np.ndarray, np.ndarray]:
    """What a perfect Cellpose network would output for ``labels``: flows 5 × unit vectors
    (Cellpose's masks_to_flows_gpu, or straight at each cell's centre) and ±5 logits."""
    if cellpose_flows:
        import torch
        from cellpose.dynamics import masks_to_flows_gpu

        unit, _ = masks_to_flows_gpu(labels, device=torch.device("cpu"))
    else:
        from bmseg.flows import centre_flows

        unit = centre_flows(labels)
    flows = (5.0 * unit).astype(np.float32)
    cellprob = np.where(labels > 0, 5.0, -5.0).astype(np.float32)
    return flows, cellprob


def add_noise(
    flows: np.ndarray, cellprob: np.ndarray, noise: float, seed: int = 7
) -> tuple[np.ndarray, np.ndarray]:
    """Network output made imperfect like a real network's: smooth Gaussian noise (σ 1.5 px) of
    std ``noise`` on the flows (dP units, 5 × unit vectors) and of std 3 on the logits."""
    rng = np.random.default_rng(seed)
    flow_noise = ndimage.gaussian_filter(rng.normal(size=flows.shape), (0, 1.5, 1.5))
    prob_noise = ndimage.gaussian_filter(rng.normal(size=cellprob.shape), 2)
    noisy_flows = flows + flow_noise * (noise / flow_noise.std())
    noisy_prob = cellprob + prob_noise * (3 / prob_noise.std())
    return noisy_flows.astype(np.float32), noisy_prob.astype(np.float32)
