"""Benchmark the demo model: build it (`bmseg models make-demo`, timed), then run the pipeline's
commands on an unseen synthetic slide per modality (the README walk-through's size and tiles by
default) and score the HSPCs it finds by centroid.

For each modality: `bmseg synth` (a layout no make-demo seed reaches), `bmseg plan`, `bmseg batch`,
`bmseg segment` with the demo folder (Cellpose-SAM, the random SAM2 for MKs and refinement, the
area filter), `bmseg gather`; then the gathered HSPCs are matched one-to-one to the planted ones
whose centroid lies within ``--radius-px`` (maximum bipartite matching): precision, recall, F1.
Prints the build time, its validation AP@0.5 and the machine's load average around each phase.

    python benchmarks/demo_model.py                           # builds into a temporary folder
    python benchmarks/demo_model.py --models demo-models      # reuse a make-demo folder
    python benchmarks/demo_model.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from bmseg.cli import main as bmseg
from bmseg.contract import MODALITIES
from bmseg.models.training import centroid_matches

UNSEEN_SEED = 4242


def run(*args: object) -> None:
    """One bmseg command; a failure stops the benchmark."""
    code = bmseg(["-q", *map(str, args)])
    if code:
        raise SystemExit(f"bmseg {args[0]} failed with exit code {code}")


def load() -> str:
    """The 1, 5 and 15 minute load averages."""
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def score_slide(
    models: Path, work: Path, modality: str, side: int, tile_px: int, radius_px: float
) -> dict:
    """Run synth → plan → batch → segment → gather on one unseen slide; score its HSPCs."""
    slide = work / f"unseen_{modality}.czi"
    from bmseg.synth import write_synthetic_slide

    truth = pq.read_table(write_synthetic_slide(slide, side, side, UNSEEN_SEED, modality))
    run("plan", slide, "--tile-size", tile_px, "--out", work / f"plan_{modality}")
    run(
        "batch",
        *sorted((work / f"plan_{modality}").glob("*.tiles.parquet")),
        "--out",
        work / f"batches_{modality}",
    )
    batch_dirs = []
    started = time.perf_counter()
    for batch in sorted((work / f"batches_{modality}").glob("batch_*.parquet")):
        out = work / f"seg_{modality}_{batch.stem}"
        run(
            "segment",
            batch,
            "--slides",
            slide,
            "--models",
            models,
            "--out",
            out,
            "--device",
            "cpu",
            "--no-progress",
        )
        batch_dirs.append(out)
    segment_s = time.perf_counter() - started
    run(
        "gather",
        *batch_dirs,
        "--plans",
        work / f"plan_{modality}",
        "--out",
        work / f"gathered_{modality}",
    )
    (cells_path,) = sorted((work / f"gathered_{modality}").glob("*.cells.parquet"))
    cells = pq.read_table(cells_path, columns=["cell_type", "centroid_x_px", "centroid_y_px"])
    found = cells.filter(cells["cell_type"].to_numpy(zero_copy_only=False) == "HSPC")
    planted = truth.filter(truth["cell_type"].to_numpy(zero_copy_only=False) == "HSPC")

    def xy(table):
        import numpy as np

        return np.column_stack(
            [table["centroid_x_px"].to_numpy(), table["centroid_y_px"].to_numpy()]
        )

    matched = centroid_matches(xy(planted), xy(found), radius_px)
    precision = matched / max(found.num_rows, 1)
    recall = matched / max(planted.num_rows, 1)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "modality": modality,
        "slide_px": side,
        "planted_hspc": planted.num_rows,
        "found_hspc": found.num_rows,
        "matched": matched,
        "precision": round(precision, 3),
        "recall": round(recall, 3),
        "f1": round(f1, 3),
        "segment_s": round(segment_s, 1),
        "load": load(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, help="an existing make-demo folder (else built)")
    parser.add_argument("--side", type=int, default=2400, help="unseen slide side, px (2400)")
    parser.add_argument(
        "--tile-size", type=int, default=1200, help="PLAN's tile size, px (1200, as README's)"
    )
    parser.add_argument(
        "--radius-px",
        type=float,
        default=15.0,
        help="centroid match radius, px (15 ≈ 2.6 µm, under any HSPC's radius)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bmseg-demo-bench-") as tmp:
        work = Path(tmp)
        figures: dict = {"load_before": load()}
        models = args.models
        if models is None:
            models = work / "demo-models"
            started = time.perf_counter()
            run("models", "make-demo", "--dest", models, "--no-progress")
            figures["make_demo_s"] = round(time.perf_counter() - started, 1)
            figures["load_after_build"] = load()
        training = json.loads((models / "manifest.json").read_text())["training"]
        figures["training_s"] = training["seconds"]
        figures["validation_ap50"] = training["validation_ap50"]
        figures["threads"] = training["threads"]
        figures["slides"] = [
            score_slide(models, work, modality, args.side, args.tile_size, args.radius_px)
            for modality in MODALITIES
        ]
    print(json.dumps(figures, indent=2))
    if args.json:
        from bmseg.storage import write_json

        write_json(figures, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
