"""PLAN: find the tissue of one slide and lay the grid of tiles that SEGMENT will read.

``bmseg plan SLIDE --out DIR`` reads the slide once at low resolution (the pyramid where the
file has one), detects tissue (:mod:`bmseg.tissue`), covers the slide's bounds with square tile
*cores* and keeps the tiles whose core holds enough tissue. Each kept tile is read by SEGMENT as
its core plus a *margin*, so that every cell whose centroid lies in the core is seen whole
(docs/tiles.md). Writes ``{slide}.tiles.parquet``, ``{slide}.slide.json`` and
``{slide}.tissue.png`` (the thumbnail with the tissue outlined and the kept tiles drawn).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bmseg.errors import BmsegError
from bmseg.slide import Rect, Slide, open_slide

log = logging.getLogger(__name__)

DEFAULT_TILE_SIZE = 3000
DEFAULT_MK_MAX_AREA_UM2 = 2000.0
MARGIN_SLACK = 1.05  # margin = slack x the diameter of a disk of the largest MK area
DEFAULT_MIN_TISSUE_FRACTION = 0.0
THUMBNAIL_SIDE = 2048  # px, longer side of the low-resolution read
THUMBNAIL_BANDS = 8  # the low-resolution read is done in bands, for progress
PICTURE_SIDE = 1400  # px, longer side of tissue.png (small slides are enlarged to it)
PICTURE_MIN_WIDTH = 640  # px, so that the caption fits
# Picture colours per modality: (tissue outline, kept cores, dropped cores), and their names.
PICTURE_COLOURS = {
    "brightfield": ((0, 170, 60), (40, 90, 230), (175, 175, 175), "green", "blue"),
    "fluorescence": ((255, 215, 0), (235, 235, 255), (90, 90, 90), "yellow", "white"),
}

TILE_SCHEMA = pa.schema(
    [
        ("slide_id", pa.string()),
        ("tile_id", pa.string()),
        ("row", pa.int32()),
        ("col", pa.int32()),
        ("core_x", pa.int64()),
        ("core_y", pa.int64()),
        ("core_w", pa.int64()),
        ("core_h", pa.int64()),
        ("read_x", pa.int64()),
        ("read_y", pa.int64()),
        ("read_w", pa.int64()),
        ("read_h", pa.int64()),
        ("tissue_fraction", pa.float32()),
        ("pixel_size_um", pa.float64()),
    ]
)


def default_margin(pixel_size_um: float, mk_max_area_um2: float = DEFAULT_MK_MAX_AREA_UM2) -> int:
    """Margin in px: ``ceil(1.05 * 2 * sqrt(A / pi) / pixel size)`` for the largest MK area A.

    The diameter of a disk of the largest MK area, plus 5 % for irregular outlines: a cell whose
    centroid lies in the core then lies wholly in the read window. 2000 µm² at 0.1725 µm/px
    gives 308 px.
    """
    diameter_um = 2 * math.sqrt(mk_max_area_um2 / math.pi)
    return math.ceil(MARGIN_SLACK * diameter_um / pixel_size_um)


def check_tiling(tile_size: int, margin: int, min_tissue_fraction: float) -> None:
    """Reject impossible tilings with a one-line error naming the flag."""
    if tile_size <= 0:
        raise BmsegError(f"--tile-size {tile_size}: must be a positive number of px, e.g. 3000")
    if margin < 0:
        raise BmsegError(f"--margin {margin}: must be 0 or more px")
    if margin > tile_size:
        raise BmsegError(
            f"--margin {margin}: larger than --tile-size {tile_size}; "
            "use a margin up to the tile size (or a larger tile)"
        )
    if not 0 <= min_tissue_fraction < 1:
        raise BmsegError(
            f"--min-tissue-fraction {min_tissue_fraction}: must lie in [0, 1), e.g. 0.01"
        )


def tile_grid(bounds: Rect, tile_size: int, margin: int) -> dict[str, np.ndarray]:
    """Cores covering ``bounds`` row by row (the last row/column clipped) and their read windows."""
    cols = -(-bounds.w // tile_size)
    rows = -(-bounds.h // tile_size)
    row, col = np.divmod(np.arange(rows * cols, dtype=np.int64), cols)
    core_x = bounds.x + col * tile_size
    core_y = bounds.y + row * tile_size
    core_w = np.minimum(tile_size, bounds.right - core_x)
    core_h = np.minimum(tile_size, bounds.bottom - core_y)
    read_x = np.maximum(core_x - margin, bounds.x)
    read_y = np.maximum(core_y - margin, bounds.y)
    read_w = np.minimum(core_x + core_w + margin, bounds.right) - read_x
    read_h = np.minimum(core_y + core_h + margin, bounds.bottom) - read_y
    return {
        "row": row.astype(np.int32),
        "col": col.astype(np.int32),
        "core_x": core_x,
        "core_y": core_y,
        "core_w": core_w,
        "core_h": core_h,
        "read_x": read_x,
        "read_y": read_y,
        "read_w": read_w,
        "read_h": read_h,
    }


def tissue_fractions(mask: np.ndarray, bounds: Rect, grid: dict[str, np.ndarray]) -> np.ndarray:
    """Tissue share of each core, from the thumbnail mask via an integral image.

    A core covers every thumbnail pixel it touches (floor/ceil), so a sliver of tissue at a
    core's edge is never lost to rounding.
    """
    import cv2

    height, width = mask.shape
    scale_x, scale_y = width / bounds.w, height / bounds.h
    integral = cv2.integral(mask.astype(np.uint8), sdepth=cv2.CV_64F)
    x0 = np.clip(np.floor((grid["core_x"] - bounds.x) * scale_x).astype(np.int64), 0, width - 1)
    y0 = np.clip(np.floor((grid["core_y"] - bounds.y) * scale_y).astype(np.int64), 0, height - 1)
    right = grid["core_x"] + grid["core_w"] - bounds.x
    bottom = grid["core_y"] + grid["core_h"] - bounds.y
    x1 = np.clip(np.ceil(right * scale_x).astype(np.int64), x0 + 1, width)
    y1 = np.clip(np.ceil(bottom * scale_y).astype(np.int64), y0 + 1, height)
    tissue = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return (tissue / ((x1 - x0) * (y1 - y0))).astype(np.float32)


def read_thumbnail(slide: Slide, max_side: int = THUMBNAIL_SIDE) -> tuple[np.ndarray, int]:
    """The whole slide downsampled by an integer factor, read in bands with progress."""
    from tqdm import tqdm

    bounds = slide.bounds
    factor = max(1, math.ceil(max(bounds.w, bounds.h) / max_side))
    band_h = factor * max(1, -(-bounds.h // (factor * THUMBNAIL_BANDS)))
    bands = []
    with tqdm(
        total=bounds.w * bounds.h / 1e6,
        desc=f"plan {slide.slide_id}",
        unit="Mpx",
        unit_scale=False,
        leave=False,
        delay=1,
    ) as progress:
        for y in range(bounds.y, bounds.bottom, band_h):
            height = min(band_h, bounds.bottom - y)
            bands.append(slide.read(bounds.x, y, bounds.w, height, zoom=1 / factor))
            progress.update(bounds.w * height / 1e6)
    return np.concatenate(bands, axis=0), factor


def display_image(thumbnail: np.ndarray, modality: str) -> np.ndarray:
    """An 8-bit RGB view of a thumbnail: RGB as is, fluorescence as a false-colour composite."""
    if modality == "brightfield" and thumbnail.shape[2] >= 3:
        image = thumbnail[:, :, :3].astype(np.float32)
        if thumbnail.dtype != np.uint8:
            image *= 255.0 / max(float(np.iinfo(thumbnail.dtype).max), 1.0)
        return np.clip(image, 0, 255).astype(np.uint8)
    colours = np.array([[0, 0.55, 1], [0.2, 1, 0.2], [1, 0.25, 0.2], [1, 0.9, 0.1]], np.float32)
    rgb = np.zeros((*thumbnail.shape[:2], 3), np.float32)
    for index in range(thumbnail.shape[2]):
        channel = thumbnail[:, :, index].astype(np.float32)
        low, high = np.percentile(channel, (1, 99.8))
        scaled = np.clip((channel - low) / max(high - low, 1e-6), 0, 1)
        rgb += scaled[..., None] * colours[index % len(colours)]
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def tissue_picture(
    thumbnail: np.ndarray,
    modality: str,
    mask: np.ndarray,
    bounds: Rect,
    grid: dict[str, np.ndarray],
    kept: np.ndarray,
    caption: str,
) -> bytes:
    """PNG bytes: the thumbnail with the tissue outlined, the kept tiles' cores washed and
    framed, dropped ones framed faintly, and a caption with a legend."""
    import cv2

    tissue_rgb, kept_rgb, dropped_rgb, tissue_name, kept_name = PICTURE_COLOURS[modality]
    legend = f"{tissue_name}: tissue outline   {kept_name}: kept tile cores"
    image = display_image(thumbnail, modality)
    scale = PICTURE_SIDE / max(image.shape[:2])
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_NEAREST
    image = np.ascontiguousarray(cv2.resize(image, size, interpolation=interpolation))
    small_mask = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(small_mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    px_x, px_y = size[0] / bounds.w, size[1] / bounds.h
    x0 = np.round((grid["core_x"] - bounds.x) * px_x).astype(int)
    y0 = np.round((grid["core_y"] - bounds.y) * px_y).astype(int)
    x1 = np.round((grid["core_x"] + grid["core_w"] - bounds.x) * px_x).astype(int) - 1
    y1 = np.round((grid["core_y"] + grid["core_h"] - bounds.y) * px_y).astype(int) - 1
    wash = image.copy()
    for index in np.flatnonzero(kept):
        cv2.rectangle(wash, (x0[index], y0[index]), (x1[index], y1[index]), kept_rgb, -1)
    image = cv2.addWeighted(wash, 0.15, image, 0.85, 0)
    for index in np.flatnonzero(~kept):
        cv2.rectangle(image, (x0[index], y0[index]), (x1[index], y1[index]), dropped_rgb, 1)
    for index in np.flatnonzero(kept):
        cv2.rectangle(image, (x0[index], y0[index]), (x1[index], y1[index]), kept_rgb, 1)
    cv2.drawContours(image, contours, -1, tissue_rgb, 2, lineType=cv2.LINE_AA)
    if image.shape[1] < PICTURE_MIN_WIDTH:  # room for the caption beside a tall, narrow slide
        pad = PICTURE_MIN_WIDTH - image.shape[1]
        image = np.pad(image, ((0, 0), (0, pad), (0, 0)), constant_values=255)
    bar = np.full((52, image.shape[1], 3), 255, np.uint8)
    font_scale = 0.5 if image.shape[1] >= 700 else 0.4
    for line, text in enumerate((caption, legend)):
        cv2.putText(
            bar,
            text,
            (8, 20 + 22 * line),
            cv2.FONT_HERSHEY_SIMPLEX,
            font_scale,
            (20, 20, 20),
            1,
            cv2.LINE_AA,
        )
    return _png(np.vstack([bar, image]))


def _png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an RGB image with a 256-colour palette: a few hundred kB, not megabytes."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    palette = Image.fromarray(rgb).quantize(colors=256, method=Image.Quantize.FASTOCTREE)
    palette.save(buffer, format="PNG")
    return buffer.getvalue()


def tile_table(
    slide_id: str,
    grid: dict[str, np.ndarray],
    fractions: np.ndarray,
    kept: np.ndarray,
    pixel_size_um: float,
) -> pa.Table:
    """The kept tiles as a table in :data:`TILE_SCHEMA` (empty but valid when none is kept)."""
    rows, cols = grid["row"][kept], grid["col"][kept]
    columns = {
        "slide_id": [slide_id] * int(rows.size),
        "tile_id": [f"r{r:04d}c{c:04d}" for r, c in zip(rows.tolist(), cols.tolist(), strict=True)],
        **{name: values[kept] for name, values in grid.items()},
        "tissue_fraction": fractions[kept],
        "pixel_size_um": np.full(rows.size, pixel_size_um),
    }
    return pa.table(
        {field.name: pa.array(columns[field.name], field.type) for field in TILE_SCHEMA},
        schema=TILE_SCHEMA,
    )


def plan_slide(
    slide_path: str | Path,
    out_dir: str | Path,
    *,
    slide_id: str | None = None,
    pixel_size_um: float | None = None,
    tile_size: int = DEFAULT_TILE_SIZE,
    margin: int | None = None,
    min_tissue_fraction: float = DEFAULT_MIN_TISSUE_FRACTION,
    mk_max_area_um2: float = DEFAULT_MK_MAX_AREA_UM2,
    calibration_path: str | Path | None = None,
) -> dict:
    """Plan one slide; write its tile table, slide.json and tissue picture; return slide.json."""
    from bmseg.storage import atomic_path
    from bmseg.tissue import detect_tissue, load_calibration, tissue_contrast

    if not mk_max_area_um2 > 0:
        raise BmsegError(f"--mk-max-area-um2 {mk_max_area_um2}: must be a positive area in µm²")
    out_dir = Path(out_dir)
    started = time.perf_counter()
    with open_slide(slide_path, pixel_size_um=pixel_size_um, slide_id=slide_id) as slide:
        if margin is None:
            margin = default_margin(slide.pixel_size_um, mk_max_area_um2)
        check_tiling(tile_size, margin, min_tissue_fraction)
        calibration = (
            load_calibration(calibration_path, slide.modality) if calibration_path else None
        )
        thumbnail, factor = read_thumbnail(slide)
        read_seconds = time.perf_counter() - started
        um_per_px = slide.pixel_size_um * slide.bounds.w / thumbnail.shape[1]
        contrast = tissue_contrast(thumbnail, slide.modality, slide.background)
        tissue = detect_tissue(contrast, um_per_px, calibration)
        grid = tile_grid(slide.bounds, tile_size, margin)
        fractions = tissue_fractions(tissue.mask, slide.bounds, grid)
        kept = fractions > min_tissue_fraction
        um_y = slide.pixel_size_um * slide.bounds.h / thumbnail.shape[0]
        tissue_mm2 = float(tissue.mask.sum()) * um_per_px * um_y / 1e6
        info = {
            "slide_id": slide.slide_id,
            "source": slide.path.name,
            "pixel_size_um": slide.pixel_size_um,
            "channels": [{"name": c.name, "dtype": c.dtype} for c in slide.channels],
            "bounds": slide.bounds.as_dict(),
            "modality": slide.modality,
            "tissue_area_mm2": round(tissue_mm2, 6),
            "tile_size": tile_size,
            "margin": margin,
            "tiles_total": int(fractions.size),
            "tiles_kept": int(kept.sum()),
            "min_tissue_fraction": min_tissue_fraction,
            "tissue_threshold": None if math.isnan(tissue.threshold) else tissue.threshold,
            "tissue_method": tissue.method,
        }
        caption = (
            f"{slide.slide_id}  {slide.modality}  tissue {tissue_mm2:.2f} mm2  "
            f"tiles kept {info['tiles_kept']}/{info['tiles_total']}  "
            f"(core {tile_size} px, margin {margin} px)"
        )
        picture = tissue_picture(
            thumbnail, slide.modality, tissue.mask, slide.bounds, grid, kept, caption
        )
        table = tile_table(slide.slide_id, grid, fractions, kept, slide.pixel_size_um)
        if not kept.any():
            log.warning("%s: no tissue found; the tile table is empty", slide.path)
    stem = out_dir / info["slide_id"]
    paths = [Path(f"{stem}.tiles.parquet"), Path(f"{stem}.slide.json"), Path(f"{stem}.tissue.png")]
    with (
        atomic_path(paths[0]) as tiles_tmp,
        atomic_path(paths[1]) as json_tmp,
        atomic_path(paths[2]) as png_tmp,
    ):
        pq.write_table(table, tiles_tmp, compression="zstd")
        json_tmp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        png_tmp.write_bytes(picture)
    log.info(
        "plan %s: read %dx%d thumbnail (1/%d, %.2f µm/px) in %.2f s; tissue %.3f mm² (%s, "
        "threshold %.4g); kept %d of %d tiles (tile %d px, margin %d px); wrote %s in %.2f s",
        info["source"],
        thumbnail.shape[1],
        thumbnail.shape[0],
        factor,
        um_per_px,
        read_seconds,
        tissue_mm2,
        tissue.method,
        tissue.threshold,
        info["tiles_kept"],
        info["tiles_total"],
        tile_size,
        margin,
        ", ".join(p.name for p in paths),
        time.perf_counter() - started,
    )
    return info


def calibrate_slides(
    slide_paths: list[Path], out: Path, pixel_size_um: float | None = None
) -> dict:
    """Pool several slides' contrast histograms into one threshold file (same modality)."""
    from bmseg.storage import write_json
    from bmseg.tissue import calibrate, tissue_contrast

    contrasts, modalities = [], set()
    for path in slide_paths:
        with open_slide(path, pixel_size_um=pixel_size_um) as slide:
            thumbnail, _ = read_thumbnail(slide)
            contrasts.append(tissue_contrast(thumbnail, slide.modality, slide.background))
            modalities.add(slide.modality)
    if len(modalities) > 1:
        raise BmsegError(
            f"calibrate-tissue: slides mix {sorted(modalities)}; calibrate each modality on its own"
        )
    calibration = calibrate(contrasts, modalities.pop(), [p.name for p in slide_paths])
    write_json(calibration, out)
    log.info(
        "calibrated tissue threshold %.4f on %d slides; wrote %s",
        calibration["threshold"],
        len(slide_paths),
        out,
    )
    return calibration


def _plan_command(args: argparse.Namespace) -> int:
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
    )
    return 0


def _calibrate_command(args: argparse.Namespace) -> int:
    calibrate_slides(args.slides, args.out, args.pixel_size_um)
    return 0


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
        "--pixel-size-um", type=float, help="µm per pixel, overriding (or replacing) the metadata"
    )
    parser.add_argument(
        "--tile-size", type=int, default=DEFAULT_TILE_SIZE, help="tile core side, px (3000)"
    )
    parser.add_argument(
        "--margin",
        type=int,
        help="px read around each core (default: from --mk-max-area-um2 and the pixel size)",
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
        default=DEFAULT_MK_MAX_AREA_UM2,
        help="largest MK area, sets the default margin (2000)",
    )
    parser.add_argument(
        "--calibration",
        type=Path,
        metavar="FILE",
        help="shared tissue threshold from bmseg calibrate-tissue, instead of per-slide Otsu",
    )
    parser.set_defaults(handler=_plan_command)

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
    calibrate_parser.set_defaults(handler=_calibrate_command)
