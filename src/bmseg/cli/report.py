"""``bmseg report``: the argparse of :mod:`bmseg.report`."""

from __future__ import annotations

import argparse
from pathlib import Path


def _report(args: argparse.Namespace) -> int:
    from bmseg.report import report

    report([Path(p) for p in args.results], args.out)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bmseg report``."""
    parser = subparsers.add_parser("report", help="one self-contained HTML page summarising a run")
    parser.add_argument(
        "results",
        nargs="+",
        metavar="RESULTS",
        help="result directories (gathered, classified, classifiers), searched at any depth",
    )
    parser.add_argument("--out", required=True, type=Path, help="the HTML file to write")
    parser.set_defaults(handler=_report)
