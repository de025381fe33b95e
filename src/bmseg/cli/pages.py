"""``bmseg pages``: the argparse of :mod:`bmseg.pages`."""

from __future__ import annotations

import argparse
from pathlib import Path

from bmseg.contract import GALLERY_ORDERS


def _pages(args: argparse.Namespace) -> int:
    from bmseg.pages import build_pages

    build_pages(
        args.cells,
        args.out,
        per_page=args.per_page,
        order=args.order,
        seed=args.seed,
        image_size=args.image_size,
        ranking=args.ranking,
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bmseg pages``."""
    parser = subparsers.add_parser(
        "pages",
        help="write the static annotation site (index + galleries per cell type)",
        description="Write a static annotation site from gathered cells and their crops.",
    )
    parser.add_argument(
        "cells",
        nargs="+",
        type=Path,
        metavar="CELLS",
        help="a gathered directory, or *cells.parquet files (crops are found beside them by name)",
    )
    parser.add_argument("--out", type=Path, required=True, metavar="SITE", help="site folder")
    parser.add_argument("--per-page", type=int, default=300, help="cells per page (300)")
    parser.add_argument(
        "--order",
        choices=GALLERY_ORDERS,
        default="random",
        help="gallery order: random (seeded), size (largest first) or uncertainty (most "
        "uncertain first, from bmseg classify --ranking) (%(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random order (0)")
    parser.add_argument(
        "--ranking",
        type=Path,
        nargs="?",
        help="uncertainty ranking (cell_uid, uncertainty); default (or the flag alone): "
        "ranking.parquet beside CELLS",
    )
    parser.add_argument(
        "--image-size", type=int, default=160, help="crop size shown, px (160; never enlarged)"
    )
    parser.set_defaults(handler=_pages)
