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
    python benchmarks/segment.py --host-only    # host work, networks instant

``--host-only`` runs SEGMENT (engine, real segmenters and embedder) with every network
swapped for an instant module and models the device thread's host work as its time in the
segmenters outside torch's kernel operators + 10 µs per kernel (:func:`run_host_only`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

PIXEL_SIZE_UM = 0.1725
CROP = 224
DEVICE_THREAD_MARK = "bmseg-device-thread"
CACHING_MALLOC = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(10**12),
    "MALLOC_TOP_PAD_": str(2**30),
    "OMP_NUM_THREADS": "1",
}
"""--host-only's environment: glibc serves large blocks from its heap and never gives freed
memory back (as a GPU's caching allocator keeps it), and torch's CPU operators run on the
calling thread, so that its CPU time holds them. One arena: a thread other than the main one
allocates from an arena of its own, which maps a block too large for it (over 64 MB) and
unmaps it on free whatever ``MALLOC_MMAP_MAX_`` says (6–10 ms of the device thread's CPU per
127 MB tensor freed, measured; 15 µs in the one arena)."""
LAUNCH_US = 10.0
"""--host-only's cost of launching one operator's kernel on a GPU, in µs."""


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


def drawn_cells(contours: list[np.ndarray], windows) -> list:
    """Per window (slide px), the (N, 2) x, y polygons ``contours`` drawn as a label image."""
    import cv2

    from bmseg.models.base import Detections

    contours = [np.rint(c).astype(np.int32) for c in contours]
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


def marrow_everywhere(width: int, height: int, seed: int):
    """A ``bmseg.synth`` marrow-density layout that is tissue from edge to edge, so every tile
    carries production load (~7 000 cells per 3000² core); a drawn slide's tissue blobs leave
    no 3616² window wholly in tissue below ~15 000² px."""
    from bmseg.synth import SyntheticLayout

    class MarrowEverywhere(SyntheticLayout):
        def tissue_mask(self, x: int, y: int, w: int, h: int, step: int = 1) -> np.ndarray:
            rows, columns = y + np.arange(0, h, step), x + np.arange(0, w, step)
            inside_rows = (rows >= 0) & (rows < self.height)
            return inside_rows[:, None] & ((columns >= 0) & (columns < self.width))[None, :]

    return MarrowEverywhere(width, height, seed, "brightfield", "marrow")


class GilProbe:
    """Stands for the device thread's kernel launches: a thread that releases the GIL (as a
    CUDA wait does) every millisecond and records how long it then waits to run again, i.e.
    what the other Python threads cost a thread that drives the device."""

    def __init__(self) -> None:
        self.waits: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.perf_counter()
            time.sleep(0.001)
            self.waits.append(time.perf_counter() - start - 0.001)

    def __enter__(self) -> GilProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class SegmenterClock:
    """Wraps the segmenters the engine calls on its device thread: sums that thread's CPU time
    and wall time inside them and, when ``ops`` is given (:class:`op_clock.OpClock`), runs
    them under it."""

    def __init__(self, ops=None) -> None:
        self.ops = ops
        self.cpu_ns = 0
        self.wall_ns = 0

    def wrap(self, segment):
        def run(*args, **kwargs):
            start, wall_start = time.thread_time_ns(), time.perf_counter_ns()
            if self.ops is None:
                result = segment(*args, **kwargs)
            else:
                with self.ops:
                    result = segment(*args, **kwargs)
            self.cpu_ns += time.thread_time_ns() - start
            self.wall_ns += time.perf_counter_ns() - wall_start
            return result

        return run


def device_thread_op_wall(prof) -> float:
    """From a CPU torch.profiler run: the summed self time (s, by the clock) of the torch
    operators recorded on the thread that recorded :data:`DEVICE_THREAD_MARK`."""
    events = prof.events()
    thread = next(e.thread for e in events if e.name == DEVICE_THREAD_MARK)
    return (
        sum(
            e.self_cpu_time_total
            for e in events
            if e.thread == thread and not e.is_user_annotation and e.name != DEVICE_THREAD_MARK
        )
        / 1e6
    )


def run_host_only(args: argparse.Namespace) -> None:
    """SEGMENT on production-density tiles with the real segmenters and embedder, their
    networks swapped for instant modules (``instant_networks.instant_models``): the host work of the
    calling (device) thread, and the CPU seconds of the reader, worker and writer threads and
    of the measuring processes.

    On a CPU the torch operators the device thread runs are the compute a GPU runs as kernels
    (flows → masks, block stitching, filters, painting), so the host work a GPU would leave on
    that thread is its time inside the segmenters outside their operators, plus 10 µs
    (:data:`LAUNCH_US`) per operator that is not a view (one launch each). The batch runs
    2 + ``--repeats`` + 1 times on the same tiles (the stage and thread figures printed are
    the last run's):
    first untimed, as the warm-up a SEGMENT task's first tiles give the rest of its batch (the
    heap grows, block layouts and prompt encodings are made once), then

    1. under ``op_clock.OpClock``: the operators as a GPU would be asked for
       them (their count gives the launches) and the thread's CPU time inside them. The
       clock's Python costs the thread CPU time of its own, partly inside the operators and
       partly outside, so the host work lies between (run 3's CPU − operators' CPU) and (run
       1's CPU − operators' CPU), launches added to both, and both are printed;
    2. under torch.profiler (operators timed in C++, ~1 µs each), ``--repeats`` times: the
       time between the operators by the clock. Waits for the core or the GIL that fall
       inside an operator lengthen it and the segmenters' time alike and cancel; those
       between operators only add, so the least of the runs is kept. It, plus the views' CPU
       time (views launch no kernel on a GPU, so what they cost stays host work) and the
       launches of the other operators, is the figure printed last. (Each run's time between
       the operators scaled by the thread's CPU / wall share is printed too: that takes waits
       to fall between and inside operators alike, which noise can bend either way.)
    3. plain: the device thread's CPU time in the segmenters.

    ``main`` runs the process with glibc keeping freed memory (:data:`CACHING_MALLOC`), as
    the CUDA caching allocator keeps device memory: otherwise every free of a large tensor on
    the CPU returns its pages to the kernel (3.1 ms per 40 MB tensor here, 6–10 ms per
    127 MB one on the device thread, between operators) and every new one faults them in
    again, work a GPU host does not do.
    """
    from bmseg.models.making import make_test_models
    from bmseg.plan import default_margin
    from bmseg.segment import SegmentOptions, Tile, hspc_windows, segment_batch
    from bmseg.slide import Rect
    from bmseg.synth import describe_channels, write_frames_czi
    from bmseg.synthetic import MOSAIC_TILE
    from instant_networks import instant_models
    from op_clock import OpClock

    size, margin = args.tile_size, default_margin(PIXEL_SIZE_UM)
    width, height = args.tiles * size + 2 * margin, size + 2 * margin
    layout = marrow_everywhere(width, height, args.seed)
    tiles = [
        Tile(
            "marrow",
            f"t{index}",
            Rect(margin + index * size, margin, size, size),
            Rect(index * size, 0, size + 2 * margin, height),
            PIXEL_SIZE_UM,
        )
        for index in range(args.tiles)
    ]
    options = SegmentOptions(
        progress=False, device="cpu", gpu_batch_tiles=1, measure_processes=args.measure_processes
    )
    every_cell = [cell.outline for cell in layout.cells]
    truth = [
        d.labels for d in drawn_cells(every_cell, hspc_windows(tiles, options.hspc_max_area_um2))
    ]
    with tempfile.TemporaryDirectory(prefix="bmseg-host-") as scratch:
        work = Path(scratch)
        make_test_models(work / "models")
        mk, hspc, embedder, model_timer = instant_models(work / "models", truth, PIXEL_SIZE_UM)
        del truth
        slide = work / "marrow.czi"
        frames = [
            (
                x,
                y,
                layout.render(
                    Rect(x, y, min(MOSAIC_TILE, width - x), min(MOSAIC_TILE, height - y))
                ),
                {},
                0,
            )
            for y in range(0, height, MOSAIC_TILE)
            for x in range(0, width, MOSAIC_TILE)
        ]
        write_frames_czi(slide, frames, PIXEL_SIZE_UM)
        describe_channels(slide, [{"ContrastMethod": "Brightfield"}])
        del frames

        def batch(name: str) -> dict:
            return segment_batch(
                tiles,
                {"marrow": slide},
                mk,
                hspc,
                embedder,
                work / name,
                options,
                {"batch": 1},
                model_timer,
            )

        with GilProbe() as idle:
            time.sleep(1.0)
        plain, clock = SegmenterClock(), SegmenterClock(OpClock(by_caller=args.by_caller))
        segment_mk, segment_hspc = mk.segment, hspc.segment
        batch("warm-up")  # the heap grows to its size; layouts and caches are made once
        mk.segment, hspc.segment = clock.wrap(segment_mk), clock.wrap(segment_hspc)
        batch("clocked")
        profiled_runs = []  # (segmenter clock, operators' wall) per repeat
        for repeat in range(args.repeats):
            profiled = SegmenterClock()
            mk.segment, hspc.segment = profiled.wrap(segment_mk), profiled.wrap(segment_hspc)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                with torch.profiler.record_function(DEVICE_THREAD_MARK):
                    pass  # the profiler numbers threads its own way: this names the device one
                batch(f"profiled-{repeat}")
            profiled_runs.append((profiled, device_thread_op_wall(prof)))
            del prof
        mk.segment, hspc.segment = plain.wrap(segment_mk), plain.wrap(segment_hspc)
        process_start, thread_start = time.process_time(), time.thread_time()
        wall_start = time.perf_counter()
        with GilProbe() as busy:
            summary = batch("out")
        wall = time.perf_counter() - wall_start
        device_thread = time.thread_time() - thread_start
        others = time.process_time() - process_start - device_thread
    per_tile = len(tiles)
    cells = sum(summary["cells"].values()) / per_tile
    print(
        f"{per_tile} tiles of {size}² (read {size + 2 * margin}²) wholly marrow, "
        f"{cells:.0f} cells per tile ({summary['cells']['HSPC'] / per_tile:.0f} HSPC; MK "
        f"candidates fail the filters on zero logits); {options.workers} workers, "
        f"{options.readers} readers, measuring on "
        f"{'processes' if options.measure_processes else 'the worker threads'}"
    )
    for stage, seconds in summary["timings_s"].items():
        print(f"stage {stage:9s} {seconds / per_tile:8.3f} s per tile (summed over threads)")
    for stage, seconds in summary["model_timings_s"].items():
        print(f"model stage {stage:20s} {seconds / per_tile:8.3f} s per tile")
    print(f"wall {wall / per_tile:.3f} s per tile")
    for name, probe in (("idle", idle), ("during the batch", busy)):
        waits = 1000 * np.asarray(probe.waits)
        print(
            f"GIL wait after a release, {name}: median {np.median(waits):.2f} ms, "
            f"p99 {np.percentile(waits, 99):.2f} ms ({len(waits)} releases)"
        )
    print(f"CPU of the reader, worker and writer threads: {others / per_tile:.3f} s per tile")
    measuring = summary["measure_cpu_s"] / per_tile
    where = "processes (not in the line above)" if options.measure_processes else "threads"
    print(f"CPU of measuring, on the {options.workers} worker {where}: {measuring:.3f} s per tile")
    ops = clock.ops
    if ops.by_caller is not None:
        print("device thread's operators by the bmseg function that called them, per tile:")
        for name, count in ops.by_caller.most_common(12):
            print(f"  {name:60s} {count / per_tile:8.0f}")
        print("CPU time before those operators (the clock's own included), ms per tile:")
        for name, gap_ns in ops.gap_ns_by_caller.most_common(12):
            print(f"  {name:60s} {gap_ns / 1e6 / per_tile:8.1f}")
        print("CPU time inside views, by view, ms per tile:")
        for name, view_ns in ops.view_ns_by_name.most_common(8):
            print(f"  {name:60s} {view_ns / 1e6 / per_tile:8.1f}")
    # Views launch nothing on a GPU and their (host) cost stays host work there.
    kernels, view_cpu = ops.ops - ops.views, ops.view_cpu_ns / 1e9
    op_cpu, launches = ops.op_cpu_ns / 1e9 - view_cpu, kernels * LAUNCH_US / 1e6
    lower = plain.cpu_ns / 1e9 - op_cpu + launches
    upper = clock.cpu_ns / 1e9 - op_cpu + launches
    between, shared = [], []  # per profiled run: between the operators by the clock (× CPU share)
    for profiled, op_wall in profiled_runs:
        wall, cpu = profiled.wall_ns / 1e9, profiled.cpu_ns / 1e9
        between.append(wall - op_wall)
        shared.append((wall - op_wall) * cpu / wall)
    best = int(np.argmin(between))
    (profiled, op_wall), host = profiled_runs[best], between[best] + view_cpu + launches
    wall, cpu = profiled.wall_ns / 1e9, profiled.cpu_ns / 1e9
    print(
        f"device thread: CPU {1000 * device_thread / per_tile:.0f} ms per tile, "
        f"{1000 * plain.cpu_ns / 1e9 / per_tile:.0f} ms of it in the segmenters; "
        f"{ops.ops / per_tile:.0f} operators per tile, {kernels / per_tile:.0f} of them kernels "
        f"({LAUNCH_US:.0f} µs each as GPU launches) and {ops.views / per_tile:.0f} views "
        f"({1000 * view_cpu / per_tile:.1f} ms of CPU, host work on a GPU too)"
    )
    print(
        f"operator clock: {1000 * clock.cpu_ns / 1e9 / per_tile:.0f} ms of CPU in the "
        f"segmenters, {1000 * op_cpu / per_tile:.0f} ms of it in kernel operators: host work "
        f"between {1000 * lower / per_tile:.0f} ms (CPU without the clock) and "
        f"{1000 * upper / per_tile:.0f} ms (with it) per tile"
    )

    def runs(gaps: list[float]) -> str:
        return ", ".join(f"{1000 * (gap + view_cpu + launches) / per_tile:.0f}" for gap in gaps)

    print(
        f"profiler, least of {len(between)} runs ({runs(between)} ms; × CPU share "
        f"{runs(shared)} ms): {1000 * wall / per_tile:.0f} ms in the segmenters by the clock, "
        f"{1000 * cpu / per_tile:.0f} ms of CPU, operators {1000 * op_wall / per_tile:.0f} ms "
        "by the clock; host work: between the operators by the clock, plus views and launches"
    )
    print(f"host work on the device thread: {1000 * host / per_tile:.0f} ms per tile")


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
        "--measure-processes",
        action="store_true",
        help="with --host-only: measure cells in worker processes (bmseg segment's flag)",
    )
    parser.add_argument(
        "--by-caller",
        action="store_true",
        help="with --host-only: count the device thread's operators by bmseg function (slower)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="with --host-only: profiled runs; the least host work is printed (noise only adds)",
    )
    parser.add_argument(
        "--host-only",
        action="store_true",
        help="SEGMENT's engine with instant networks on wholly-marrow tiles: host time only",
    )
    args = parser.parse_args()
    if args.host_only:
        if any(os.environ.get(name) != value for name, value in CACHING_MALLOC.items()):
            os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **CACHING_MALLOC})
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
