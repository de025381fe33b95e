"""``bmseg synth``: the command line of :func:`bmseg.synth.write_synthetic_slide`."""

from __future__ import annotations

import argparse
from pathlib import Path

from bmseg.contract import MODALITIES, SYNTH_DENSITIES


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bmseg synth``."""
    parser = subparsers.add_parser(
        "synth",
        help="write a synthetic CZI slide with planted MK/HSPC cells and its truth table",
        description="Write OUT.czi (a real CZI mosaic, 0.1725 µm/px) with tissue and planted "
        "MK- and HSPC-like cells, and OUT.truth.parquet listing the planted cells.",
    )
    parser.add_argument("out", metavar="OUT.czi", type=Path, help="the CZI file to write")
    parser.add_argument("--width", type=int, default=4000, help="slide width, px (4000)")
    parser.add_argument("--height", type=int, default=4000, help="slide height, px (4000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    parser.add_argument(
        "--modality",
        choices=MODALITIES,
        default="brightfield",
        help="brightfield: RGB stain (TL Brightfield); fluorescence: uint16 DAPI and CD41 "
        "channels (%(default)s)",
    )
    parser.add_argument(
        "--density",
        choices=SYNTH_DENSITIES,
        default="sparse",
        help="sparse: ~120 cells per 3000² tile; marrow: packed and touching, ~6 000 per 3000² "
        "(sparse)",
    )
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from bmseg.synth import write_synthetic_slide

    write_synthetic_slide(
        args.out,
        width=args.width,
        height=args.height,
        seed=args.seed,
        modality=args.modality,
        density=args.density,
    )
    return 0
