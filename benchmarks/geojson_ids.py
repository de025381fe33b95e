"""Benchmark the QuPath feature ids of GATHER's GeoJSON: uuid5 of every cell uid.

Times ``gather.cell_uuids`` on ``--cells`` uids against the baseline in the same run, one
``str(uuid.uuid5(...))`` per cell, checks both give the same ids, and times
``qupath.write_geojson`` on the same cells (random circles in SEGMENT's schema) to show the
share of the ids in writing the file.

    python benchmarks/geojson_ids.py --cells 1000000
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from pathlib import Path

from bmseg.contract import EMBEDDING_COLUMN, feature_columns
from bmseg.qupath import CELL_UUID_NAMESPACE, cell_uuids, write_geojson
from bmseg.testing.cells import random_cells


def run(cells: int) -> dict:
    """Time the ids both ways and the whole GeoJSON of ``cells`` random cells."""
    meta = random_cells(cells, embedding_dim=8, seed=1).drop_columns([EMBEDDING_COLUMN])
    uids = meta["cell_uid"].combine_chunks()
    start = time.perf_counter()
    ours = cell_uuids(uids)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    values = uids.to_pylist()
    baseline = [str(uuid.uuid5(CELL_UUID_NAMESPACE, uid)) for uid in values]
    baseline_s = time.perf_counter() - start
    if ours.to_pylist() != baseline:
        raise AssertionError("cell_uuids differs from uuid.uuid5")
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        path = Path(folder) / "s.cells.geojson"
        write_geojson(meta, (0.0, 0.0), feature_columns(meta.schema), path)
        geojson_s = time.perf_counter() - start
        size_mb = path.stat().st_size / 1e6
    return {
        "cells": cells,
        "ids_s": ours_s,
        "ids_baseline_s": baseline_s,
        "ratio": baseline_s / ours_s,
        "geojson_s": geojson_s,
        "geojson_mb": size_mb,
        "ids_share_of_geojson": ours_s / geojson_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=1_000_000)
    figures = run(parser.parse_args().cells)
    print(json.dumps(figures, indent=2))
    print(
        f"uuid5 ids of {figures['cells']:,} cells: {figures['ids_s']:.2f} s "
        f"(per-cell uuid.uuid5 {figures['ids_baseline_s']:.2f} s, ratio {figures['ratio']:.1f}x); "
        f"whole GeoJSON {figures['geojson_s']:.1f} s, {figures['geojson_mb']:.0f} MB, "
        f"ids {100 * figures['ids_share_of_geojson']:.0f} % of it"
    )


if __name__ == "__main__":
    main()
