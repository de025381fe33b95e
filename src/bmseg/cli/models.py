"""``bmseg models fetch``, ``make-test`` and ``make-demo``: the command line of
:mod:`bmseg.models.making`, which fills a models directory."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)

TEST_WEIGHTS_NOTICE = (
    "{dest}: wrote random-initialised test checkpoints ({config}). They exercise the real "
    "loading and segmentation code but CANNOT segment real images; use "
    "`bmseg models fetch --dest DIR` for the real weights.\n"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bmseg models`` with its ``fetch``, ``make-test`` and ``make-demo`` sub-commands."""
    models = subparsers.add_parser("models", help="download or make the model weight files")
    actions = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)

    fetch = actions.add_parser(
        "fetch",
        help="download the official SAM2.1, Cellpose-SAM and ResNet-50 weights (needs network)",
    )
    fetch.add_argument("--dest", type=Path, required=True, help="models directory to fill")
    fetch.add_argument(
        "--list", action="store_true", help="print what would be downloaded, and download nothing"
    )
    fetch.set_defaults(handler=_fetch)

    make_test = actions.add_parser(
        "make-test",
        help="write tiny random-initialised checkpoints for tests (cannot segment real images)",
    )
    make_test.add_argument("--dest", type=Path, required=True, help="models directory to write")
    make_test.add_argument("--seed", type=int, default=0, help="random seed of the weights (0)")
    make_test.add_argument(
        "--full-size",
        action="store_true",
        help="production architectures (hiera-large, ViT-L, ResNet-50; ~2.3 GB) for benchmarks",
    )
    make_test.set_defaults(handler=_make_test)

    make_demo = actions.add_parser(
        "make-demo",
        help="make-test's SAM2 and ResNet-50 plus a small Cellpose-SAM trained here on synthetic "
        "slides (finds synthetic HSPCs; not real marrow); minutes on a CPU",
    )
    make_demo.add_argument("--dest", type=Path, required=True, help="new models directory")
    make_demo.add_argument("--seed", type=int, default=0, help="seed of weights and data (0)")
    make_demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    make_demo.set_defaults(handler=_make_demo)


def _fetch(args: argparse.Namespace) -> int:
    from bmseg.models.making import fetch_models, fetch_plan

    if args.list:
        for file_name, url in fetch_plan().items():
            sys.stdout.write(f"{args.dest / file_name}\t{url}\n")
        return 0
    fetch_models(args.dest)
    log.info("models directory %s is complete", args.dest)
    return 0


def _make_test(args: argparse.Namespace) -> int:
    from bmseg.models.making import make_test_models

    manifest = make_test_models(args.dest, seed=args.seed, full_size=args.full_size)
    sys.stdout.write(TEST_WEIGHTS_NOTICE.format(dest=args.dest, config=manifest.sam2_config))
    return 0


def _make_demo(args: argparse.Namespace) -> int:
    from bmseg.models.making import make_demo_models

    manifest = make_demo_models(args.dest, seed=args.seed, progress=not args.no_progress)
    training = manifest.training or {}
    sys.stdout.write(
        f"{args.dest}: {manifest.description}\n"
        f"trained in {training.get('seconds')} s; validation AP@0.5 "
        f"{training.get('validation_ap50')} on held-out synthetic tiles\n"
    )
    return 0
