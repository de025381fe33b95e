"""PAGES: a static annotation site (index + paged galleries per cell type) from gathered cells.

Why it looks like this: the old galleries inlined every crop as base64 and weighed 35 MB a
page. Here each crop is shrunk once to the size it is shown at and written as its own small
JPEG beside the page; the page carries only a small JSON block (uid, slide, area, contour as
an SVG path in thumbnail pixels, scale bar), which ``assets/bmseg.js`` turns into cards. The
site works from ``file://`` and from any static host; ``bmseg annotate serve`` adds saving to
disk. Every piece of user text is escaped (``html.escape`` here, ``textContent`` in the JS).
"""

from __future__ import annotations

import hashlib
import html
import io
import itertools
import json
import logging
import math
import os
import re
import shutil
import string
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from bmseg.cell_tables import find_cell_tables, flat_contours, require_columns
from bmseg.contract import (
    BATCHES_RECORD,
    CELLS_FILE,
    CROPS_FILE,
    GALLERY_ORDERS,
    RANKING_FILE,
    SITE_INDEX,
)
from bmseg.errors import BmsegError
from bmseg.storage import atomic_path, output_set, write_bytes

log = logging.getLogger(__name__)

CELL_COLUMNS = (
    "cell_uid",
    "slide_id",
    "cell_type",
    "area_px",
    "area_um2",
    "contour_x_px",
    "contour_y_px",
)
CROP_COLUMNS = ("cell_uid", "x", "y", "scale", "width", "height", "image")
JPEG_QUALITY = 80
SCALE_BAR_UM = np.array([0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000], dtype=np.float64)
ASSET_FILES = ("bmseg.js", "bmseg.css", "favicon.svg")


@dataclass(frozen=True)
class CellSource:
    """One cell table and the crop table found beside it by name."""

    cells: Path
    crops: Path


def crops_path_for(cells_path: Path) -> Path:
    """``X.cells.parquet`` → ``X.crops.parquet`` (and ``cells.parquet`` → ``crops.parquet``)."""
    name = cells_path.name
    if not name.endswith(CELLS_FILE):
        raise BmsegError(
            f"{cells_path}: a cell table's name must end in '{CELLS_FILE}' "
            "(e.g. SLIDE.cells.parquet); pass the gathered directory or its cell tables"
        )
    return cells_path.with_name(name.removesuffix(CELLS_FILE) + CROPS_FILE)


def find_sources(inputs: Sequence[Path]) -> list[CellSource]:
    """Expand CELLS arguments (gathered directories or cell tables) into cell/crop pairs."""
    sources: list[CellSource] = []
    for table in find_cell_tables(inputs, CELL_COLUMNS):
        crops = crops_path_for(table)
        if not crops.is_file():
            raise BmsegError(
                f"{table}: its crops {crops.name} are missing beside it; "
                "pass the directory bmseg gather wrote (it holds both)"
            )
        require_columns(crops, CROP_COLUMNS, "the crop table")
        sources.append(CellSource(table, crops))
    return sources


def find_ranking(inputs: Sequence[Path], ranking: Path | None) -> Path | None:
    """The ranking table given by flag, else a ``ranking.parquet`` in or beside the inputs."""
    if ranking is not None:
        if not ranking.is_file():
            raise BmsegError(f"{ranking}: no such ranking file; check --ranking")
        return ranking
    for item in inputs:
        folder = item if item.is_dir() else item.parent
        if (folder / RANKING_FILE).is_file():
            return folder / RANKING_FILE
    return None


def load_cells(sources: list[CellSource]) -> pa.Table:
    """The cells of all sources (no embeddings), with a ``source`` index column."""
    parts = []
    for index, source in enumerate(sources):
        table = pq.read_table(source.cells, columns=list(CELL_COLUMNS))
        parts.append(table.append_column("source", pa.array(np.full(len(table), index, np.int32))))
        log.info("read %d cells from %s", len(table), source.cells)
    cells = pa.concat_tables(parts)
    uids = cells["cell_uid"]
    if pc.count_distinct(uids).as_py() != len(uids):
        counts = pc.value_counts(uids)
        duplicate = counts.filter(pc.greater(counts.field("counts"), 1))[0]["values"]
        raise BmsegError(
            f"cell_uid {duplicate.as_py()!r} occurs more than once across the inputs; "
            "pass each gathered slide once"
        )
    return cells


def keep_cells_with_crops(cells: pa.Table, sources: list[CellSource]) -> pa.Table:
    """Drop (and report) cells that have no crop, which cannot be shown."""
    crop_uids = pa.concat_arrays(
        [pq.read_table(s.crops, columns=["cell_uid"])["cell_uid"].combine_chunks() for s in sources]
    )
    has_crop = pc.is_in(cells["cell_uid"], value_set=crop_uids)
    missing = len(cells) - pc.sum(has_crop).as_py() if len(cells) else 0
    if missing:
        log.warning("%d cells have no crop and are left out of the galleries", missing)
    return cells.filter(has_crop)


def segmenting_weights(sources: list[CellSource]) -> str | None:
    """``"test"`` or ``"demo"`` when gather's ``batches.json`` beside the tables says SEGMENT
    ran make-test's random weights or make-demo's synthetic-only ones; else None."""
    kinds = set()
    for folder in dict.fromkeys(source.cells.parent for source in sources):
        record = folder / BATCHES_RECORD
        try:
            batches = json.loads(record.read_text(encoding="utf-8"))["batches"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # only used to explain an empty site: a missing record explains nothing
        for batch in batches if isinstance(batches, list) else []:
            models = batch.get("models") if isinstance(batch, dict) else None
            manifest = models.get("manifest") if isinstance(models, dict) else None
            if not isinstance(manifest, dict):
                continue
            training = manifest.get("training")
            if isinstance(training, dict) and training.get("kind") == "demo":
                kinds.add("demo")
            elif manifest.get("random_init") is True:
                kinds.add("test")
    return "test" if "test" in kinds else "demo" if "demo" in kinds else None


def nothing_to_show(where: Path, sources: list[CellSource], found: int) -> BmsegError:
    """The error for a site without one cell to show: why it is empty and what to do."""
    if found:
        return BmsegError(
            f"{where}: none of its {found} cells has a crop; gather SEGMENT's batch folders "
            "with their crops.parquet again"
        )
    why = {
        "test": "SEGMENT ran random test weights (bmseg models make-test), which find no cells",
        "demo": "SEGMENT ran the demo weights (bmseg models make-demo), which find only the "
        "HSPCs of bmseg synth slides",
        None: "SEGMENT found no cells in the segmented tiles (see the report and tissue pictures)",
    }[segmenting_weights(sources)]
    return BmsegError(
        f"{where}: no cells to show: {why}; segment with weights that find cells (bmseg models "
        "make-demo --dest DIR for synthetic slides, bmseg models fetch --dest DIR for real "
        "ones), then gather again"
    )


def page_order(
    cells: pa.Table, order: str, seed: int, uncertainty: np.ndarray | None
) -> np.ndarray:
    """Row indices of ``cells`` in gallery order (within each cell type, applied later)."""
    rows = len(cells)
    if order == "random":
        return np.random.default_rng(seed).permutation(rows)
    if order == "size":
        area = cells["area_um2"].to_numpy(zero_copy_only=False)
        return np.argsort(-area, kind="stable")
    assert uncertainty is not None
    # Most uncertain first; cells the ranking does not cover go last.
    key = np.where(np.isnan(uncertainty), -np.inf, uncertainty)
    return np.argsort(-key, kind="stable")


def load_uncertainty(cells: pa.Table, ranking: Path) -> np.ndarray:
    """Per-cell uncertainty from the ranking table, NaN where a cell is not ranked."""
    require_columns(ranking, ("cell_uid", "uncertainty"), "the ranking table")
    table = pq.read_table(ranking, columns=["cell_uid", "uncertainty"])
    position = pc.index_in(cells["cell_uid"], value_set=table["cell_uid"])
    values = table["uncertainty"].to_numpy(zero_copy_only=False).astype(np.float64)
    found = position.is_valid().to_numpy(zero_copy_only=False)
    result = np.full(len(cells), np.nan)
    result[found] = values[position.drop_null().to_numpy()]
    log.info("ranked %d of %d cells from %s", int(found.sum()), len(cells), ranking)
    return result


def safe_dir_name(cell_type: str) -> str:
    """A folder name for a cell type: itself when plain, else a readable slug plus a hash."""
    if re.fullmatch(r"[A-Za-z0-9_-]{1,40}", cell_type):
        return cell_type
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", cell_type)[:20]
    return f"{slug}_{hashlib.sha1(cell_type.encode()).hexdigest()[:8]}"


def nice_scale_bars(um_per_px: np.ndarray, width_px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale-bar length (µm, a round number) and its length in px: about a third of the width."""
    target = width_px * um_per_px / 3.0
    choice = np.searchsorted(SCALE_BAR_UM, target, side="right") - 1
    length_um = SCALE_BAR_UM[np.clip(choice, 0, len(SCALE_BAR_UM) - 1)]
    return length_um, length_um / um_per_px


def format_um(value: float) -> str:
    """``10`` → ``'10 µm'``, ``0.5`` → ``'0.5 µm'``."""
    return f"{value:g} µm"


def finite(value: float, digits: int) -> float | None:
    """``value`` rounded, or None (JSON null) when it is NaN or infinite."""
    return round(float(value), digits) if np.isfinite(value) else None


def scale_bar(length_px: float, length_um: float) -> list | None:
    """``[length in thumbnail px, label]``, or None when the pixel size is unknown."""
    if not (np.isfinite(length_px) and length_px > 0):
        return None
    return [round(float(length_px), 1), format_um(length_um)]


def svg_path(points: np.ndarray) -> str:
    """A closed SVG path from (n, 2) points in thumbnail px, simplified to 0.5 px."""
    if len(points) < 3:
        return ""
    simple = cv2.approxPolyDP(points.astype(np.float32).reshape(-1, 1, 2), 0.5, True)
    coords = np.round(simple.reshape(-1, 2)).astype(np.int64)
    pairs = [f"{x} {y}" for x, y in coords]
    return "M" + "L".join(pairs) + "Z"


def make_thumbnail(jpeg: bytes, width: int, height: int, size: int) -> tuple[bytes, int, int]:
    """Shrink a crop to fit ``size`` px (never enlarged) and re-encode it as a small JPEG.

    A crop that cannot be decoded becomes a grey placeholder of the crop's shape, so the cell
    still shows (with its contour) instead of the whole site failing.
    """
    try:
        with Image.open(io.BytesIO(jpeg)) as source:
            source.draft("RGB", (size, size))
            image = source.convert("RGB")
    except (UnidentifiedImageError, OSError):
        image = Image.new("RGB", (max(1, int(width)), max(1, int(height))), (128, 128, 128))
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=JPEG_QUALITY, optimize=True)
    return out.getvalue(), image.width, image.height


def write_thumbnail(
    jpeg: bytes, width: int, height: int, size: int, target: Path
) -> tuple[int, int]:
    """Write the thumbnail of one crop to ``target``; return its width and height."""
    data, thumb_width, thumb_height = make_thumbnail(jpeg, width, height, size)
    write_bytes(data, target)
    return thumb_width, thumb_height


def json_for_script(data: object) -> str:
    """JSON that is safe inside ``<script type="application/json">``: no ``</script>``, ``<!--``."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(char, escaped)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _template(name: str) -> string.Template:
    return string.Template(resources.files("bmseg").joinpath("templates", name).read_text("utf-8"))


@dataclass
class Layout:
    """Where every kept cell goes: its cell type's folder, page and slot."""

    type_dirs: dict[str, str]
    page_of: np.ndarray  # 1-based page within the cell type
    slot_of: np.ndarray  # 0-based position within the page
    pages: dict[str, int]  # cell type -> number of pages

    def image_name(self, row: int, uid: str) -> str:
        """The crop file of ``row`` (cell ``uid``), relative to its gallery page.

        Named by the uid, not by the slot: a page left from an earlier run can never show
        another cell's picture under its uid.
        """
        return f"p{self.page_of[row]:04d}/{hashlib.sha1(uid.encode()).hexdigest()[:16]}.jpg"


def plan_layout(cells: pa.Table, order: np.ndarray, per_page: int) -> Layout:
    """Split ordered cells into pages of ``per_page`` per cell type."""
    types = cells["cell_type"].to_numpy(zero_copy_only=False)
    page_of = np.zeros(len(cells), np.int64)
    slot_of = np.zeros(len(cells), np.int64)
    pages: dict[str, int] = {}
    type_dirs: dict[str, str] = {}
    for cell_type in sorted(set(types.tolist())):
        rows = order[types[order] == cell_type]
        rank = np.arange(len(rows))
        page_of[rows] = rank // per_page + 1
        slot_of[rows] = rank % per_page
        pages[cell_type] = math.ceil(len(rows) / per_page)
        type_dirs[cell_type] = safe_dir_name(cell_type)
    if len(set(type_dirs.values())) != len(type_dirs):
        raise BmsegError("two cell types map to one folder name; rename the cell types")
    return Layout(type_dirs, page_of, slot_of, pages)


def render_crops(
    cells: pa.Table, sources: list[CellSource], layout: Layout, site: Path, size: int
) -> dict[str, np.ndarray]:
    """Write every kept cell's thumbnail; return per-row thumbnail size, contour and scale bar.

    Reads one crop table at a time, so memory stays bounded by the largest slide's crops.
    """
    rows = len(cells)
    thumb_w = np.zeros(rows, np.int64)
    thumb_h = np.zeros(rows, np.int64)
    paths = np.full(rows, "", dtype=object)
    bar_px = np.zeros(rows)
    bar_um = np.zeros(rows)
    area_px = cells["area_px"].to_numpy(zero_copy_only=False).astype(np.float64)
    area_um2 = cells["area_um2"].to_numpy(zero_copy_only=False).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        um_per_slide_px = np.sqrt(area_um2 / area_px)
    source_of = cells["source"].to_numpy()
    types = cells["cell_type"].to_numpy(zero_copy_only=False)
    uids = cells["cell_uid"].to_numpy(zero_copy_only=False)
    with tqdm(total=rows, desc="crops", unit="cell", unit_scale=True) as progress:
        for index, source in enumerate(sources):
            in_source = np.flatnonzero(source_of == index)
            if not len(in_source):
                continue
            crops = pq.read_table(source.crops, columns=list(CROP_COLUMNS))
            where = pc.index_in(cells["cell_uid"].take(in_source), value_set=crops["cell_uid"])
            crop_rows = where.to_numpy(zero_copy_only=False).astype(np.int64)
            crop = {
                name: crops[name].to_numpy(zero_copy_only=False)[crop_rows]
                for name in ("x", "y", "scale", "width", "height")
            }
            images = crops["image"].take(pa.array(crop_rows))
            targets = [
                site / layout.type_dirs[types[r]] / layout.image_name(r, uids[r]) for r in in_source
            ]
            # Pillow releases the GIL while decoding and encoding: threads use every core.
            with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
                sizes = pool.map(
                    write_thumbnail,
                    (image.as_py() for image in images),
                    crop["width"],
                    crop["height"],
                    itertools.repeat(size),
                    targets,
                )
                for row, (w, h) in zip(in_source, sizes, strict=True):
                    thumb_w[row], thumb_h[row] = w, h
                    progress.update()
            factor = thumb_w[in_source] / crop["width"]
            um_per_thumb_px = um_per_slide_px[in_source] * crop["scale"] * (1.0 / factor)
            length_um, length_px = nice_scale_bars(um_per_thumb_px, thumb_w[in_source])
            bar_um[in_source], bar_px[in_source] = length_um, length_px
            paths[in_source] = contour_paths(
                cells.take(pa.array(in_source)), crop["x"], crop["y"], crop["scale"], factor
            )
            log.info("wrote %d thumbnails from %s", len(in_source), source.crops)
    return {"w": thumb_w, "h": thumb_h, "path": paths, "bar_px": bar_px, "bar_um": bar_um}


def contour_paths(
    cells: pa.Table, x0: np.ndarray, y0: np.ndarray, scale: np.ndarray, factor: np.ndarray
) -> list[str]:
    """Contours moved from slide px into thumbnail px (vectorised), as SVG paths.

    SEGMENT's crop geometry (docs/cells.md, Crops): contour points are pixel centres, so a point
    ``(cx, cy)`` lands at crop point ``((cx + 0.5 - x) / scale, (cy + 0.5 - y) / scale)``; the
    thumbnail is that crop shrunk by ``factor``, and SVG user units are its pixels.
    """
    flat_x, flat_y, bounds = flat_contours(cells)
    counts = np.diff(bounds)
    mult = np.repeat(factor / scale, counts)
    tx = (flat_x + 0.5 - np.repeat(x0, counts)) * mult
    ty = (flat_y + 0.5 - np.repeat(y0, counts)) * mult
    points = np.stack([tx, ty], axis=1)
    return [svg_path(points[bounds[i] : bounds[i + 1]]) for i in range(len(counts))]


def site_id(cells: pa.Table) -> str:
    """A short id from the set of cell uids: labels in the browser are kept per site."""
    uids = np.sort(cells["cell_uid"].to_numpy(zero_copy_only=False).astype(str))
    return hashlib.sha1("\n".join(uids.tolist()).encode()).hexdigest()[:12]


def pager_html(page: int, pages: int) -> str:
    """Previous / next links and a page counter, rendered server-side."""
    parts = []
    if page > 1:
        parts.append(f'<a rel="prev" href="page-{page - 1:04d}.html">← Previous</a>')
    parts.append(f'<span class="page-no">page {page} of {pages}</span>')
    if page < pages:
        parts.append(f'<a rel="next" href="page-{page + 1:04d}.html">Next →</a>')
    return " ".join(parts)


def write_galleries(
    cells: pa.Table, layout: Layout, thumbs: dict[str, np.ndarray], site: Path, site_key: str
) -> None:
    """One HTML page per cell type and page, each with its cells as a JSON block."""
    template = _template("gallery.html")
    uids = cells["cell_uid"].to_numpy(zero_copy_only=False)
    slides = cells["slide_id"].to_numpy(zero_copy_only=False)
    types = cells["cell_type"].to_numpy(zero_copy_only=False)
    areas = cells["area_um2"].to_numpy(zero_copy_only=False)
    for cell_type, pages in layout.pages.items():
        of_type = np.flatnonzero(types == cell_type)
        for page in range(1, pages + 1):
            rows = of_type[layout.page_of[of_type] == page]
            rows = rows[np.argsort(layout.slot_of[rows])]
            data = {
                "view": "gallery",
                "site": site_key,
                "root": "../",
                "cellType": cell_type,
                "page": page,
                "pages": pages,
                "cells": [
                    {
                        "u": uids[r],
                        "s": slides[r],
                        "a": finite(areas[r], 1),
                        "i": layout.image_name(r, uids[r]),
                        "w": int(thumbs["w"][r]),
                        "h": int(thumbs["h"][r]),
                        "c": thumbs["path"][r],
                        "b": scale_bar(thumbs["bar_px"][r], thumbs["bar_um"][r]),
                    }
                    for r in rows
                ],
            }
            title = f"{cell_type} · page {page} of {pages}"
            text = template.substitute(
                title=html.escape(title),
                heading=html.escape(cell_type),
                pager=pager_html(page, pages),
                root="../",
                data=json_for_script(data),
            )
            write_bytes(text.encode(), site / layout.type_dirs[cell_type] / f"page-{page:04d}.html")
        log.info("wrote %d %s gallery page(s)", pages, cell_type)


def write_index(cells: pa.Table, layout: Layout, site: Path, site_key: str) -> None:
    """``index.html``: a row per slide and cell type (cells, labelled) and every page's link."""
    grouped = (
        pa.table({"slide_id": cells["slide_id"], "cell_type": cells["cell_type"]})
        .group_by(["slide_id", "cell_type"])
        .aggregate([([], "count_all")])
        .sort_by([("cell_type", "ascending"), ("slide_id", "ascending")])
    )
    rows_html = []
    rows_data = []
    for i, row in enumerate(grouped.to_pylist()):
        cell_type, slide, count = row["cell_type"], row["slide_id"], row["count_all"]
        link = f"{layout.type_dirs[cell_type]}/page-0001.html"
        rows_html.append(
            f'<tr data-row="{i}"><td class="slide">{html.escape(slide)}</td>'
            f"<td>{html.escape(cell_type)}</td><td class=num>{count}</td>"
            '<td class="num labelled">–</td><td class="num yes">–</td>'
            '<td class="num no">–</td><td class="num unsure">–</td>'
            f'<td><a href="{html.escape(link)}">open</a></td></tr>'
        )
        rows_data.append({"slide": slide, "type": cell_type, "cells": count})
    sections = []
    types_data = []
    for cell_type, pages in layout.pages.items():
        folder = layout.type_dirs[cell_type]
        total = int(np.sum(cells["cell_type"].to_numpy(zero_copy_only=False) == cell_type))
        links = " ".join(
            f'<a href="{html.escape(folder)}/page-{p:04d}.html">{p}</a>'
            for p in range(1, pages + 1)
        )
        sections.append(
            f'<section class="type" data-type="{len(types_data)}"><h2>{html.escape(cell_type)} '
            f'<span class="muted">{total} cells · {pages} page(s) · '
            '<span class="labelled">–</span> labelled</span></h2>'
            f'<p class="pages">{links}</p></section>'
        )
        types_data.append({"type": cell_type, "cells": total})
    data = {"view": "index", "site": site_key, "root": "", "rows": rows_data, "types": types_data}
    text = _template("index.html").substitute(
        rows="\n".join(rows_html),
        sections="\n".join(sections),
        total=len(cells),
        data=json_for_script(data),
    )
    write_bytes(text.encode(), site / SITE_INDEX)


def copy_assets(site: Path) -> None:
    """The shared script and stylesheet, once per site."""
    for name in ASSET_FILES:
        with (
            resources.files("bmseg").joinpath("assets", name).open("rb") as source,
            atomic_path(site / "assets" / name) as tmp,
            tmp.open("wb") as target,
        ):
            shutil.copyfileobj(source, target)


def build_pages(
    inputs: Sequence[Path],
    site: Path,
    *,
    per_page: int = 300,
    order: str = "random",
    seed: int = 0,
    image_size: int = 160,
    ranking: Path | None = None,
) -> dict[str, int]:
    """``bmseg pages``: validate the inputs, then write the whole site as one output set.

    ``inputs`` are gathered (or classified) directories or their cell tables, each with its
    crops beside it. Galleries list each cell type in ``order`` (``random`` by ``seed``,
    ``size``, or ``uncertainty`` from ``ranking`` or the ranking.parquet beside the inputs),
    ``per_page`` cells a page, crops shrunk to ``image_size`` px. Returns pages per cell type.
    """
    if per_page < 1:
        raise BmsegError(f"--per-page {per_page}: must be at least 1")
    if not 32 <= image_size <= 512:
        raise BmsegError(f"--image-size {image_size}: choose between 32 and 512 px")
    if order not in GALLERY_ORDERS:
        raise BmsegError(f"--order {order}: choose one of {', '.join(GALLERY_ORDERS)}")
    if site.exists() and not site.is_dir():
        raise BmsegError(f"{site}: exists and is not a directory; choose another --out")
    sources = find_sources(inputs)
    ranking_path = find_ranking(inputs, ranking)
    if order == "uncertainty" and ranking_path is None:
        raise BmsegError(
            "--order uncertainty needs a ranking.parquet (bmseg classify) beside CELLS; "
            "pass --ranking FILE or use --order random"
        )
    loaded = load_cells(sources)
    cells = keep_cells_with_crops(loaded, sources)
    if not len(cells):
        raise nothing_to_show(inputs[0], sources, len(loaded))
    uncertainty = load_uncertainty(cells, ranking_path) if order == "uncertainty" else None
    layout = plan_layout(cells, page_order(cells, order, seed, uncertainty), per_page)
    site_key = site_id(cells)
    with output_set(site) as staging:  # a new site beside the old, renamed into place
        copy_assets(staging)
        thumbs = render_crops(cells, sources, layout, staging, image_size)
        write_galleries(cells, layout, thumbs, staging, site_key)
        write_index(cells, layout, staging, site_key)
    log.info("wrote site %s: %d cells, pages %s", site, len(cells), layout.pages)
    return layout.pages
