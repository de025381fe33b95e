"""Applying classifiers to 1 M cells (2048-d float16 embeddings), against per-cell prediction.

Ours: ``bmseg classify`` on a gathered table of N synthetic cells in the exact cell-table
schema (20 % MK, 80 % HSPC), with MK and HSPC models that ``bmseg train`` made with its
defaults (RF vs HGB, 32 PCA components of the embedding) from 600 labelled cells; end to end:
read, predict, write the table with the new columns, summary, ranking.

Baseline (same run, same models, same file): the naive way the replaced script applied a
classifier: the table loaded with pandas (embedding as per-row bytes) and ``predict_proba``
called once per cell. It is timed on ``--baseline-cells`` cells of one row group and
extrapolated linearly to N (loading: one row group's share × row groups; prediction: mean per
cell × N). For context only, not measured: re-segmenting to apply a classifier, the old way,
took ~60 s per 3000×3000 tile of some 7,000 cells, i.e. ~2.4 h per million cells.

Run: ``python benchmarks/classify.py [--cells 1000000 --baseline-cells 300 --work DIR]``.
Needs ~5 GB of disk for 1 M cells and streams, so memory stays near one row group (~0.3 GB).
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

import numpy as np
import pyarrow.parquet as pq

from bmseg.classifiers.bundles import feature_matrix, load_model
from bmseg.cli import main as bmseg
from bmseg.testing.cells import random_cells, write_random_cells


def make_models(work: Path) -> Path:
    """Train MK and HSPC models from 600 labelled synthetic cells with bmseg train's defaults."""
    rng = np.random.default_rng(1)
    signal = (rng.random(600) < 0.5).astype(float)
    table = random_cells(600, slide_id="train", signal=signal, seed=5)
    (work / "train").mkdir(parents=True)
    pq.write_table(table, work / "train" / "train.cells.parquet")
    labels = [
        {
            "cell_uid": uid,
            "label": "yes" if s else "no",
            "annotator": "bench",
            "time": "2026-11-21T00:00:00Z",
        }
        for uid, s in zip(table["cell_uid"].to_pylist(), signal, strict=True)
    ]
    (work / "labels.json").write_text(json.dumps({"version": 1, "labels": labels}))
    models = work / "models"
    code = bmseg(
        ["-q", "train", str(work / "train"), str(work / "labels.json"), "--out", str(models)]
    )
    assert code == 0, "bmseg train failed"
    return models


def naive_seconds(cells_file: Path, models: Path, n_cells: int, sample: int) -> dict:
    """Per-cell prediction after a pandas load, timed on ``sample`` cells, scaled to N."""
    bundles = {b["cell_type"]: b for b in map(load_model, sorted(models.glob("*.skops")))}
    parquet = pq.ParquetFile(cells_file)
    start = time.perf_counter()
    frame = parquet.read_row_group(0).to_pandas()
    load_s = (time.perf_counter() - start) * n_cells / len(frame)
    rows = frame.head(sample)
    start = time.perf_counter()
    for _, row in rows.iterrows():
        bundle = bundles[row["cell_type"]]
        features = [row[name] for name in bundle["features"]]
        embedding = np.frombuffer(row["embedding"], "<f2")
        vector = np.concatenate([np.asarray(features, np.float32), embedding])
        bundle["pipeline"].predict_proba(vector[None, :].astype(np.float32))
    per_cell = (time.perf_counter() - start) / len(rows)
    return {"load_s": load_s, "predict_s": per_cell * n_cells, "per_cell_ms": per_cell * 1e3}


def check_against_batch_prediction(cells_file: Path, out_file: Path, models: Path) -> float:
    """Largest difference between ours and a direct predict_proba on the first row group."""
    bundle = load_model(models / "HSPC.skops")
    table = pq.ParquetFile(cells_file).read_row_group(0)
    ours = pq.ParquetFile(out_file).read_row_group(0, columns=["cell_type", "hspc_probability"])
    mask = np.array(table["cell_type"].to_pylist()) == "HSPC"
    direct = bundle["pipeline"].predict_proba(
        feature_matrix(table.filter(mask), bundle["features"])
    )[:, 1]
    return float(np.max(np.abs(ours["hspc_probability"].to_numpy()[mask] - direct)))


def _cpu_seconds() -> float:
    """CPU time of this process, all threads, user + system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _has_rows(path: Path, n_cells: int) -> bool:
    return path.is_file() and pq.ParquetFile(path).metadata.num_rows == n_cells


def run(n_cells: int, baseline_cells: int, work: Path) -> dict:
    """Make the data and models, time both approaches, return the figures."""
    start = time.perf_counter()
    cells_file = work / "gathered" / "bench.cells.parquet"
    if not _has_rows(cells_file, n_cells):  # a --work folder of an earlier run is reused
        write_random_cells(
            cells_file, n_cells, slide_id="bench", seed=3, width_px=200_000, height_px=200_000
        )
    make_s = time.perf_counter() - start
    models = work / "models" if (work / "models").is_dir() else make_models(work)
    start = time.perf_counter()
    cpu_start = _cpu_seconds()
    out = work / "classified"
    code = bmseg(
        ["-q", "classify", str(work / "gathered"), "--classifiers", str(models), "--out", str(out),
         "--ranking"]
    )  # fmt: skip
    ours_s = time.perf_counter() - start
    ours_cpu_s = _cpu_seconds() - cpu_start
    assert code == 0, "bmseg classify failed"
    naive = naive_seconds(cells_file, models, n_cells, baseline_cells)
    baseline_s = naive["load_s"] + naive["predict_s"]
    return {
        "cells": n_cells,
        "file_gb": cells_file.stat().st_size / 1e9,
        "make_data_s": make_s,
        "ours_s": ours_s,
        "ours_cells_per_s": n_cells / ours_s,
        "ours_cpu_s": ours_cpu_s,
        "baseline_s_extrapolated": baseline_s,
        "baseline_per_cell_ms": naive["per_cell_ms"],
        "baseline_sampled_cells": baseline_cells,
        "ratio": baseline_s / ours_s,
        "max_abs_diff_vs_direct_predict": check_against_batch_prediction(
            cells_file, out / cells_file.name, models
        ),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=1_000_000)
    parser.add_argument("--baseline-cells", type=int, default=300)
    parser.add_argument("--work", type=Path, help="working directory (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bmseg-classify-bench-"))
    try:
        figures = run(args.cells, args.baseline_cells, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(figures, indent=2))
    print(
        f"classify {figures['cells']:,} cells: {figures['ours_s']:.1f} s "
        f"({figures['ours_cells_per_s']:,.0f} cells/s, {figures['ours_cpu_s']:.0f} CPU s); "
        "naive per-cell baseline "
        f"{figures['baseline_s_extrapolated'] / 3600:.2f} h extrapolated "
        f"({figures['baseline_per_cell_ms']:.1f} ms/cell); ratio {figures['ratio']:,.0f}x"
    )


if __name__ == "__main__":
    main()
