"""Benchmark flows → masks: bmseg.flows.compute_masks against Cellpose 4's compute_masks.

Inputs are cells at the density of a marrow tile (7 000 cells on a 3000² tile): packed oval,
bilobed and kidney-shaped cells pressed into each other (``--cells packed``, the default) or
touching disks (``--cells disks``). Flows come from Cellpose's own ``masks_to_flows_gpu``:
tiles larger than ``--cellpose-flows-max`` are copies of one such tile side by side (labels
renumbered, flows copied: flows depend on each mask alone), because ``masks_to_flows`` itself
takes ~30 min on a 3000² tile here; with ``--cells disks`` larger tiles get analytic flows
(each pixel pointing at its cell's centre) instead. Cell probability is +5 / -5 logits from
the labels; the noise cases (``--noise``) add noise to flows and logits as a real network's
output has, smooth (σ 1.5 / 2 px) or white. Each
method runs in a fresh child process, warmed up on a 64² corner, and its peak memory is the
peak RSS of the call above the RSS before it (Linux only). Prints wall and CPU seconds, peak
memory, the ratio Cellpose / ours and AP@0.5 (cellpose.metrics.average_precision) against the
source labels and between the two methods. Cellpose's method runs on 10 000² only with a GPU.

    python benchmarks/flows.py                  # 1000², 3000², 10000²
    python benchmarks/flows.py --sizes 1000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bmseg.testing.flows import add_noise, network_output, packed_cells, touching_disks

CELLS_PER_PIXEL = 7000 / 3000**2


def _memory_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS now, VmHWM peak), MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _child(method: str, folder: Path, device: str) -> None:
    """Run one method on the saved inputs, save its masks and print its figures as JSON.

    A first call on a 64² corner warms up lazy initialisation (as in a long-running SEGMENT);
    then the peak-RSS mark is reset (Linux clear_refs), so the peak is the call's own.
    """
    from bmseg.flows import flows_to_masks

    flows = np.load(folder / "flows.npy")
    cellprob = np.load(folder / "cellprob.npy")
    flows_to_masks(flows[:, :64, :64].copy(), cellprob[:64, :64].copy(), method=method)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    before = _memory_mb("VmRSS")
    wall, cpu = time.perf_counter(), time.process_time()
    masks = flows_to_masks(flows, cellprob, method=method, device=device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = _memory_mb("VmHWM") - before
    np.save(folder / f"masks_{method}.npy", masks)
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "peak_mb": peak}))


def _run_child(method: str, folder: Path, device: str) -> dict:
    """Figures of one method, measured in a fresh Python process."""
    done = subprocess.run(
        [sys.executable, __file__, "--child", method, "--folder", str(folder), "--device", device],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _average_precision(truth: np.ndarray, predicted: np.ndarray) -> float:
    """AP at IoU 0.5: Cellpose's metric; above 10 000 masks (its dense IoU matrix would not fit)
    the same number from sparse overlaps, since matches with IoU > 0.5 are one-to-one."""
    n_truth, n_predicted = int(truth.max()), int(predicted.max())
    if max(n_truth, n_predicted) <= 10_000:
        from cellpose.metrics import average_precision

        return float(average_precision(truth, predicted.astype(np.int32), threshold=[0.5])[0][0])
    both = (truth > 0) & (predicted > 0)
    pair = truth[both].astype(np.int64) * (n_predicted + 1) + predicted[both]
    pair, overlap = np.unique(pair, return_counts=True)
    true_area = np.bincount(truth.ravel(), minlength=n_truth + 1)
    predicted_area = np.bincount(predicted.ravel(), minlength=n_predicted + 1)
    true_id, predicted_id = np.divmod(pair, n_predicted + 1)
    union = true_area[true_id] + predicted_area[predicted_id] - overlap
    matched = int((overlap > 0.5 * union).sum())
    return matched / (n_truth + n_predicted - matched)


#: Noise cases: name → (flows std in dP units, smoothing σ of flows and logits); logits std 3.
NOISE_CASES = {
    "clean": (0.0, (0.0, 0.0)),
    "smooth 0.5": (0.5, (1.5, 2.0)),
    "smooth 1": (1.0, (1.5, 2.0)),
    "white 1": (1.0, (0.0, 0.0)),
}


def _packed_tile(size: int, cellpose_flows_max: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Packed cells on a ``size``² tile and their Cellpose flows: one tile of at most
    ``cellpose_flows_max`` a side through masks_to_flows, repeated to fill larger tiles."""
    copies = int(np.ceil(size / cellpose_flows_max))
    side = int(np.ceil(size / copies))
    labels = packed_cells(side, round(CELLS_PER_PIXEL * side * side))
    flows, cellprob = network_output(labels, cellpose_flows=True)
    if copies == 1:
        return labels, flows, cellprob
    n_labels = int(labels.max())
    offsets = (np.arange(copies * copies, dtype=np.int32) * n_labels).reshape(copies, copies)
    tiled = np.tile(labels, (copies, copies))
    tiled += np.repeat(np.repeat(offsets, side, 0), side, 1) * (tiled > 0)
    crop = np.s_[:size, :size]
    return (
        tiled[crop],
        np.tile(flows, (1, copies, copies))[(slice(None), *crop)],
        np.tile(cellprob, (copies, copies))[crop],
    )


def benchmark(
    size: int,
    cells: str,
    noises: list[str],
    cellpose_flows_max: int,
    device: str,
    with_cellpose: bool,
) -> list[dict]:
    """Figures for one tile size, one row per noise case."""
    started = time.perf_counter()
    if cells == "packed":
        labels, clean_flows, clean_prob = _packed_tile(size, cellpose_flows_max)
        flows_kind = "cellpose masks_to_flows" + (
            f" on {cellpose_flows_max}² copies" if size > cellpose_flows_max else ""
        )
    else:
        labels = touching_disks(size, round(CELLS_PER_PIXEL * size * size))
        cellpose_flows = size <= cellpose_flows_max
        clean_flows, clean_prob = network_output(labels, cellpose_flows)
        flows_kind = "cellpose masks_to_flows" if cellpose_flows else "analytic (to centre)"
    flows_s = time.perf_counter() - started
    rows = []
    for noise in noises:
        std, smoothing = NOISE_CASES[noise]
        row = {
            "size": size,
            "cells": cells,
            "n_cells": int(labels.max()),
            "flows": flows_kind,
            "flows_s": flows_s,
            "noise": noise,
        }
        flows, cellprob = (
            add_noise(clean_flows, clean_prob, std, smoothing=smoothing)
            if std
            else (clean_flows, clean_prob)
        )
        with tempfile.TemporaryDirectory() as folder:
            np.save(Path(folder) / "flows.npy", flows)
            np.save(Path(folder) / "cellprob.npy", cellprob)
            del flows, cellprob
            methods = ("bmseg", "cellpose") if with_cellpose else ("bmseg",)
            masks = {}
            for method in methods:
                row[method] = _run_child(method, Path(folder), device)
                masks[method] = np.load(Path(folder) / f"masks_{method}.npy")
                row[method]["masks"] = int(masks[method].max())
                row[method]["ap50_truth"] = _average_precision(labels, masks[method])
        if with_cellpose:
            row["ap50_bmseg_vs_cellpose"] = _average_precision(masks["cellpose"], masks["bmseg"])
            row["speedup"] = row["cellpose"]["wall_s"] / row["bmseg"]["wall_s"]
            row["speedup_cpu_time"] = row["cellpose"]["cpu_s"] / row["bmseg"]["cpu_s"]
            row["memory_ratio"] = row["cellpose"]["peak_mb"] / max(row["bmseg"]["peak_mb"], 1e-3)
        _print_row(row)
        rows.append(row)
    return rows


def _print_row(row: dict) -> None:
    """One human-readable block per size."""
    print(
        f"{row['size']}² tile, {row['n_cells']} {row['cells']} cells, flows: {row['flows']}, "
        f"noise: {row['noise']}",
        flush=True,
    )
    for method in ("bmseg", "cellpose"):
        if method in row:
            figures = row[method]
            print(
                f"  {method:8s} wall {figures['wall_s']:8.2f} s  cpu {figures['cpu_s']:8.2f} s  "
                f"peak +{figures['peak_mb']:7.0f} MB  masks {figures['masks']:6d}  "
                f"AP50 vs truth {figures['ap50_truth']:.4f}",
                flush=True,
            )
    if "speedup" in row:
        print(
            f"  speed-up {row['speedup']:.1f}× wall ({row['speedup_cpu_time']:.1f}× cpu time), "
            f"memory Cellpose/ours {row['memory_ratio']:.1f}×, "
            f"AP50 ours vs Cellpose {row['ap50_bmseg_vs_cellpose']:.4f}",
            flush=True,
        )


def main() -> int:
    """Parse flags, run every size, print (and optionally save) the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 3000, 10000])
    parser.add_argument(
        "--cellpose-flows-max",
        type=int,
        default=1000,
        help="largest tile side whose input flows come from Cellpose's masks_to_flows",
    )
    parser.add_argument("--cells", choices=("packed", "disks"), default="packed")
    parser.add_argument(
        "--noise",
        nargs="+",
        choices=list(NOISE_CASES),
        default=list(NOISE_CASES),
        help="noise cases (flows std in dP units, smooth or white; logits std 3), see add_noise",
    )
    parser.add_argument(
        "--noise-max", type=int, default=3000, help="largest tile side run with noise"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.folder, args.device)
        return 0
    rows = []
    for size in args.sizes:
        with_cellpose = size <= 3000 or args.device != "cpu"
        noises = args.noise if size <= args.noise_max else ["clean"]
        rows += benchmark(
            size, args.cells, noises, args.cellpose_flows_max, args.device, with_cellpose
        )
    if args.json:
        from bmseg.storage import write_json

        write_json(rows, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
