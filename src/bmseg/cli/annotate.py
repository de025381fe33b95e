"""``bmseg annotate serve``: the argparse of :mod:`bmseg.annotate`."""

from __future__ import annotations

import argparse
from pathlib import Path


def _serve(args: argparse.Namespace) -> int:
    from bmseg.annotate import serve

    serve(args.site, args.labels, host=args.host, port=args.port)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bmseg annotate serve``."""
    parser = subparsers.add_parser("annotate", help="label cells: serve the annotation site")
    commands = parser.add_subparsers(dest="annotate_command", metavar="ACTION", required=True)
    serve = commands.add_parser(
        "serve",
        help="serve SITE and save every label to a file as it is made",
        description="Serve an annotation site (bmseg pages) and save every label to disk.",
    )
    serve.add_argument("site", type=Path, metavar="SITE", help="the folder bmseg pages wrote")
    serve.add_argument(
        "--labels", type=Path, help="labels file to keep up to date (default: SITE/labels.json)"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="port (8080; 0 picks a free one)")
    serve.set_defaults(handler=_serve)
