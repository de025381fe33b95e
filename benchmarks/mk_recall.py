"""MK prompt coverage: the share of MKs that hold at least one of SAM2's point prompts.

SAM2 proposes a mask only where a prompt falls, so an MK without a prompt inside is lost
whatever the weights. This counts, without any model, for the default tile (3000 px core +
PLAN's default margin on each side) at the production pixel size (0.1725 µm/px) and SAM2's
1024 px input, the share of MKs of 200, 300 and 400 µm² with a prompt inside: discs and
lobulated outlines (bmseg.synth's MK shapes), at random positions in the read window.

- before: the tile seen whole (one 3616 px window squeezed to 1024 px), 32 × 32 points;
- now: :class:`bmseg.models.MKSettings` defaults (windows at ≤ 2× downsampling, points spaced
  from the smallest MK area), through the segmenter's own :func:`mk_prompts`.

    python benchmarks/mk_recall.py [--shapes 4000 --seed 0 --json FILE]

The last line is ``MK prompt coverage at 200 µm²: X %`` for the defaults (goal ≥ 99 %).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

AREAS_UM2 = (200.0, 300.0, 400.0)
SAM2_INPUT = 1024


def mk_outlines(area_um2: float, pixel_size_um: float, count: int, rng: np.random.Generator):
    """``count`` outlines (N, 2) of ``area_um2`` around the origin: half discs, half lobulated."""
    from bmseg.synth import lobed_outline, polygon_area

    area_px = area_um2 / pixel_size_um**2
    outlines = []
    for index in range(count):
        if index % 2:
            theta, radius = lobed_outline(
                1.0, int(rng.integers(2, 6)), rng.uniform(0.08, 0.18), rng
            )
        else:
            theta, radius = np.linspace(0, 2 * np.pi, 96, endpoint=False), np.ones(96)
        unit = np.column_stack([radius * np.cos(theta), radius * np.sin(theta)])
        outlines.append(unit * math.sqrt(area_px / polygon_area(unit)))
    return outlines


def prompts(settings, tile_hw: tuple[int, int], pixel_size_um: float) -> np.ndarray:
    """Every point prompt the MK segmenter decodes on a tile, tile px (P, 2)."""
    import torch

    from bmseg.models.sam2_models import mk_prompts, window_points

    pairs = mk_prompts(tile_hw, settings, pixel_size_um, SAM2_INPUT)
    cpu = torch.device("cpu")
    return torch.cat([window_points(w, n, cpu) for w, n in pairs]).numpy(), len(pairs)


def coverage(points: np.ndarray, outlines, tile: int, rng: np.random.Generator) -> float:
    """Share of ``outlines`` placed at random in a ``tile`` px square holding a prompt."""
    import cv2

    order = np.argsort(points[:, 0])
    xs = points[order]
    hits = 0
    for outline in outlines:
        reach = np.abs(outline).max(axis=0)
        centre = rng.uniform(reach, tile - reach)
        polygon = outline + centre
        x0, y0 = np.floor(polygon.min(axis=0)).astype(int)
        x1, y1 = np.ceil(polygon.max(axis=0)).astype(int) + 1
        mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.fillPoly(mask, [np.round((polygon - (x0, y0)) * 16).astype(np.int32)], 1, shift=4)
        lo, hi = np.searchsorted(xs[:, 0], [x0, x1])
        near = xs[lo:hi]
        near = near[(near[:, 1] >= y0) & (near[:, 1] < y1)]
        pixel = np.floor(near).astype(int) - (x0, y0)  # the pixel a prompt falls in
        hits += bool(mask[pixel[:, 1], pixel[:, 0]].any()) if len(pixel) else 0
    return hits / len(outlines)


def main() -> None:
    from bmseg.models.settings import MKSettings
    from bmseg.plan import default_margin
    from bmseg.synth import PIXEL_SIZE_UM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=int, default=4000, help="MKs per area (4000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    tile = 3000 + 2 * default_margin(PIXEL_SIZE_UM)
    configs = {
        "before (tile seen whole, 32² points)": MKSettings(
            points_per_side=32, max_downsample=tile / SAM2_INPUT
        ),
        "now (defaults)": MKSettings(),
    }
    print(f"read window {tile} px (3000 + 2 × {default_margin(PIXEL_SIZE_UM)}), "
          f"{PIXEL_SIZE_UM} µm/px, SAM2 input {SAM2_INPUT} px, {args.shapes} MKs per area "
          "(half discs, half lobulated), random positions")  # fmt: skip
    header = "".join(f"{a:>10.0f} µm²" for a in AREAS_UM2)
    print(f"{'settings':<40}{'windows':>8}{'prompts':>9}{header}")
    figures = {}
    for name, settings in configs.items():
        points, windows = prompts(settings, (tile, tile), PIXEL_SIZE_UM)
        shares = []
        for area in AREAS_UM2:
            rng = np.random.default_rng([args.seed, int(area)])
            outlines = mk_outlines(area, PIXEL_SIZE_UM, args.shapes, rng)
            shares.append(coverage(points, outlines, tile, rng))
        figures[name] = {"windows": windows, "prompts": len(points), "coverage": shares}
        cells = "".join(f"{100 * s:>12.1f} %" for s in shares)
        print(f"{name:<40}{windows:>8}{len(points):>9}{cells}")
    if args.json:
        from bmseg.storage import write_json

        write_json(figures, args.json)
    print(f"MK prompt coverage at 200 µm²: {100 * figures['now (defaults)']['coverage'][0]:.1f} %")


if __name__ == "__main__":
    main()
