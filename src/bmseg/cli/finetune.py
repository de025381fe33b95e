"""``bmseg finetune``: the command line of :func:`bmseg.finetune.finetune`."""

from __future__ import annotations

import argparse
from pathlib import Path

from bmseg.argtypes import add_slide_ids_and_models
from bmseg.models.choices import DEVICE_CHOICES, FINETUNE_SPLITS


def _run(args: argparse.Namespace) -> int:
    from bmseg.finetune import finetune

    finetune(
        Path(args.cells),
        [Path(p) for p in args.labels],
        batches=[Path(p) for p in args.batches],
        slides=args.slides,
        models_dir=Path(args.models),
        out=Path(args.out),
        slide_ids=args.slide_ids,
        split=args.split,
        validation_fraction=args.validation_fraction,
        seed=args.seed,
        epochs=args.epochs,
        images_per_epoch=args.images_per_epoch,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        device=args.device,
        progress=not args.no_progress,
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bmseg finetune``."""
    parser = subparsers.add_parser(
        "finetune",
        help="fine-tune the models folder's Cellpose-SAM on the HSPCs labelled yes",
        description="Train Cellpose-SAM (cellpose.train) on the accepted HSPC masks of a run "
        "and write a new models folder with it, its parent and its validation AP@0.5.",
    )
    parser.add_argument("cells", metavar="CELLS", help="gathered folder (or a cell table)")
    parser.add_argument("labels", metavar="LABELS", nargs="+", help="label JSON files")
    parser.add_argument(
        "--batches",
        nargs="+",
        required=True,
        metavar="DIR",
        help="SEGMENT's batch folders of the run (their masks.h5)",
    )
    parser.add_argument(
        "--slides",
        nargs="+",
        required=True,
        metavar="SLIDE",
        help="the run's slide files, matched to slide ids by file name (or ID=PATH)",
    )
    add_slide_ids_and_models(parser, "models folder to start")
    parser.add_argument("--out", required=True, metavar="MODELS", help="new models folder")
    parser.add_argument(
        "--split",
        choices=FINETUNE_SPLITS,
        default="tile",
        help="hold out whole tiles or whole slides for validation (tile)",
    )
    parser.add_argument(
        "--validation-fraction",
        type=float,
        default=0.2,
        metavar="F",
        help="share of tiles (or slides) held out (0.2)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of split, crops, training (0)")
    parser.add_argument("--epochs", type=int, default=100, help="Cellpose epochs (100)")
    parser.add_argument(
        "--images-per-epoch",
        type=int,
        default=0,
        metavar="N",
        help="crops per epoch (0: all training crops, Cellpose's default)",
    )
    parser.add_argument("--batch-size", type=int, default=8, metavar="N", help="crops per step (8)")
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=1e-5,
        metavar="LR",
        help="AdamW learning rate (%(default)s, Cellpose's fine-tuning default)",
    )
    parser.add_argument(
        "--weight-decay",
        type=float,
        default=0.1,
        metavar="W",
        help="AdamW weight decay (0.1, Cellpose's default)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        choices=DEVICE_CHOICES,
        help="compute device (auto: the GPU when torch sees one)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.set_defaults(handler=_run)
