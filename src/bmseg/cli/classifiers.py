"""``bmseg train`` and ``bmseg classify``: the argparse of :mod:`bmseg.classifiers`."""

from __future__ import annotations

import argparse
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from bmseg.classifiers.training import train

    train(
        Path(args.cells),
        [Path(p) for p in args.labels],
        Path(args.out),
        folds=args.folds,
        seed=args.seed,
        min_per_class=args.min_per_class,
        pca_components=args.pca_components,
    )
    return 0


def _classify(args: argparse.Namespace) -> int:
    from bmseg.classifiers.applying import classify

    classify(
        [Path(p) for p in args.cells],
        Path(args.classifiers),
        Path(args.out),
        ranking=args.ranking,
        keep_embedding=args.keep_embedding,
        labels=[Path(p) for p in args.labels or ()],
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bmseg train`` and ``bmseg classify``."""
    train = subparsers.add_parser(
        "train",
        help="one classifier per cell type from gallery labels, with cross-validated metrics",
    )
    train.add_argument("cells", metavar="CELLS", help="gathered directory or a cells parquet")
    train.add_argument("labels", nargs="+", metavar="LABELS", help="label JSON files")
    train.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="folder for the classifiers, metrics.json and report.html (not a segmentation "
        "models folder)",
    )
    train.add_argument("--folds", type=int, default=5, help="cross-validation folds (5)")
    train.add_argument("--seed", type=int, default=0, help="random seed (0)")
    train.add_argument(
        "--min-per-class", type=int, default=10, help="fewest yes and no labels per type (10)"
    )
    train.add_argument(
        "--pca-components", type=int, default=32, help="embedding PCA components (32)"
    )
    train.set_defaults(handler=_train)

    classify = subparsers.add_parser(
        "classify",
        help="add classifier probability and label columns to gathered cell tables",
    )
    classify.add_argument(
        "cells", nargs="+", metavar="CELLS", help="gathered directory or cells parquet files"
    )
    classify.add_argument(
        "--classifiers", required=True, metavar="MODELS", help="directory bmseg train wrote"
    )
    classify.add_argument("--out", required=True, metavar="DIR", help="output directory")
    classify.add_argument(
        "--ranking",
        action="store_true",
        help="also write ranking.parquet: unlabelled cells, most uncertain first",
    )
    classify.add_argument(
        "--keep-embedding",
        action="store_true",
        help="copy the embedding column too (it stays in the gathered tables either way)",
    )
    classify.add_argument(
        "--labels",
        nargs="*",
        metavar="LABELS",
        help="label files whose cells the ranking leaves out",
    )
    classify.set_defaults(handler=_classify)
