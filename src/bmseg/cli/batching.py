"""``bmseg batch``: the command line of :func:`bmseg.batching.make_batches`."""

from __future__ import annotations

import argparse
from pathlib import Path

from bmseg.contract import DEFAULT_BATCH_SIZE


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bmseg batch``."""
    parser = subparsers.add_parser(
        "batch",
        help="sample tiles from all slides and group them into batches",
        description="Pool the tile tables of bmseg plan, sample a fraction of the tiles "
        "(same seed, same tiles) and write batch_NNNN.parquet tables for SEGMENT.",
    )
    parser.add_argument(
        "tile_tables", type=Path, nargs="+", metavar="TILE_TABLE", help="{slide}.tiles.parquet"
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    parser.add_argument(
        "--fraction",
        type=float,
        default=1.0,
        help="share of tiles to sample, in (0, 1] (1.0: every tile; the pipeline's "
        "--sample_fraction defaults to 0.1, an annotation round)",
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"tiles per batch ({DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument(
        "--require-tissue",
        action="store_true",
        help="exit 2 with the reason when no table holds a tile (the pipeline's BATCH: nothing "
        "to segment), instead of a warning",
    )
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from bmseg.batching import make_batches

    make_batches(
        args.tile_tables,
        args.out,
        fraction=args.fraction,
        seed=args.seed,
        batch_size=args.batch_size,
        require_tissue=args.require_tissue,
    )
    return 0
