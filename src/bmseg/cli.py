"""The ``bmseg`` command: one sub-command per pipeline step.

Each step module exposes ``register(subparsers)``, which adds its sub-command(s) and sets
``handler`` (a function taking the parsed arguments) as a parser default. Step modules import
heavy libraries (torch, the models) inside their handlers, so building the parser stays cheap:
the Nextflow tests parse every process's command line with this very parser.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from bmseg import __version__
from bmseg.errors import BmsegError
from bmseg.versions import versions_yaml

STEP_MODULES = (
    "bmseg.synth",
    "bmseg.plan",
    "bmseg.batching",
    "bmseg.segment",
    "bmseg.models.cli",
    "bmseg.gather",
    "bmseg.pages",
    "bmseg.annotate",
    "bmseg.classifiers",
    "bmseg.finetune",
    "bmseg.report",
)

log = logging.getLogger("bmseg")


def _versions_command(args: argparse.Namespace) -> int:
    sys.stdout.write(versions_yaml(args.process))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, every step's sub-command included."""
    parser = argparse.ArgumentParser(
        prog="bmseg",
        description="Find, measure and classify megakaryocytes and HSPCs in bone-marrow slides.",
    )
    parser.add_argument("--version", action="version", version=f"bmseg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in STEP_MODULES:
        importlib.import_module(module_name).register(subparsers)
    versions = subparsers.add_parser(
        "versions", help="print package versions as an nf-core versions.yml block"
    )
    versions.add_argument("--process", default="BMSEG", help="process name for the YAML key")
    versions.set_defaults(handler=_versions_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``bmseg``; user errors print one line and exit 2, bugs keep their traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        return int(args.handler(args) or 0)
    except BmsegError as error:
        sys.stderr.write(f"bmseg {args.command}: error: {error}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"bmseg {args.command}: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
