"""``bmseg plan`` and ``bmseg calibrate-tissue``: the command line of
:func:`bmseg.plan.plan_slide` and :func:`bmseg.plan.calibrate_tissue`."""

from __future__ import annotations

import argparse
from pathlib import Path

from bmseg.argtypes import nullable, nullable_choice, nullable_float_list
from bmseg.contract import DEFAULT_MIN_TISSUE_FRACTION, DEFAULT_TILE_SIZE, MODALITIES
from bmseg.models.settings import MKSettings


def slide_pixel_size(text: str) -> tuple[Path, float]:
    """``SLIDE=UM`` (split at the last '=') as a path and a positive µm per pixel."""
    slide, _, size = text.rpartition("=")
    try:
        value = float(size)
    except ValueError:
        value = 0.0
    if not slide or not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give SLIDE=UM, e.g. slides/a.czi=0.25")
    return Path(slide), value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bmseg plan`` and ``bmseg calibrate-tissue``."""
    parser = subparsers.add_parser(
        "plan",
        help="detect tissue and lay out the tiles of one slide",
        description="Detect tissue on a low-resolution read and write {slide}.tiles.parquet, "
        "{slide}.slide.json and {slide}.tissue.png (see docs/tiles.md).",
    )
    parser.add_argument("slide", type=Path, metavar="SLIDE", help="CZI, OME-TIFF or TIFF file")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    parser.add_argument("--slide-id", help="id for tables and file names (default: file stem)")
    parser.add_argument(
        "--pixel-size-um",
        type=nullable(float),
        help="µm per pixel, overriding (or replacing) the metadata (null: the metadata's)",
    )
    parser.add_argument(
        "--tile-size", type=int, default=DEFAULT_TILE_SIZE, help="tile core side, px (3000)"
    )
    parser.add_argument(
        "--margin",
        type=nullable(int),
        help="px read around each core (default or null: from --mk-max-area-um2 and the pixel "
        "size)",
    )
    parser.add_argument(
        "--min-tissue-fraction",
        type=float,
        default=DEFAULT_MIN_TISSUE_FRACTION,
        help="keep tiles whose core has more tissue than this share (0: any tissue)",
    )
    parser.add_argument(
        "--mk-max-area-um2",
        type=float,
        default=MKSettings.max_area_um2,
        help="largest MK area, sets the default margin (2000)",
    )
    parser.add_argument(
        "--calibration",
        type=Path,
        nargs="?",
        metavar="FILE",
        help="shared tissue threshold from bmseg calibrate-tissue, instead of per-slide Otsu "
        "(the flag alone: per-slide Otsu)",
    )
    parser.add_argument(
        "--modality",
        type=nullable_choice(MODALITIES),
        metavar="{" + ",".join(MODALITIES) + "}",
        help="brightfield or fluorescence, overriding the metadata (default or null: the "
        "channels' contrast method in the metadata, else the image's background)",
    )
    parser.add_argument(
        "--plane",
        metavar="DIM=N,...",
        help="plane of a Z stack, time series or Airyscan file to read, e.g. Z=3,T=0; Z=max "
        "(fluorescence) or Z=min (brightfield) projects over Z (default: index 0 of each, with "
        "a warning)",
    )
    parser.set_defaults(handler=_run_plan)

    calibrate_parser = subparsers.add_parser(
        "calibrate-tissue",
        help="one tissue threshold for a cohort of slides (for bmseg plan --calibration)",
        description="Pool the tissue contrast of several slides of one modality and write one "
        "Otsu threshold as JSON for bmseg plan --calibration.",
    )
    calibrate_parser.add_argument(
        "slides", type=Path, nargs="+", metavar="SLIDE", help="the cohort's slides, one modality"
    )
    calibrate_parser.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="FILE.json",
        help="the calibration to write, read by bmseg plan --calibration",
    )
    calibrate_parser.add_argument(
        "--pixel-size-um",
        type=float,
        help="µm per pixel for every slide, overriding (or replacing) the metadata",
    )
    calibrate_parser.add_argument(
        "--slide-pixel-size-um",
        type=slide_pixel_size,
        action="append",
        default=[],
        metavar="SLIDE=UM",
        help="one slide's own µm per pixel (repeatable), over --pixel-size-um and the metadata",
    )
    calibrate_parser.add_argument(
        "--pixel-sizes-um",
        type=nullable_float_list,
        metavar="UM,...",
        help="each slide's own µm per pixel, in the order of SLIDE, null for a slide without "
        "one (the pipeline's form of --slide-pixel-size-um)",
    )
    calibrate_parser.set_defaults(handler=_run_calibrate)


def _run_plan(args: argparse.Namespace) -> int:
    from bmseg.plan import plan_slide
    from bmseg.slide import parse_plane

    plan_slide(
        args.slide,
        args.out,
        slide_id=args.slide_id,
        pixel_size_um=args.pixel_size_um,
        tile_size=args.tile_size,
        margin=args.margin,
        min_tissue_fraction=args.min_tissue_fraction,
        mk_max_area_um2=args.mk_max_area_um2,
        calibration_path=args.calibration,
        modality=args.modality,
        plane=parse_plane(args.plane),
    )
    return 0


def _run_calibrate(args: argparse.Namespace) -> int:
    from bmseg.errors import BmsegError
    from bmseg.plan import calibrate_tissue

    own_sizes = dict(args.slide_pixel_size_um)
    if args.pixel_sizes_um is not None:
        if len(args.pixel_sizes_um) != len(args.slides):
            raise BmsegError(
                f"--pixel-sizes-um gives {len(args.pixel_sizes_um)} sizes for "
                f"{len(args.slides)} slides: give one per slide, null where the metadata has it"
            )
        for slide, size in zip(args.slides, args.pixel_sizes_um, strict=True):
            if size is not None:
                own_sizes[slide] = size
    calibrate_tissue(
        args.slides,
        args.out,
        pixel_size_um=args.pixel_size_um,
        slide_pixel_sizes=own_sizes,
    )
    return 0
