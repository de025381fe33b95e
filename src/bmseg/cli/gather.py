"""``bmseg gather``: the argparse of :mod:`bmseg.gather`."""

from __future__ import annotations

import argparse
from pathlib import Path


def _gather(args: argparse.Namespace) -> int:
    from bmseg.gather import gather

    gather(
        [Path(d) for d in args.batch_dirs],
        Path(args.plans),
        Path(args.out),
        min_overlap=args.min_overlap,
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bmseg gather``."""
    parser = subparsers.add_parser(
        "gather",
        help="per-slide cell tables, summary.csv, QuPath GeoJSON and plots from batch outputs",
        description="Gather SEGMENT batch outputs into per-slide results; cells that two tiles "
        "both kept are resolved (overlap over the smaller area >= --min-overlap keeps the "
        "higher score).",
    )
    parser.add_argument(
        "batch_dirs",
        nargs="+",
        metavar="BATCH_DIR",
        help="SEGMENT output directories (cells.parquet, batch.json, ...)",
    )
    parser.add_argument(
        "--plans",
        required=True,
        metavar="DIR",
        help="directory with PLAN's {slide}.slide.json and {slide}.tissue.png",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument(
        "--min-overlap",
        type=float,
        default=0.5,
        help="overlap over the smaller cell that makes two cells one (0.5)",
    )
    parser.set_defaults(handler=_gather)
