"""Benchmark PLAN on a large synthetic slide: wall time, tissue recall and background drop.

Makes (once, cached) a synthetic CZI of ``--size`` px a side (40 000 by default, ~3 GB),
then times the whole ``bmseg plan`` command as a user runs it (a fresh process, imports
included) ``--repeats`` times, and a naive baseline in the same run: every tile core read at
full resolution and thresholded on its own (what a per-tile tissue check without a
low-resolution read costs). Prints the ratio baseline / PLAN and, against the planted truth,
the share of tiles holding a planted cell that PLAN kept (recall) and the share of tiles
without any tissue that it dropped.

    python benchmarks/plan.py                       # 40 000², cache in the temp folder
    python benchmarks/plan.py --size 20000 --cache /scratch/bmseg-bench --repeats 5
    python benchmarks/plan.py --far-scenes          # two sections 200 000 px apart

``--far-scenes`` plans a CZI of two tissue sections (scenes) 200 000 px apart in the same
process twice: per scene (PLAN) and, as the baseline, as the one strip of their common
bounds (what PLAN did before it read scenes), and prints the thumbnail pixels that show each
section, the tiles laid, the tissue found against the planted area and the wall times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

import bmseg.plan as plan_module
from bmseg.plan import tile_grid
from bmseg.slide import Rect, Slide, open_slide
from bmseg.synth import (
    PIXEL_SIZE_UM,
    SyntheticLayout,
    describe_channels,
    section_image,
    write_frames_czi,
    write_synthetic_slide,
)


def synthetic(cache: Path, size: int, seed: int) -> tuple[Path, Path, float | None]:
    """The cached synthetic slide and truth, made if missing; seconds taken to make them."""
    slide = cache / f"synthetic_{size}_seed{seed}.czi"
    truth = cache / f"synthetic_{size}_seed{seed}.truth.parquet"
    if slide.is_file() and truth.is_file():
        return slide, truth, None
    started = time.perf_counter()
    write_synthetic_slide(slide, size, size, seed)
    return slide, truth, time.perf_counter() - started


def run_plan(slide: Path, out: Path, tile_size: int) -> float:
    """Seconds for one ``bmseg plan`` command in a fresh process."""
    command = [sys.executable, "-m", "bmseg.cli", "-q", "plan", str(slide), "--out", str(out)]
    started = time.perf_counter()
    subprocess.run([*command, "--tile-size", str(tile_size)], check=True)
    return time.perf_counter() - started


def naive_baseline(slide_path: Path, tile_size: int) -> float:
    """Seconds to read every tile core at full resolution and threshold it (no thumbnail)."""
    started = time.perf_counter()
    with open_slide(slide_path) as slide:
        grid = tile_grid(slide.bounds, tile_size, 0)
        for i in range(grid["row"].size):
            core = slide.read(grid["core_x"][i], grid["core_y"][i], grid["core_w"][i],
                              grid["core_h"][i])  # fmt: skip
            _ = (core.min(axis=2) < 230).mean()
    return time.perf_counter() - started


def recall_and_drop(out: Path, slide: Path, truth: Path, size: int, seed: int) -> dict:
    """Tiles with a planted centroid kept, and tiles without true tissue dropped."""
    info = json.loads((out / f"{slide.stem}.slide.json").read_text())
    table = pq.read_table(out / f"{slide.stem}.tiles.parquet")
    kept = set(zip(table.column("row").to_pylist(), table.column("col").to_pylist(), strict=True))
    grid = tile_grid(Rect(**info["bounds"]), info["tile_size"], info["margin"])
    cells = pq.read_table(truth, columns=["centroid_x_px", "centroid_y_px"])
    col = (np.array(cells.column("centroid_x_px")) // info["tile_size"]).astype(int)
    row = (np.array(cells.column("centroid_y_px")) // info["tile_size"]).astype(int)
    cell_tiles = set(zip(row.tolist(), col.tolist(), strict=True))
    layout = SyntheticLayout(size, size, seed)
    background = set()
    for i in range(grid["row"].size):
        x, y, w, h = (int(grid[k][i]) for k in ("core_x", "core_y", "core_w", "core_h"))
        if not layout.tissue_mask(x, y, w, h, step=16).any():
            background.add((int(grid["row"][i]), int(grid["col"][i])))
    return {
        "tiles_total": int(grid["row"].size),
        "tiles_kept": len(kept),
        "cells": cells.num_rows,
        "tiles_with_cells": len(cell_tiles),
        "recall": len(cell_tiles & kept) / len(cell_tiles),
        "background_tiles": len(background),
        "background_dropped": len(background - kept) / max(len(background), 1),
        "tissue_area_mm2": info["tissue_area_mm2"],
        "true_tissue_area_mm2": float(
            layout.tissue_mask(0, 0, size, size, step=16).mean()
            * (size * PIXEL_SIZE_UM / 1000) ** 2
        ),
    }


def far_scenes(cache: Path, gap: int = 200_000) -> None:
    """Per-scene PLAN against the one-strip baseline on two sections ``gap`` px apart."""
    sections = [
        section_image(6000, 8000, 1, background=238, tissue=150, channels=3),
        section_image(5000, 5000, 2, background=238, tissue=150, channels=3),
    ]
    planted = sum(float((s.mean(axis=2) < 194).sum()) for s in sections) * 0.25e-6
    slide = cache / "far_scenes.czi"
    if not slide.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        frames = [(0, 0, sections[0], {"C": 0}, 0), (gap, 4000, sections[1], {"C": 0}, 1)]
        write_frames_czi(slide, frames, 0.5)
        describe_channels(slide, [{"ContrastMethod": "Brightfield"}])
    results = {}

    def as_one_strip(*args, **kwargs) -> Slide:
        opened = open_slide(*args, **kwargs)
        opened.scenes = [opened.bounds]
        return opened

    for name, opener in (("per scene", open_slide), ("one strip", as_one_strip)):
        plan_module.open_slide = opener
        try:
            with tempfile.TemporaryDirectory() as tmp:
                started = time.perf_counter()
                info = plan_module.plan_slide(slide, tmp, tile_size=3000)
                results[name] = (time.perf_counter() - started, info)
        finally:
            plan_module.open_slide = open_slide
    for name, (seconds, info) in results.items():
        factor = info["thumbnail_downsample"]
        shown = [f"{round(s.shape[1] / factor)}x{round(s.shape[0] / factor)}" for s in sections]
        print(
            f"{name}: {seconds:.2f} s; thumbnail 1/{factor}, sections shown as "
            f"{' and '.join(shown)} px; tiles {info['tiles_kept']} kept of "
            f"{info['tiles_total']}; tissue {info['tissue_area_mm2']:.2f} mm² "
            f"(planted {planted:.2f} mm²)"
        )
    strip, scenes = results["one strip"][1], results["per scene"][1]
    tiles = strip["tiles_total"] / scenes["tiles_total"]
    downsampling = strip["thumbnail_downsample"] / scenes["thumbnail_downsample"]
    print(
        f"ratio one strip / per scene: tiles laid {tiles:.1f}x, "
        f"thumbnail downsampling {downsampling:.0f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=40_000, help="slide side, px (40000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tile-size", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(tempfile.gettempdir()) / "bmseg-bench",
        help="folder keeping the synthetic slide between runs",
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the naive baseline")
    parser.add_argument(
        "--far-scenes", action="store_true", help="per-scene planning against one strip"
    )
    args = parser.parse_args()
    if args.far_scenes:
        far_scenes(args.cache)
        return

    slide, truth, made = synthetic(args.cache, args.size, args.seed)
    print(f"slide: {slide} ({slide.stat().st_size / 1e9:.2f} GB), cores: {os.cpu_count()}")
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"load average before timing (1, 5, 15 min): {load}")
    if made is not None:
        print(f"synth {args.size}²: {made:.1f} s")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        times = [run_plan(slide, out, args.tile_size) for _ in range(args.repeats)]
        figures = recall_and_drop(out, slide, truth, args.size, args.seed)
    median = statistics.median(times)
    print(f"plan {args.size}² (tile {args.tile_size}): " + ", ".join(f"{t:.2f}" for t in times)
          + f" s; median {median:.2f} s (goal <= 10 s)")  # fmt: skip
    print(
        f"tiles kept {figures['tiles_kept']} of {figures['tiles_total']}; "
        f"recall of tiles with a planted cell {figures['recall']:.1%} "
        f"({figures['tiles_with_cells']} tiles, {figures['cells']} cells; goal 100 %); "
        f"background-only tiles dropped {figures['background_dropped']:.1%} "
        f"({figures['background_tiles']} tiles; goal >= 95 %)"
    )
    print(
        f"tissue area {figures['tissue_area_mm2']:.2f} mm² "
        f"(planted {figures['true_tissue_area_mm2']:.2f} mm²)"
    )
    if not args.no_baseline:
        baseline = naive_baseline(slide, args.tile_size)
        print(f"naive full-resolution per-tile baseline: {baseline:.2f} s; "
              f"ratio baseline / plan {baseline / median:.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
