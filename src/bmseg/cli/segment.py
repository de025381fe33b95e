"""``bmseg segment``: the command line of SEGMENT (:mod:`bmseg.segment`).

A GPU out of memory ends the command with :data:`bmseg.contract.GPU_OUT_OF_MEMORY_EXIT` and one
line, nothing written: the pipeline retries the task with half as many ``--gpu-batch-tiles``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bmseg.argtypes import add_slide_ids_and_models, switch
from bmseg.contract import GALLERY_CROP_PX, GPU_OUT_OF_MEMORY_EXIT
from bmseg.errors import BmsegError
from bmseg.models.choices import (
    ATTENTION_KINDS,
    DEFAULT_ATTENTION,
    DEVICE_CHOICES,
    FLOWS_METHODS,
)
from bmseg.models.settings import HSPC_CROP_SIZE, EmbedderSettings, HSPCSettings, MKSettings


def _run(args: argparse.Namespace) -> int:
    """Validate everything, load the models once, run the batch."""
    import torch  # the step's own imports, here so that building the parser stays cheap

    from bmseg.segment import segment_batch_file

    apply_task_resources(args)
    try:
        segment_batch_file(
            Path(args.batch),
            args.slides,
            Path(args.models),
            Path(args.out),
            slide_ids=args.slide_ids,
            plans=args.plans or (),
            device=args.device,
            mk=MKSettings(
                min_area_um2=args.mk_min_area_um2,
                max_area_um2=args.mk_max_area_um2,
                points_per_side=args.mk_points_per_side,
                max_downsample=args.mk_max_downsample,
                pred_iou_thresh=args.mk_pred_iou_thresh,
            ),
            hspc=HSPCSettings(
                min_area_um2=args.hspc_min_area_um2,
                max_area_um2=args.hspc_max_area_um2,
                flows_method=args.hspc_flows_method,
                refine=args.hspc_refine,
                refine_iou_thresh=args.hspc_refine_iou,
                diameter_um=args.hspc_diameter_um,
            ),
            embedder=EmbedderSettings(
                batch_size=args.embed_batch, hspc_crop_size=args.hspc_embed_px
            ),
            readers=args.readers,
            workers=args.workers,
            measure_processes=args.measure_processes,
            gpu_batch_tiles=args.gpu_batch_tiles,
            crop_px=args.crop_px,
            attention=args.attention,
            compile_networks=args.compile,
            progress=not args.no_progress,
        )
    except torch.OutOfMemoryError as error:
        reason = " ".join(str(error).split())[:200]
        sys.stderr.write(
            f"bmseg segment: error: the GPU ran out of memory at --gpu-batch-tiles "
            f"{args.gpu_batch_tiles} ({reason}); nothing written to {args.out}: retry with "
            f"--gpu-batch-tiles {max(1, args.gpu_batch_tiles // 2)} (exit "
            f"{GPU_OUT_OF_MEMORY_EXIT})\n"
        )
        return GPU_OUT_OF_MEMORY_EXIT
    return 0


def apply_task_resources(args: argparse.Namespace) -> None:
    """``--cpus`` and ``--attempt`` (a pipeline task's) turned into the options they set.

    Half the task's CPUs read tiles, half measure and embed cells; each earlier attempt (a
    GPU out-of-memory is retried) halves the tiles per GPU batch: 8, 4, 2, ... at least 1.
    """
    if args.cpus is not None:
        args.readers = args.workers = max(1, args.cpus // 2)
    if args.attempt < 1:
        raise BmsegError(f"--attempt {args.attempt}: must be at least 1")
    args.gpu_batch_tiles = max(1, args.gpu_batch_tiles // 2 ** (args.attempt - 1))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bmseg segment``."""
    parser = subparsers.add_parser(
        "segment",
        help="segment one batch of tiles: cells.parquet, masks.h5, crops.parquet, batch.json",
        description=(
            "Find MKs (SAM2) and HSPCs (Cellpose-SAM) in every tile of a batch, keep the "
            "cells whose centroid lies in the tile's core, measure and embed them."
        ),
    )
    parser.add_argument("batch", metavar="BATCH", help="batch table (batch_NNNN.parquet)")
    parser.add_argument(
        "--slides",
        nargs="+",
        required=True,
        metavar="SLIDE",
        help="slide files the batch touches, matched to slide ids by file name; ID=PATH binds "
        "a file to an id explicitly",
    )
    add_slide_ids_and_models(parser, "models directory")
    parser.add_argument(
        "--plans",
        nargs="+",
        metavar="SLIDE_JSON",
        help="the slides' {slide}.slide.json from bmseg plan: the modality and plane PLAN read, "
        "and each slide's intensity range for the models (default: the slide's own metadata, "
        "the first plane, each tile's own range)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument(
        "--device",
        default="auto",
        choices=DEVICE_CHOICES,
        help="compute device (auto: the GPU when torch sees one, CUDA or ROCm)",
    )
    parser.add_argument(
        "--mk-min-area-um2",
        metavar="UM2",
        type=float,
        default=MKSettings.min_area_um2,
        help="smallest MK kept, µm² (%(default)s)",
    )
    parser.add_argument(
        "--mk-max-area-um2",
        metavar="UM2",
        type=float,
        default=MKSettings.max_area_um2,
        help="largest MK kept, µm² (%(default)s)",
    )
    parser.add_argument(
        "--mk-points-per-side",
        metavar="N",
        type=int,
        default=MKSettings.points_per_side,
        help="SAM2 point grid per window side for MKs (default: one point per radius of the "
        "smallest MK, 36 per 2048 px window at 0.1725 µm/px)",
    )
    parser.add_argument(
        "--mk-max-downsample",
        metavar="F",
        type=float,
        default=MKSettings.max_downsample,
        help="largest downsampling SAM2 sees a tile at: windows of F x its input size "
        "(%(default)s)",
    )
    parser.add_argument(
        "--mk-pred-iou-thresh",
        metavar="IOU",
        type=float,
        default=MKSettings.pred_iou_thresh,
        help="SAM2 predicted-IoU threshold for MKs (%(default)s)",
    )
    parser.add_argument(
        "--hspc-min-area-um2",
        metavar="UM2",
        type=float,
        default=HSPCSettings.min_area_um2,
        help="smallest HSPC kept, µm² (%(default)s)",
    )
    parser.add_argument(
        "--hspc-max-area-um2",
        metavar="UM2",
        type=float,
        default=HSPCSettings.max_area_um2,
        help="largest HSPC kept, µm² (%(default)s)",
    )
    parser.add_argument(
        "--hspc-flows-method",
        "--hspc-flows",
        default=HSPCSettings.flows_method,
        choices=FLOWS_METHODS,
        help="how Cellpose flows become HSPC masks (%(default)s: the fast vectorised path)",
    )
    parser.add_argument(
        "--hspc-refine",
        action="store_true",
        help="refine HSPC masks with SAM2 box prompts on native-resolution windows (off: "
        "Cellpose's masks as they are; docs/models.md)",
    )
    parser.add_argument(
        "--hspc-refine-iou",
        metavar="IOU",
        type=float,
        default=HSPCSettings.refine_iou_thresh,
        help="with --hspc-refine: IoU with Cellpose's mask above which SAM2's mask is kept "
        "(%(default)s)",
    )
    parser.add_argument(
        "--hspc-diameter-um",
        metavar="UM",
        type=float,
        default=None,
        help="typical HSPC diameter, µm: Cellpose rescales the image so it is 30 px (default: "
        "no rescaling)",
    )
    parser.add_argument(
        "--attention",
        default=DEFAULT_ATTENTION,
        choices=ATTENTION_KINDS,
        help="Cellpose-SAM's attention: sdpa (the same function through fused "
        "scaled_dot_product_attention, the default) or stock (segment_anything's own)",
    )
    parser.add_argument(
        "--compile",
        nargs="?",
        const=True,
        default=False,
        type=switch,
        metavar="true|false",
        help="compile SAM2's encoder, Cellpose-SAM and ResNet-50 with torch.compile on a GPU "
        "(the first tiles pay the compilation; ignored on the CPU). Off by default",
    )
    parser.add_argument(
        "--readers", type=int, default=2, metavar="N", help="tile reader threads (2)"
    )
    parser.add_argument(
        "--workers",
        metavar="N",
        type=int,
        default=2,
        help="threads measuring and embedding segmented tiles while the device goes on (2)",
    )
    parser.add_argument(
        "--measure-processes",
        nargs="?",
        const=True,
        default=False,
        type=switch,
        metavar="true|false",
        help="measure cells in --workers processes instead of threads: free of the GIL the "
        "device thread needs, for hosts with many cores; each batch pays the processes' start "
        "(seconds) and each tile the copying of its arrays to them. Off by default",
    )
    parser.add_argument(
        "--gpu-batch-tiles",
        type=int,
        default=1,
        metavar="N",
        help="tiles per segmentation call (1)",
    )
    parser.add_argument(
        "--cpus",
        type=int,
        metavar="N",
        help="CPUs to use: half read tiles, half measure cells (sets --readers and --workers)",
    )
    parser.add_argument(
        "--attempt",
        type=int,
        default=1,
        metavar="N",
        help="a retry's attempt number: each earlier attempt (a GPU out-of-memory) halves "
        "--gpu-batch-tiles (1)",
    )
    parser.add_argument(
        "--hspc-embed-px",
        type=int,
        choices=(EmbedderSettings.crop_size, HSPC_CROP_SIZE),
        default=EmbedderSettings.hspc_crop_size,
        metavar="224|112",
        help="side HSPC crops are resampled to for ResNet-50: 224 as MKs (default) or 112, a "
        "quarter of the pixels for ~70 px cells; the embedding stays 2048-d",
    )
    parser.add_argument(
        "--embed-batch",
        metavar="N",
        type=int,
        default=EmbedderSettings.batch_size,
        help="cell crops per embedding forward pass (%(default)s)",
    )
    parser.add_argument(
        "--crop-px",
        metavar="PX",
        type=int,
        default=GALLERY_CROP_PX,
        help="largest side of a gallery JPEG crop, px (%(default)s)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(handler=_run)
