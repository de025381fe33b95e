"""PLAN: find the tissue of one slide and lay the grid of tiles that SEGMENT will read.

``bmseg plan SLIDE --out DIR`` reads each scene of the slide once at low resolution (the
pyramid where the file has one), detects tissue (:mod:`bmseg.tissue`, one threshold for all
scenes), covers the scenes with square tile *cores* of a grid anchored at the slide's bounds
and keeps the tiles whose core holds enough tissue. Each kept tile is read by SEGMENT as
its core plus a *margin*, so that every cell whose centroid lies in the core is seen whole
(docs/tiles.md). Writes ``{slide}.tiles.parquet``, ``{slide}.slide.json`` and
``{slide}.tissue.png`` (a panel per scene with the tissue outlined and the kept tiles drawn).
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

from bmseg.contract import MODALITIES, TILE_SCHEMA
from bmseg.errors import BmsegError
from bmseg.pictures import PICTURE_COLOURS
from bmseg.slide import Rect, Slide, open_slide, parse_plane

log = logging.getLogger(__name__)

DEFAULT_TILE_SIZE = 3000
DEFAULT_MK_MAX_AREA_UM2 = 2000.0
MARGIN_SLACK = 1.05  # margin = slack x the diameter of a disk of the largest MK area
DEFAULT_MIN_TISSUE_FRACTION = 0.0
THUMBNAIL_SIDE = 2048  # px, longer side of the low-resolution read
THUMBNAIL_BANDS = 8  # the low-resolution read is done in bands, for progress
PICTURE_SIDE = 1400  # px, longer side of tissue.png (small slides are enlarged to it)
PICTURE_MIN_WIDTH = 640  # px, so that the caption fits
PANEL_LABEL_H = 22  # px, the strip above each scene's panel naming it
PANEL_GAP = 8  # px between scene panels
# Opacity of the colour laid over kept cores: light on white glass, where the stain must stay
# readable; stronger on black, where a light wash would vanish.
KEPT_WASH = {"brightfield": 0.18, "fluorescence": 0.35}


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


def tile_grid(
    bounds: Rect, tile_size: int, margin: int, scenes: list[Rect] | None = None
) -> dict[str, np.ndarray]:
    """Cores covering ``bounds`` row by row (the last row/column clipped) and their read windows.

    With ``scenes``, only the cores that meet a scene: the grid stays anchored at the bounds'
    corner (so cores never overlap, even where scenes' boxes come close), but the empty
    stage between scenes far apart gets no tiles.
    """
    cols = -(-bounds.w // tile_size)
    rows = -(-bounds.h // tile_size)
    if scenes is None:
        row, col = np.divmod(np.arange(rows * cols, dtype=np.int64), cols)
    else:
        cells = set()
        for scene in scenes:
            first_col = (scene.x - bounds.x) // tile_size
            first_row = (scene.y - bounds.y) // tile_size
            last_col = (scene.right - 1 - bounds.x) // tile_size
            last_row = (scene.bottom - 1 - bounds.y) // tile_size
            cells.update(
                (r, c)
                for r in range(first_row, last_row + 1)
                for c in range(first_col, last_col + 1)
            )
        ordered = np.array(sorted(cells), np.int64).reshape(-1, 2)
        row, col = ordered[:, 0], ordered[:, 1]
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


def scene_tissue_px(mask: np.ndarray, scene: Rect, grid: dict[str, np.ndarray]) -> np.ndarray:
    """Tissue area (full-resolution px) of one scene's thumbnail mask inside each core.

    Counts the thumbnail pixels of the window covering the core's overlap with the scene,
    every thumbnail pixel it touches (floor/ceil), so a sliver of tissue at a core's edge is
    never lost to rounding; 0 for cores that miss the scene.
    """
    import cv2

    height, width = mask.shape
    scale_x, scale_y = width / scene.w, height / scene.h
    left = np.maximum(grid["core_x"], scene.x) - scene.x
    top = np.maximum(grid["core_y"], scene.y) - scene.y
    right = np.minimum(grid["core_x"] + grid["core_w"], scene.right) - scene.x
    bottom = np.minimum(grid["core_y"] + grid["core_h"], scene.bottom) - scene.y
    meets = (right > left) & (bottom > top)
    integral = cv2.integral(mask.astype(np.uint8), sdepth=cv2.CV_64F)
    x0 = np.clip(np.floor(left * scale_x).astype(np.int64), 0, width - 1)
    y0 = np.clip(np.floor(top * scale_y).astype(np.int64), 0, height - 1)
    x1 = np.clip(np.ceil(right * scale_x).astype(np.int64), x0 + 1, width)
    y1 = np.clip(np.ceil(bottom * scale_y).astype(np.int64), y0 + 1, height)
    tissue = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return np.where(meets, tissue / (scale_x * scale_y), 0.0)


def tissue_fractions(
    masks: list[np.ndarray], scenes: list[Rect], grid: dict[str, np.ndarray]
) -> np.ndarray:
    """Tissue share of each core: the scenes' tissue inside it over the core's area."""
    tissue = sum(
        (scene_tissue_px(m, s, grid) for m, s in zip(masks, scenes, strict=True)),
        np.zeros(grid["row"].size),
    )
    area = (grid["core_w"] * grid["core_h"]).astype(np.float64)
    return np.clip(tissue / area, 0, 1).astype(np.float32)


def thumbnail_factor(scenes: list[Rect], max_side: int = THUMBNAIL_SIDE) -> int:
    """One integer downsampling for all scenes: the largest scene's longer side to at most
    ``max_side`` px, and all scenes together to at most four such squares of pixels."""
    longest = max(max(s.w, s.h) for s in scenes)
    area = sum(s.w * s.h for s in scenes)
    return max(1, math.ceil(longest / max_side), math.ceil(math.sqrt(area / 4) / max_side))


def read_thumbnails(slide: Slide, max_side: int = THUMBNAIL_SIDE) -> tuple[list[np.ndarray], int]:
    """Each scene downsampled by one integer factor, read in bands with progress (libCZI
    takes the pyramid level that fits where the file has one)."""
    from tqdm import tqdm

    factor = thumbnail_factor(slide.scenes, max_side)
    thumbnails = []
    with tqdm(
        total=sum(s.w * s.h for s in slide.scenes) / 1e6,
        desc=f"plan {slide.slide_id}",
        unit="Mpx",
        unit_scale=False,
        leave=False,
        delay=1,
    ) as progress:
        for scene in slide.scenes:
            band_h = factor * max(1, -(-scene.h // (factor * THUMBNAIL_BANDS)))
            bands = []
            for y in range(scene.y, scene.bottom, band_h):
                height = min(band_h, scene.bottom - y)
                bands.append(slide.read(scene.x, y, scene.w, height, zoom=1 / factor))
                progress.update(scene.w * height / 1e6)
            thumbnails.append(np.concatenate(bands, axis=0))
    return thumbnails, factor


def slide_intensity(slide: Slide, thumbnails: list[np.ndarray], masks: list[np.ndarray]) -> dict:
    """slide.json ``intensity``: per-channel ranges of the tissue in the low-resolution read of
    every scene and the file's bit depth; SEGMENT shows every tile of the slide to the models
    with them."""
    from bmseg.slide import intensity_ranges

    channels = thumbnails[0].shape[-1]
    pixels = np.concatenate([t.reshape(-1, 1, channels) for t in thumbnails])
    where = np.concatenate(
        [
            m.reshape(-1, 1)
            if m.shape == t.shape[:2]
            else np.zeros((t.shape[0] * t.shape[1], 1), bool)
            for t, m in zip(thumbnails, masks, strict=True)
        ]
    )
    return {
        **intensity_ranges(pixels, where),
        "bit_depth": slide.bit_depth,
        "channels": [c.name for c in slide.channels],
    }


def display_image(thumbnail: np.ndarray, modality: str, fill: np.ndarray) -> np.ndarray:
    """An 8-bit RGB view of a thumbnail: brightfield RGB as is, brightfield grey as grey,
    fluorescence as a false-colour composite; each channel stretched between percentiles of
    its acquired pixels (those that differ from the reader's ``fill``) where not RGB."""
    if modality == "brightfield" and thumbnail.shape[2] >= 3:  # the first RGB triple
        image = thumbnail[:, :, :3].astype(np.float32)
        if thumbnail.dtype != np.uint8:
            image *= 255.0 / max(float(np.iinfo(thumbnail.dtype).max), 1.0)
        return np.clip(image, 0, 255).astype(np.uint8)
    from bmseg.tissue import acquired_pixels

    acquired = acquired_pixels(thumbnail, fill)
    sample = thumbnail[acquired] if acquired.any() else thumbnail.reshape(-1, thumbnail.shape[2])
    colours = np.array([[0, 0.55, 1], [0.2, 1, 0.2], [1, 0.25, 0.2], [1, 0.9, 0.1]], np.float32)
    if modality == "brightfield":  # grey (or several grey channels): the first, as grey
        colours = np.ones((1, 3), np.float32)
    rgb = np.zeros((*thumbnail.shape[:2], 3), np.float32)
    for index in range(thumbnail.shape[2] if modality != "brightfield" else 1):
        channel = thumbnail[:, :, index].astype(np.float32)
        low, high = np.percentile(
            sample[:, index], (0.5, 99.8) if modality == "brightfield" else (1, 99.8)
        )
        scaled = np.clip((channel - low) / max(high - low, 1e-6), 0, 1)
        rgb += scaled[..., None] * colours[index % len(colours)]
    rgb[~acquired] = 1.0 if modality == "brightfield" else 0.0
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def _area_text(mm2: float) -> str:
    """An area in mm² to three significant digits: 0.00213, 0.213, 21.3, 213."""
    return "0" if mm2 == 0 else f"{mm2:.3g}" if mm2 < 1000 else f"{mm2:.0f}"


def scene_panel(
    thumbnail: np.ndarray,
    modality: str,
    fill: np.ndarray,
    mask: np.ndarray,
    scene: Rect,
    grid: dict[str, np.ndarray],
    kept: np.ndarray,
    size: tuple[int, int],
) -> np.ndarray:
    """One scene's thumbnail scaled to ``size`` (w, h): the tissue outlined, the kept cores
    washed and framed, the dropped cores framed faintly."""
    import cv2

    tissue_rgb, kept_rgb, dropped_rgb, _, _ = PICTURE_COLOURS[modality]
    image = display_image(thumbnail, modality, fill)
    scale = size[0] / image.shape[1]
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_NEAREST
    image = np.ascontiguousarray(cv2.resize(image, size, interpolation=interpolation))
    small_mask = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(small_mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    px_x, px_y = size[0] / scene.w, size[1] / scene.h
    x0 = np.round((grid["core_x"] - scene.x) * px_x).astype(int)
    y0 = np.round((grid["core_y"] - scene.y) * px_y).astype(int)
    x1 = np.round((grid["core_x"] + grid["core_w"] - scene.x) * px_x).astype(int) - 1
    y1 = np.round((grid["core_y"] + grid["core_h"] - scene.y) * px_y).astype(int) - 1
    wash = image.copy()
    for index in np.flatnonzero(kept):
        cv2.rectangle(wash, (x0[index], y0[index]), (x1[index], y1[index]), kept_rgb, -1)
    opacity = KEPT_WASH[modality]
    image = cv2.addWeighted(wash, opacity, image, 1 - opacity, 0)
    for index in np.flatnonzero(~kept):
        cv2.rectangle(image, (x0[index], y0[index]), (x1[index], y1[index]), dropped_rgb, 1)
    for index in np.flatnonzero(kept):
        cv2.rectangle(image, (x0[index], y0[index]), (x1[index], y1[index]), kept_rgb, 2)
    cv2.drawContours(image, contours, -1, tissue_rgb, 2, lineType=cv2.LINE_AA)
    return image


def _text(image: np.ndarray, text: str, origin: tuple[int, int], scale: float) -> None:
    import cv2

    cv2.putText(image, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (20, 20, 20), 1, cv2.LINE_AA)


def panel_sizes(scenes: list[Rect]) -> tuple[int, list[tuple[int, int]]]:
    """Columns of the picture's grid of scene panels and each panel's (w, h) in px.

    One scene: its longer side at :data:`PICTURE_SIDE`. Several: a grid about as wide as
    that, each panel fitted into its square cell, so that a small scene far from a large
    one still shows at a readable size (each panel has its own scale, printed above it).
    """
    columns = math.ceil(math.sqrt(len(scenes)))
    cell = (
        PICTURE_SIDE if len(scenes) == 1 else (PICTURE_SIDE - PANEL_GAP * (columns - 1)) // columns
    )
    sizes = []
    for scene in scenes:
        scale = cell / max(scene.w, scene.h)
        sizes.append((max(1, round(scene.w * scale)), max(1, round(scene.h * scale))))
    return columns, sizes


def tissue_picture(
    thumbnails: list[np.ndarray],
    modality: str,
    fill: np.ndarray,
    masks: list[np.ndarray],
    scenes: list[Rect],
    grid: dict[str, np.ndarray],
    kept: np.ndarray,
    caption: str,
    labels: list[str],
) -> bytes:
    """PNG bytes: a caption with a legend over one panel per scene (:func:`scene_panel`),
    each labelled (``labels``) when the slide has several scenes."""
    _, _, _, tissue_name, kept_name = PICTURE_COLOURS[modality]
    legend = f"{tissue_name}: tissue outline   {kept_name}: kept tile cores   grey: no tissue"
    columns, sizes = panel_sizes(scenes)
    label_h = PANEL_LABEL_H if len(scenes) > 1 else 0
    panels = [
        scene_panel(t, modality, fill, m, s, grid, kept, size)
        for t, m, s, size in zip(thumbnails, masks, scenes, sizes, strict=True)
    ]
    rows = [panels[i : i + columns] for i in range(0, len(panels), columns)]
    row_labels = [labels[i : i + columns] for i in range(0, len(labels), columns)]
    width = max(
        PICTURE_MIN_WIDTH,
        max(sum(p.shape[1] for p in row) + PANEL_GAP * (len(row) - 1) for row in rows),
    )
    blocks = []
    for row, names in zip(rows, row_labels, strict=True):
        height = max(p.shape[0] for p in row) + label_h
        block = np.full((height, width, 3), 255, np.uint8)
        x = 0
        for panel, name in zip(row, names, strict=True):
            block[label_h : label_h + panel.shape[0], x : x + panel.shape[1]] = panel
            if label_h:
                _text(block, name, (x + 2, label_h - 6), 0.45)
            x += panel.shape[1] + PANEL_GAP
        blocks.append(block)
        blocks.append(np.full((PANEL_GAP, width, 3), 255, np.uint8))
    bar = np.full((52, width, 3), 255, np.uint8)
    font_scale = 0.5 if width >= 700 else 0.4
    for line, text in enumerate((caption, legend)):
        _text(bar, text, (8, 20 + 22 * line), font_scale)
    return _png(np.vstack([bar, *blocks[:-1]]))


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


def check_id_is_free(slide_json: Path, info: dict) -> None:
    """Refuse to overwrite the plan of another slide file that maps to the same slide id.

    ``a b.czi`` and ``a_b.czi`` (or two non-ASCII names) both become ``a_b``: the second plan
    would silently replace the first. A plan of the same file (a rerun) may be replaced.
    """
    try:
        earlier = json.loads(slide_json.read_text(encoding="utf-8")).get("source")
    except (OSError, ValueError, AttributeError):
        return  # no plan there yet, or a damaged one: nothing of another slide to keep
    if isinstance(earlier, str) and earlier != info["source"]:
        raise BmsegError(
            f"{info['source']}: its slide id {info['slide_id']!r} is already the id of "
            f"{earlier} ({slide_json}); pass --slide-id to give one of them another id"
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
    modality: str | None = None,
    plane: dict[str, int | str] | None = None,
) -> dict:
    """Plan one slide; write its tile table, slide.json and tissue picture; return slide.json.

    Each scene is read and its tissue found on its own (one threshold for all of them); the
    tiles cover the scenes only. ``modality`` overrides the metadata's, ``plane`` picks the
    Z/T/... plane read (:func:`bmseg.slide.parse_plane`).
    """
    from bmseg.storage import atomic_path
    from bmseg.tissue import detect_scene_tissue, load_calibration

    if not mk_max_area_um2 > 0:
        raise BmsegError(f"--mk-max-area-um2 {mk_max_area_um2}: must be a positive area in µm²")
    out_dir = Path(out_dir)
    started = time.perf_counter()
    with open_slide(
        slide_path, pixel_size_um=pixel_size_um, slide_id=slide_id, modality=modality, plane=plane
    ) as slide:
        if margin is None:
            margin = default_margin(slide.pixel_size_um, mk_max_area_um2)
        check_tiling(tile_size, margin, min_tissue_fraction)
        log.info(
            "%s: %s (from the %s), %d scene(s), plane %s",
            slide.path,
            slide.modality,
            slide.modality_source,
            len(slide.scenes),
            _plane_text(slide.plane),
        )
        calibration = (
            load_calibration(calibration_path, slide.modality) if calibration_path else None
        )
        thumbnails, contrasts, factor = scene_contrasts_of(slide)
        read_seconds = time.perf_counter() - started
        um_per_px = [
            slide.pixel_size_um * s.w / t.shape[1]
            for s, t in zip(slide.scenes, thumbnails, strict=True)
        ]
        tissue = detect_scene_tissue(contrasts, um_per_px, calibration)
        masks = [t.mask for t in tissue]
        grid = tile_grid(slide.bounds, tile_size, margin, slide.scenes)
        fractions = tissue_fractions(masks, slide.scenes, grid)
        kept = fractions > min_tissue_fraction
        scene_mm2 = [
            float(m.sum())
            * (slide.pixel_size_um**2)
            * (s.w / m.shape[1])
            * (s.h / m.shape[0])
            / 1e6
            for m, s in zip(masks, slide.scenes, strict=True)
        ]
        scene_kept = [
            int((kept & (scene_tissue_px(m, s, grid) > 0)).sum())
            for m, s in zip(masks, slide.scenes, strict=True)
        ]
        tissue_mm2 = sum(scene_mm2)
        threshold = tissue[0].threshold
        info = {
            "slide_id": slide.slide_id,
            "source": slide.path.name,
            "pixel_size_um": slide.pixel_size_um,
            "channels": [{"name": c.name, "dtype": c.dtype} for c in slide.channels],
            "bounds": slide.bounds.as_dict(),
            "modality": slide.modality,
            "modality_source": slide.modality_source,
            "plane": slide.plane,
            "tissue_area_mm2": round(tissue_mm2, 6),
            "tile_size": tile_size,
            "margin": margin,
            "tiles_total": int(fractions.size),
            "tiles_kept": int(kept.sum()),
            "min_tissue_fraction": min_tissue_fraction,
            "tissue_threshold": None if math.isnan(threshold) else threshold,
            "tissue_method": tissue[0].method,
            "thumbnail_downsample": factor,
            "scenes": [
                {"index": i, "bounds": s.as_dict(), "tissue_area_mm2": round(a, 6), "tiles_kept": k}
                for i, (s, a, k) in enumerate(zip(slide.scenes, scene_mm2, scene_kept, strict=True))
            ],
            "intensity": slide_intensity(slide, thumbnails, masks),
        }
        scenes_text = f"  {len(slide.scenes)} scenes" if len(slide.scenes) > 1 else ""
        found = f"tissue {_area_text(tissue_mm2)} mm2" if kept.any() else "NO TISSUE FOUND"
        caption = (
            f"{slide.slide_id}  {slide.modality}{scenes_text}  {found}  "
            f"tiles kept {info['tiles_kept']}/{info['tiles_total']}  "
            f"(core {tile_size} px, margin {margin} px)"
        )
        labels = [
            f"scene {i}: {_area_text(a)} mm2, {k} tiles, "
            f"{slide.pixel_size_um * s.w / 1000:.3g} mm wide"
            for i, (s, a, k) in enumerate(zip(slide.scenes, scene_mm2, scene_kept, strict=True))
        ]
        picture = tissue_picture(
            thumbnails,
            slide.modality,
            slide.background,
            masks,
            slide.scenes,
            grid,
            kept,
            caption,
            labels,
        )
        table = tile_table(slide.slide_id, grid, fractions, kept, slide.pixel_size_um)
        if not kept.any():
            log.warning("%s: no tissue found; the tile table is empty", slide.path)
    stem = out_dir / info["slide_id"]
    paths = [Path(f"{stem}.tiles.parquet"), Path(f"{stem}.slide.json"), Path(f"{stem}.tissue.png")]
    check_id_is_free(paths[1], info)
    with (
        atomic_path(paths[0]) as tiles_tmp,
        atomic_path(paths[1]) as json_tmp,
        atomic_path(paths[2]) as png_tmp,
    ):
        pq.write_table(table, tiles_tmp, compression="zstd")
        json_tmp.write_text(json.dumps(info, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        png_tmp.write_bytes(picture)
    log.info(
        "plan %s: read %d scene(s) at 1/%d (%.2f µm/px) in %.2f s; tissue %s mm² (%s, "
        "threshold %.4g); kept %d of %d tiles (tile %d px, margin %d px); wrote %s in %.2f s",
        info["source"],
        len(thumbnails),
        factor,
        um_per_px[0],
        read_seconds,
        _area_text(tissue_mm2),
        info["tissue_method"],
        threshold,
        info["tiles_kept"],
        info["tiles_total"],
        tile_size,
        margin,
        ", ".join(p.name for p in paths),
        time.perf_counter() - started,
    )
    return info


def _plane_text(plane: dict[str, int | str]) -> str:
    return ",".join(f"{dim}={index}" for dim, index in plane.items()) or "-"


def scene_contrasts_of(slide: Slide) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """The slide's scene thumbnails, their tissue contrasts and the downsampling factor."""
    from bmseg.tissue import scene_contrasts

    thumbnails, factor = read_thumbnails(slide)
    return thumbnails, scene_contrasts(thumbnails, slide.modality, slide.background), factor


def calibrate_slides(
    slide_paths: list[Path],
    out: Path,
    pixel_size_um: float | None = None,
    slide_pixel_sizes: dict[Path, float] | None = None,
) -> dict:
    """Pool several slides' contrast histograms into one threshold file (same modality).

    ``slide_pixel_sizes`` gives a slide its own µm per pixel (a samplesheet's value), which
    wins over ``pixel_size_um``, the value for every other slide.
    """
    from bmseg.storage import write_json
    from bmseg.tissue import calibrate

    own_sizes = dict(slide_pixel_sizes or {})
    unknown = sorted(str(path) for path in set(own_sizes) - set(slide_paths))
    if unknown:
        raise BmsegError(
            f"--slide-pixel-size-um {unknown[0]}: not one of the slides given; "
            "name a SLIDE exactly as on the command line"
        )
    contrasts, modalities = [], set()
    for path in slide_paths:
        with open_slide(path, pixel_size_um=own_sizes.get(path, pixel_size_um)) as slide:
            contrasts.append(scene_contrasts_of(slide)[1])
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
        modality=args.modality,
        plane=parse_plane(args.plane),
    )
    return 0


def _calibrate_command(args: argparse.Namespace) -> int:
    calibrate_slides(args.slides, args.out, args.pixel_size_um, dict(args.slide_pixel_size_um))
    return 0


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
    parser.add_argument(
        "--modality",
        choices=MODALITIES,
        help="brightfield or fluorescence, overriding the metadata (default: the channels' "
        "contrast method in the metadata, else the image's background)",
    )
    parser.add_argument(
        "--plane",
        metavar="DIM=N,...",
        help="plane of a Z stack, time series or Airyscan file to read, e.g. Z=3,T=0; Z=max "
        "(fluorescence) or Z=min (brightfield) projects over Z (default: index 0 of each, with "
        "a warning)",
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
    calibrate_parser.add_argument(
        "--slide-pixel-size-um",
        type=slide_pixel_size,
        action="append",
        default=[],
        metavar="SLIDE=UM",
        help="one slide's own µm per pixel (repeatable), over --pixel-size-um and the metadata",
    )
    calibrate_parser.set_defaults(handler=_calibrate_command)
