"""Benchmark SEGMENT's models: seconds per tile per stage, ours against a naive baseline.

Tiles are synthetic brightfield marrow (bmseg.synth) at the production pixel size. Both sides
run in the same process on the same loaded models, under the same precision (bf16 autocast on
GPUs that support it):

- ours: ``ModelSet.mk.segment`` (SAM2 over windows at ≤ 2× downsampling encoded in batches,
  prompts spaced from the smallest MK unless ``--points-per-side``, candidates pre-filtered at
  the decoder's 256² resolution, survivors upsampled inside their boxes, nested masks
  suppressed), ``ModelSet.hspc.segment`` (Cellpose-SAM network, bmseg.flows; SAM2 refinement
  off, the default) and one batched ResNet-50 pass over every planted cell's crop;
- baseline: the stock ``SAM2AutomaticMaskGenerator`` with binary masks and the same settings
  (32² points, pred_iou_thresh 0.5) followed by the area filter, ``CellposeModel.eval`` with its
  own post-processing, and one ResNet-50 forward per cell (the old script, without its per-cell
  SAM2 refinement, so the baseline is if anything flattered).

Without ``--models`` the production architectures are built with random weights in a temporary
folder (``bmseg models make-test --full-size``): their cost is the real one, but random SAM2
weights let few candidates through the filters, so ours does less upsampling than it would
with real weights; pass ``--models DIR`` with fetched weights for production figures.

    python benchmarks/segment.py                                      # 2 tiles of 3000², GPU
    python benchmarks/segment.py --tile-size 512 --points-per-side 8 --tiles 1   # a CPU
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

PIXEL_SIZE_UM = 0.1725
CROP = 224


def synthetic_tiles(count: int, size: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``count`` RGB tiles from one synthetic slide and, per tile, its planted cells' centres."""
    from bmseg.slide import Rect
    from bmseg.synth import SyntheticLayout

    # A frame of one tile all round, so the tiles come from the middle of the tissue.
    layout = SyntheticLayout(size * (count + 2), size * 3, seed, "brightfield")
    centres = np.array([cell.outline.mean(axis=0) for cell in layout.cells]).reshape(-1, 2)
    tiles, tile_centres = [], []
    for index in range(count):
        rect = Rect((index + 1) * size, size, size, size)
        tiles.append(layout.render(rect))
        local = centres - [rect.x, rect.y]
        inside = (local >= 0).all(axis=1) & (local < size).all(axis=1)
        tile_centres.append(local[inside].astype(np.int64))
    return tiles, tile_centres


def cut_crops(tile: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """(N, 224, 224, 3) crops centred on ``centres`` (x, y), zero-padded at the tile edge."""
    half = CROP // 2
    padded = np.pad(tile, ((half, half), (half, half), (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (CROP, CROP, 3))
    return np.ascontiguousarray(windows[centres[:, 1], centres[:, 0], 0])


class GpuBusy:
    """Mean GPU utilisation (%) sampled every 50 ms while active; None without NVML."""

    def __init__(self, device) -> None:
        import torch

        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = None
        if device.type == "cuda":
            try:
                torch.cuda.utilization(device)
            except Exception:  # no NVML / amdsmi: utilisation is not measurable here
                return
            self._thread = threading.Thread(target=self._run, args=(device,), daemon=True)

    def _run(self, device) -> None:
        import torch

        while not self._stop.wait(0.05):
            self.samples.append(float(torch.cuda.utilization(device)))

    def __enter__(self) -> GpuBusy:
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


def run_ours(models, tiles, centres) -> tuple[dict[str, float], float]:
    """Segment and embed all tiles the bmseg way; per-stage seconds and the GPU busy share."""
    models.timer.take()
    with GpuBusy(models.device) as busy:
        start = time.perf_counter()
        mk = models.mk.segment(tiles, PIXEL_SIZE_UM)
        hspc = models.hspc.segment(tiles, PIXEL_SIZE_UM)
        crops = np.concatenate([cut_crops(t, c) for t, c in zip(tiles, centres, strict=True)])
        models.embedder.embed(crops)
        total = time.perf_counter() - start
    stages = models.timer.take()
    stages["total"] = total
    found = sum(d.count for d in mk), sum(d.count for d in hspc)
    print(f"ours: {found[0]} MK, {found[1]} HSPC, {len(crops)} crops embedded")
    return stages, busy.mean


def run_baseline(models, tiles, centres, points_per_side: int) -> tuple[dict[str, float], float]:
    """The naive per-tile pipeline on the same models; per-stage seconds and GPU busy share."""
    import torch
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    from bmseg.models.device import inference
    from bmseg.models.settings import area_px

    mk_settings = models.mk.settings
    generator = SAM2AutomaticMaskGenerator(
        models.mk.engine.model,
        points_per_side=points_per_side,
        pred_iou_thresh=mk_settings.pred_iou_thresh,
        stability_score_thresh=mk_settings.stability_score_thresh,
        output_mode="binary_mask",
    )
    low = area_px(mk_settings.min_area_um2, PIXEL_SIZE_UM)
    high = area_px(mk_settings.max_area_um2, PIXEL_SIZE_UM)
    timer, device = models.timer, models.device
    timer.take()
    found = [0, 0]
    with GpuBusy(device) as busy:
        start = time.perf_counter()
        for tile, tile_centres in zip(tiles, centres, strict=True):
            with timer("baseline_sam2_amg"), inference(device):
                masks = generator.generate(tile)
                found[0] += sum(low <= m["area"] <= high for m in masks)
            with timer("baseline_cellpose_eval"):
                labels = models.hspc.cellpose.eval(tile, channel_axis=-1)[0]
                found[1] += int(labels.max())
            with timer("baseline_resnet_per_cell"), inference(device):
                mean, std = models.embedder.mean, models.embedder.std
                for crop in cut_crops(tile, tile_centres):
                    image = torch.from_numpy(crop).to(device).permute(2, 0, 1)[None].float()
                    models.embedder.net((image / 255.0 - mean) / std).float().cpu()
        total = time.perf_counter() - start
    stages = timer.take()
    stages["total"] = total
    print(f"baseline: {found[0]} MK, {found[1]} Cellpose cells")
    return stages, busy.mean


class InstantSegmenter:
    """Stands for a segmentation network: hands out label images drawn before the clock
    starts, in SEGMENT's call order, so what is timed is everything but the network."""

    def __init__(self, prepared: list) -> None:
        self._prepared = iter(prepared)

    def segment(self, tiles, pixel_size_um: float) -> list:
        return [next(self._prepared) for _ in tiles]


class InstantEmbedder:
    """Stands for ResNet-50: the production embedding size, zeros at once (crops are still cut)."""

    dim = 2048
    crop_size = CROP

    def embed(self, crops: np.ndarray) -> np.ndarray:
        return np.zeros((len(crops), self.dim), np.float32)


def drawn_cells(truth, windows) -> list:
    """Per window (slide px), the planted cells of ``truth`` drawn as a label image."""
    import cv2

    from bmseg.models.base import Detections

    contours = [np.stack(xy, axis=1).astype(np.int32) for xy in zip(*truth, strict=True)]
    out = []
    for window in windows:
        labels = np.zeros((window.h, window.w), np.int32)
        count = 0
        for contour in contours:
            local = contour - (window.x, window.y)
            if (local.max(axis=0) < 0).any() or (local.min(axis=0) >= (window.w, window.h)).any():
                continue
            count += 1
            cv2.drawContours(labels, [local.reshape(-1, 1, 2)], -1, count, thickness=-1)
        out.append(Detections(labels=labels, scores=np.ones(count, np.float32)))
    return out


def run_host_only(args: argparse.Namespace) -> None:
    """SEGMENT's engine on a production-density slide with instant networks: the host work of
    the calling (device) thread, and the CPU seconds of the reader and worker threads."""
    import pyarrow.parquet as pq

    from bmseg.cli import main as bmseg
    from bmseg.segment import SegmentOptions, hspc_windows, read_batch_table, segment_batch
    from bmseg.slide_args import match_slides
    from bmseg.storage import write_parquet

    with tempfile.TemporaryDirectory(prefix="bmseg-host-") as scratch:
        work = Path(scratch)
        slide = work / "marrow.czi"
        side = args.tile_size + 2 * 400
        size = ["--width", str(side * args.tiles), "--height", str(side)]
        synth = ["-q", "synth", str(slide), *size, "--seed", str(args.seed), "--density", "marrow"]
        assert bmseg(synth) == 0
        plan = ["-q", "plan", str(slide), "--out", str(work / "plans")]
        assert bmseg([*plan, "--tile-size", str(args.tile_size), "--min-tissue-fraction", "0"]) == 0
        tables = [str(p) for p in (work / "plans").glob("*.tiles.parquet")]
        assert bmseg(["-q", "batch", *tables, "--out", str(work / "b"), "--batch-size", "999"]) == 0
        table = pq.read_table(next((work / "b").glob("batch_*.parquet")))
        busiest = np.argsort(-table["tissue_fraction"].to_numpy())[: args.tiles]
        batch = write_parquet(table.take(np.sort(busiest)), work / "batch_0001.parquet")
        _, tiles = read_batch_table(batch)
        options = SegmentOptions(progress=False, device="cpu", gpu_batch_tiles=1)
        truth = pq.read_table(slide.with_name("marrow.truth.parquet"))
        types = np.asarray(truth["cell_type"].to_pylist())
        xs, ys = truth["contour_x_px"].to_pylist(), truth["contour_y_px"].to_pylist()
        contours = {
            kind: (
                [x for x, t in zip(xs, types, strict=True) if t == kind],
                [y for y, t in zip(ys, types, strict=True) if t == kind],
            )
            for kind in ("MK", "HSPC")
        }
        mk = InstantSegmenter(drawn_cells(contours["MK"], [t.read for t in tiles]))
        hspc_rects = hspc_windows(tiles, options.hspc_max_area_um2)
        hspc = InstantSegmenter(drawn_cells(contours["HSPC"], hspc_rects))
        slides = match_slides([t.slide_id for t in tiles], [str(slide)])
        process_start, thread_start = time.process_time(), time.thread_time()
        wall_start = time.perf_counter()
        summary = segment_batch(
            tiles, slides, mk, hspc, InstantEmbedder(), work / "out", options, {"batch": 1}
        )
        wall = time.perf_counter() - wall_start
        device_thread = time.thread_time() - thread_start
        others = time.process_time() - process_start - device_thread
    cells = sum(summary["cells"].values()) / len(tiles)
    print(f"{len(tiles)} tiles of {args.tile_size}² at marrow density, {cells:.0f} cells per tile")
    for stage, seconds in summary["timings_s"].items():
        print(f"stage {stage:9s} {seconds / len(tiles):8.3f} s per tile (summed over threads)")
    print(f"wall {wall / len(tiles):.3f} s per tile")
    print(f"CPU of the reader and worker threads: {others / len(tiles):.3f} s per tile")
    print(f"host work on the device thread: {1000 * device_thread / len(tiles):.0f} ms per tile")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, help="models directory (default: random weights)")
    parser.add_argument("--tiles", type=int, default=2, help="tiles in the batch")
    parser.add_argument("--tile-size", type=int, default=3000, help="tile side, px")
    parser.add_argument(
        "--points-per-side",
        type=int,
        default=None,
        help="SAM2 point grid per window side for ours (default: derived from the smallest MK)",
    )
    parser.add_argument(
        "--baseline-points-per-side", type=int, default=32, help="stock AMG grid side (32)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--seed", type=int, default=0, help="synthetic slide seed")
    parser.add_argument("--no-baseline", action="store_true", help="time ours only")
    parser.add_argument(
        "--no-warmup", action="store_true", help="skip the untimed first pass (GPU kernels)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--host-only",
        action="store_true",
        help="SEGMENT's engine with instant networks on a marrow-density slide: host time only",
    )
    args = parser.parse_args()
    if args.host_only:
        run_host_only(args)
        return

    from bmseg.models import MKSettings, load_models
    from bmseg.models.making import make_test_models
    from bmseg.storage import write_json

    tiles, centres = synthetic_tiles(args.tiles, args.tile_size, args.seed)
    with tempfile.TemporaryDirectory(prefix="bmseg-bench-") as scratch:
        models_dir = args.models
        if models_dir is None:
            models_dir = Path(scratch)
            make_test_models(models_dir, full_size=True)
        models = load_models(
            models_dir, args.device, mk_settings=MKSettings(points_per_side=args.points_per_side)
        )
    print(
        f"device {models.device}; {args.tiles} tiles of {args.tile_size}²; "
        f"SAM2 {models.manifest.sam2_config}; ours {args.points_per_side or 'derived'} points "
        f"per window side, baseline {args.baseline_points_per_side}² per tile; "
        f"{'random' if models.manifest.random_init else 'real'} weights"
    )
    if not args.no_warmup:  # kernels, allocator, autotuning; a copy, so SAM2's cache misses
        run_ours(models, [tiles[0].copy()], centres[:1])
    ours, ours_busy = run_ours(models, tiles, centres)
    figures = {
        "device": str(models.device),
        "tiles": args.tiles,
        "tile_size": args.tile_size,
        "points_per_side": args.points_per_side,
        "ours_s_per_tile": {k: v / args.tiles for k, v in ours.items()},
        "ours_gpu_busy_pct": ours_busy,
    }
    if not args.no_baseline:
        base, base_busy = run_baseline(models, tiles, centres, args.baseline_points_per_side)
        figures["baseline_s_per_tile"] = {k: v / args.tiles for k, v in base.items()}
        figures["baseline_gpu_busy_pct"] = base_busy
        figures["ratio"] = base["total"] / ours["total"]
    for side in ("ours", "baseline"):
        for stage, seconds in figures.get(f"{side}_s_per_tile", {}).items():
            print(f"{side:9s} {stage:26s} {seconds:9.3f} s/tile")
    for side in ("ours", "baseline"):
        busy = figures.get(f"{side}_gpu_busy_pct")
        if busy is not None:
            print(f"{side:9s} GPU busy {busy:.0f} %")
    if "ratio" in figures:
        print(f"ratio baseline / ours: {figures['ratio']:.1f}x")
    if args.json:
        write_json(figures, args.json)


if __name__ == "__main__":
    main()
