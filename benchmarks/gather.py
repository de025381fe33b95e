"""Gathering 1 M cells (2048-d float16 embeddings) from batch outputs, against a naive gather.

Ours: ``bmseg gather`` end to end on B batch folders in SEGMENT's exact schema (one slide per
batch, 100 tiles of 3000 px each, random cells so some overlap across tile seams): seam
resolution, per-slide tables with embeddings, crops, GeoJSON, summary, plots.

Baseline (same run, same files): the naive way: each batch's table loaded whole with pandas
(embedding as per-row bytes), written back per slide with pandas, and the GeoJSON built with
one ``json.dumps`` per cell. It is timed on one batch and scaled by the number of batches;
it does no seam resolution at all, so it flatters the baseline.
The crops in these batch folders are tiny placeholders, so crop copying costs little here.

Run: ``python benchmarks/gather.py [--cells 1000000 --batches 8 --work DIR]``
(~5 GB of disk for 1 M cells).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from bmseg.cli import main as bmseg
from bmseg.testing.cells import random_cells, write_batch, write_plan

CHUNK = 32768


def make_batches(work: Path, n_cells: int, n_batches: int) -> list[Path]:
    """One batch folder per slide, each with n_cells / n_batches cells, and the plans."""
    dirs = []
    per_batch = n_cells // n_batches
    for batch in range(n_batches):
        slide = f"slide{batch:02d}"
        tables = [
            random_cells(min(CHUNK, per_batch - start), slide_id=slide, seed=batch * 1000 + i)
            for i, start in enumerate(range(0, per_batch, CHUNK))
        ]
        dirs.append(write_batch(work / f"batch_{batch:04d}", tables, batch=batch))
        write_plan(work / "plans", slide, tissue_area_mm2=20.0, tiles_kept=100)
    return dirs


def naive_seconds(batch_dir: Path, work: Path, n_batches: int) -> float:
    """pandas load + pandas write + json.dumps per cell for one batch, scaled to all."""
    import pandas as pd

    start = time.perf_counter()
    frame = pd.read_parquet(batch_dir / "cells.parquet")
    frame.to_parquet(work / "naive.cells.parquet")
    measurements = [c for c in frame.columns if c.startswith(("intensity_", "area_um2", "score"))]
    with open(work / "naive.geojson", "w", encoding="utf-8") as handle:
        features = []
        for row in frame.itertuples(index=False):
            ring = [
                [float(x), float(y)]
                for x, y in zip(row.contour_x_px, row.contour_y_px, strict=True)
            ]
            features.append(
                json.dumps(
                    {
                        "type": "Feature",
                        "id": row.cell_uid,
                        "geometry": {"type": "Polygon", "coordinates": [[*ring, ring[0]]]},
                        "properties": {
                            "objectType": "detection",
                            "classification": {"name": row.cell_type},
                            "measurements": {m: float(getattr(row, m)) for m in measurements},
                        },
                    }
                )
            )
        handle.write('{"type":"FeatureCollection","features":[' + ",".join(features) + "]}")
    return (time.perf_counter() - start) * n_batches


def _cpu_seconds() -> float:
    """CPU time of this process, all threads, user + system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(n_cells: int, n_batches: int, work: Path) -> dict:
    start = time.perf_counter()
    dirs = sorted(work.glob("batch_*"))
    if len(dirs) != n_batches:  # a --work folder of an earlier run is reused
        dirs = make_batches(work, n_cells, n_batches)
    make_s = time.perf_counter() - start
    start = time.perf_counter()
    cpu_start = _cpu_seconds()
    out = work / "gathered"
    code = bmseg(
        ["-q", "gather", *map(str, dirs), "--plans", str(work / "plans"), "--out", str(out)]
    )
    ours_s = time.perf_counter() - start
    ours_cpu_s = _cpu_seconds() - cpu_start
    assert code == 0, "bmseg gather failed"
    record = json.loads((out / "gather.json").read_text())
    baseline_s = naive_seconds(dirs[0], work, n_batches)
    gathered_gb = sum(p.stat().st_size for p in out.glob("*.cells.parquet")) / 1e9
    return {
        "cells": record["cells_read"],
        "cells_kept": record["cells_kept"],
        "duplicates_removed": record["duplicates_removed"],
        "pairs_compared": record["pairs_compared"],
        "batches": n_batches,
        "make_data_s": make_s,
        "ours_s": ours_s,
        "ours_cells_per_s": record["cells_read"] / ours_s,
        "ours_cpu_s": ours_cpu_s,
        "gathered_tables_gb": gathered_gb,
        "geojson_gb": sum(p.stat().st_size for p in out.glob("*.geojson")) / 1e9,
        "baseline_s_scaled": baseline_s,
        "ratio": baseline_s / ours_s,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "rows_per_group": pq.ParquetFile(next(out.glob("*.cells.parquet")))
        .metadata.row_group(0)
        .num_rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=1_000_000)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--work", type=Path, help="working directory (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bmseg-gather-bench-"))
    try:
        figures = run(args.cells, args.batches, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(figures, indent=2))
    print(
        f"gather {figures['cells']:,} cells: {figures['ours_s']:.1f} s "
        f"({figures['ours_cpu_s']:.0f} CPU s) "
        f"({figures['ours_cells_per_s']:,.0f} cells/s, {figures['duplicates_removed']:,} seam "
        f"duplicates from {figures['pairs_compared']:,} pairs compared); naive baseline "
        f"{figures['baseline_s_scaled']:.0f} s scaled; ratio {figures['ratio']:.1f}x"
    )


if __name__ == "__main__":
    main()
