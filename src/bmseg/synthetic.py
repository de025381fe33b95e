"""The synthetic slide itself: tissue, planted MK- and HSPC-like cells, their pixels and truth.

Everything derives from the seed; a mosaic tile is rendered on its own, so the slide is never
held in memory (see :mod:`bmseg.synth`).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import cv2
import numpy as np
import pyarrow as pa
from scipy import ndimage
from scipy.spatial import Voronoi, cKDTree

from bmseg.contract import MODALITIES, SYNTH_DENSITIES
from bmseg.errors import BmsegError
from bmseg.slide import Rect

log = logging.getLogger(__name__)

PIXEL_SIZE_UM = 0.1725
MOSAIC_TILE = 1024
FIELD_STEP = 32  # px between samples of the tissue field
SUBPIXEL_SHIFT = 4  # fixed-point bits for polygon rasterisation
MK_AREA_UM2 = (250.0, 1900.0)  # inside the 200-2000 µm² MK range after rasterisation
HSPC_DIAMETER_UM = (6.3, 9.7)  # inside 6-10 µm
MK_PER_MM2 = 40.0  # planted densities per mm² of tissue
HSPC_PER_MM2 = 400.0
CELL_GAP_PX = 6  # minimum clearance between cells' bounding circles
MARROW_CELL_AREA_UM2 = 38.0
"""Mean planted cell area at marrow density: ~7 000 cells would fill a 3000² px tile of tissue."""
MARROW_MK_PER_MM2 = 60.0
FLUORESCENCE_CHANNELS = ("DAPI", "CD41")


@dataclass(frozen=True)
class PlantedCell:
    """One planted cell: its outline polygon and, for MKs, its nucleus, in slide px."""

    cell_type: str
    outline: np.ndarray  # (N, 2) float64 x, y
    nucleus: np.ndarray  # (M, 2) float64 x, y; empty for HSPCs
    shade: float  # per-cell intensity factor around 1

    @property
    def box(self) -> tuple[int, int, int, int]:
        """Integer box ``x0, y0, x1, y1`` (half-open) holding every rasterised pixel."""
        low = np.floor(self.outline.min(axis=0)).astype(int) - 1
        high = np.ceil(self.outline.max(axis=0)).astype(int) + 2
        return int(low[0]), int(low[1]), int(high[0]), int(high[1])


def _fixed_point(polygon: np.ndarray, origin_x: int, origin_y: int) -> np.ndarray:
    """Polygon vertices relative to an integer origin, in cv2's fixed-point format."""
    scale = 1 << SUBPIXEL_SHIFT
    shifted = (polygon - (origin_x, origin_y)) * scale
    return np.round(shifted).astype(np.int32).reshape(-1, 1, 2)


def _fill(canvas: np.ndarray, polygon: np.ndarray, origin_x: int, origin_y: int, value) -> None:
    """Fill ``polygon`` (slide px) into ``canvas``, pixel (0, 0) at slide (origin_x, origin_y)."""
    points = _fixed_point(polygon, origin_x, origin_y)
    cv2.fillPoly(canvas, [points], value, lineType=cv2.LINE_8, shift=SUBPIXEL_SHIFT)


class SyntheticLayout:
    """Tissue and cells of one synthetic slide, computed from its size and seed alone."""

    def __init__(
        self,
        width: int,
        height: int,
        seed: int,
        modality: str = "brightfield",
        density: str = "sparse",
    ) -> None:
        if modality not in MODALITIES:
            raise BmsegError(f"--modality {modality!r}: choose brightfield or fluorescence")
        if density not in SYNTH_DENSITIES:
            raise BmsegError(f"--density {density!r}: choose {' or '.join(SYNTH_DENSITIES)}")
        self.width, self.height, self.seed, self.modality = width, height, seed, modality
        rng = np.random.default_rng(seed)
        self._field = _tissue_field(width, height, rng)
        self._shade_field = smooth_noise(self._field.shape, 4.0, rng)
        if density == "marrow":
            self.cells = _place_cells(self, rng, mk_per_mm2=MARROW_MK_PER_MM2, hspc_per_mm2=0.0)
            self.cells += _pack_cells(self, rng, self.cells)
        else:
            self.cells = _place_cells(self, rng)

    def _sample(self, field: np.ndarray, x: int, y: int, w: int, h: int, step: int) -> np.ndarray:
        """``field`` bilinearly interpolated at slide pixels ``x + j*step, y + i*step``."""
        columns = (x + np.arange(0, w, step, dtype=np.float64)) / FIELD_STEP
        rows = (y + np.arange(0, h, step, dtype=np.float64)) / FIELD_STEP
        map_x = np.broadcast_to(columns.astype(np.float32), (rows.size, columns.size))
        map_y = np.broadcast_to(rows.astype(np.float32)[:, None], (rows.size, columns.size))
        return cv2.remap(
            field, np.ascontiguousarray(map_x), np.ascontiguousarray(map_y), cv2.INTER_LINEAR
        )

    def tissue_mask(self, x: int, y: int, w: int, h: int, step: int = 1) -> np.ndarray:
        """The true tissue mask of a rectangle, sampled every ``step`` slide px."""
        inside = self._sample(self._field, x, y, w, h, step) > 0.5
        columns = x + np.arange(0, w, step)
        rows = y + np.arange(0, h, step)
        inside &= (columns >= 0) & (columns < self.width)
        inside &= ((rows >= 0) & (rows < self.height))[:, None]
        return inside

    def acquired(self, rect: Rect) -> bool:
        """Whether a scanner would acquire this mosaic tile: tissue within one tile of it."""
        pad = MOSAIC_TILE
        grown = Rect(rect.x - pad, rect.y - pad, rect.w + 2 * pad, rect.h + 2 * pad)
        return bool(self.tissue_mask(grown.x, grown.y, grown.w, grown.h, FIELD_STEP).any())

    def render(self, rect: Rect) -> np.ndarray:
        """Pixels of ``rect``: (h, w, 3) uint8 RGB or (h, w, 2) uint16 fluorescence."""
        x, y, w, h = rect.x, rect.y, rect.w, rect.h
        tissue = self.tissue_mask(x, y, w, h)
        shade = self._sample(self._shade_field, x, y, w, h, 1)
        rng = np.random.default_rng([self.seed, x, y])
        if self.modality == "brightfield":
            image = _brightfield_base(tissue, shade)
        else:
            image = _fluorescence_base(tissue, shade)
        for cell in self._cells_meeting(rect):
            _draw_cell(image, cell, x, y, self.modality)
        noise_sigma = 3.0 if self.modality == "brightfield" else 40.0
        noise = rng.standard_normal(image.shape, dtype=np.float32) * noise_sigma
        dtype = np.uint8 if self.modality == "brightfield" else np.uint16
        return np.clip(image + noise, 0, np.iinfo(dtype).max).astype(dtype)

    def _cells_meeting(self, rect: Rect) -> list[PlantedCell]:
        boxes = self._boxes
        hit = (
            (boxes[:, 0] < rect.right)
            & (boxes[:, 2] > rect.x)
            & (boxes[:, 1] < rect.bottom)
            & (boxes[:, 3] > rect.y)
        )
        return [self.cells[i] for i in np.flatnonzero(hit)]

    @functools.cached_property
    def _boxes(self) -> np.ndarray:
        """Every cell's box as rows ``x0, y0, x1, y1``, to find the cells meeting a tile."""
        return np.array([c.box for c in self.cells], dtype=np.int64).reshape(-1, 4)


def smooth_noise(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-smoothed white noise scaled to unit standard deviation."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    return (noise / max(noise.std(), 1e-9)).astype(np.float32)


def _tissue_field(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A few irregular tissue blobs as a smooth field; tissue is where it exceeds 0.5."""
    rows, cols = height // FIELD_STEP + 2, width // FIELD_STEP + 2
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    field = np.zeros((rows, cols), np.float32)
    side = min(rows, cols)
    for _ in range(int(rng.integers(2, 5))):
        cx, cy = rng.uniform(0.25, 0.75) * cols, rng.uniform(0.25, 0.75) * rows
        rx, ry = rng.uniform(0.14, 0.26, size=2) * side
        angle = rng.uniform(0, np.pi)
        dx, dy = xx - cx, yy - cy
        u = (dx * np.cos(angle) + dy * np.sin(angle)) / rx
        v = (-dx * np.sin(angle) + dy * np.cos(angle)) / ry
        field += np.exp(-(u**2 + v**2))
    field += 0.25 * smooth_noise((rows, cols), max(2.0, side / 25), rng)
    return field


def lobed_outline(
    radius: float, lobes: int, amplitude: float, rng: np.random.Generator, vertices: int = 96
) -> tuple[np.ndarray, np.ndarray]:
    """Angles and radii of an irregular lobulated outline around the origin."""
    theta = np.linspace(0, 2 * np.pi, vertices, endpoint=False)
    r = 1 + amplitude * np.cos(lobes * theta + rng.uniform(0, 2 * np.pi))
    r += rng.uniform(0.02, 0.07) * np.cos((lobes + 1) * theta + rng.uniform(0, 2 * np.pi))
    r += rng.uniform(0.0, 0.05) * np.cos(2 * theta + rng.uniform(0, 2 * np.pi))
    return theta, radius * r


def polygon_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def make_mk(cx: float, cy: float, rng: np.random.Generator) -> PlantedCell:
    """An MK-like cell: irregular lobulated outline of 250-1900 µm², lobulated nucleus inside."""
    area_px = np.exp(rng.uniform(*np.log(MK_AREA_UM2))) / PIXEL_SIZE_UM**2
    lobes = int(rng.integers(2, 6))
    theta, r = lobed_outline(1.0, lobes, rng.uniform(0.08, 0.18), rng)
    unit = np.column_stack([r * np.cos(theta), r * np.sin(theta)])
    scale = np.sqrt(area_px / polygon_area(unit))
    outline = unit * scale + (cx, cy)
    nuclear_lobes = int(rng.integers(3, 6))
    fraction = 0.42 + 0.14 * (1 + np.cos(nuclear_lobes * theta + rng.uniform(0, 2 * np.pi))) / 2
    nucleus = unit * scale * fraction[:, None] + (cx, cy)
    return PlantedCell("MK", outline, nucleus, float(rng.uniform(0.9, 1.1)))


def make_hspc(cx: float, cy: float, rng: np.random.Generator) -> PlantedCell:
    """An HSPC-like cell: round, 6.3-9.7 µm across, slightly elliptical."""
    diameter_px = rng.uniform(*HSPC_DIAMETER_UM) / PIXEL_SIZE_UM
    ratio = rng.uniform(0.88, 1.0)
    a, b = diameter_px / 2 / np.sqrt(ratio), diameter_px / 2 * np.sqrt(ratio)
    theta = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    angle = rng.uniform(0, np.pi)
    x, y = a * np.cos(theta), b * np.sin(theta)
    outline = np.column_stack(
        [x * np.cos(angle) - y * np.sin(angle) + cx, x * np.sin(angle) + y * np.cos(angle) + cy]
    )
    return PlantedCell("HSPC", outline, np.empty((0, 2)), float(rng.uniform(0.9, 1.1)))


def _place_cells(
    layout: SyntheticLayout,
    rng: np.random.Generator,
    mk_per_mm2: float = MK_PER_MM2,
    hspc_per_mm2: float = HSPC_PER_MM2,
) -> list[PlantedCell]:
    """Cells at densities per mm² of tissue, wholly inside tissue, not touching each other."""
    field = layout._field
    step_mask = field > 0.5
    rows, cols = step_mask.shape
    step_mask[:, cols - 2 :] = False  # the field extends past the slide edge
    step_mask[rows - 2 :, :] = False
    step_mm2 = (FIELD_STEP * PIXEL_SIZE_UM / 1000) ** 2
    tissue_mm2 = float(step_mask.sum()) * step_mm2
    placed: list[PlantedCell] = []
    grid: dict[tuple[int, int], list[tuple[float, float, float]]] = {}
    bucket = 512
    for cell_type, density, make, erosion in (
        ("MK", mk_per_mm2, make_mk, 6),
        ("HSPC", hspc_per_mm2, make_hspc, 2),
    ):
        allowed = np.argwhere(ndimage.binary_erosion(step_mask, iterations=erosion))
        wanted = round(density * tissue_mm2)
        if not len(allowed) or not wanted:
            continue
        count = 0
        for _ in range(wanted * 4):
            if count == wanted:
                break
            row, col = allowed[rng.integers(len(allowed))]
            cx, cy = (col + rng.uniform()) * FIELD_STEP, (row + rng.uniform()) * FIELD_STEP
            cell = make(cx, cy, rng)
            reach = float(np.hypot(*(cell.outline - (cx, cy)).T).max())
            if not _clear(grid, bucket, cx, cy, reach):
                continue
            if not _inside_tissue(layout, cell):
                continue
            placed.append(cell)
            grid.setdefault((int(cx // bucket), int(cy // bucket)), []).append((cx, cy, reach))
            count += 1
        log.debug("placed %d of %d %s cells", count, wanted, cell_type)
    return placed


def _pack_cells(
    layout: SyntheticLayout, rng: np.random.Generator, placed: list[PlantedCell]
) -> list[PlantedCell]:
    """Tissue around the ``placed`` cells tiled with small cells, as marrow is packed.

    Seeds on a hexagonal grid of cell area :data:`MARROW_CELL_AREA_UM2`, jittered by a
    quarter spacing; each seed's Voronoi cell, shrunk 1.5 px towards its seed, is a cell, kept
    when it lies wholly in tissue and clear of every placed cell.
    """
    spacing = np.sqrt(MARROW_CELL_AREA_UM2 / (np.sqrt(3) / 2)) / PIXEL_SIZE_UM
    rows = np.arange(-1, layout.height / (spacing * np.sqrt(3) / 2) + 2)
    cols = np.arange(-1, layout.width / spacing + 2)
    grid_x = cols[None, :] * spacing + (rows[:, None] % 2) * spacing / 2
    grid_y = np.broadcast_to(rows[:, None] * spacing * np.sqrt(3) / 2, grid_x.shape)
    seeds = np.column_stack([grid_x.ravel(), grid_y.ravel()])
    seeds += rng.uniform(-0.25, 0.25, seeds.shape) * spacing
    diagram = Voronoi(seeds)
    others = np.array([c.outline.mean(axis=0) for c in placed]).reshape(-1, 2)
    reach = np.array([np.hypot(*(c.outline - c.outline.mean(axis=0)).T).max() for c in placed])
    tree = cKDTree(others) if len(others) else None
    cells = []
    for seed, region_index in zip(seeds, diagram.point_region, strict=True):
        region = diagram.regions[region_index]
        if not region or -1 in region:
            continue
        polygon = diagram.vertices[region]
        offsets = polygon - seed
        lengths = np.hypot(*offsets.T)[:, None]
        polygon = seed + offsets * np.maximum(lengths - 1.5, 0) / np.maximum(lengths, 1e-9)
        if tree is not None:
            near = tree.query_ball_point(seed, float(reach.max(initial=0)) + spacing + CELL_GAP_PX)
            if any(np.hypot(*(others[i] - seed)) < reach[i] + spacing + CELL_GAP_PX for i in near):
                continue
        cell = PlantedCell("HSPC", polygon, np.empty((0, 2)), float(rng.uniform(0.9, 1.1)))
        if _inside_tissue(layout, cell):
            cells.append(cell)
    log.debug("packed %d cells around %d placed ones", len(cells), len(placed))
    return cells


def _clear(grid: dict, bucket: int, cx: float, cy: float, reach: float) -> bool:
    """No placed cell's bounding circle comes within CELL_GAP_PX of this one's."""
    bx, by = int(cx // bucket), int(cy // bucket)
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            for ox, oy, other in grid.get((bx + dx, by + dy), ()):
                if np.hypot(cx - ox, cy - oy) < reach + other + CELL_GAP_PX:
                    return False
    return True


def _inside_tissue(layout: SyntheticLayout, cell: PlantedCell) -> bool:
    """Every rasterised pixel of the cell lies in tissue, inside the slide."""
    x0, y0, x1, y1 = cell.box
    if x0 < 0 or y0 < 0 or x1 > layout.width or y1 > layout.height:
        return False
    mask = cell_mask(cell)
    tissue = layout.tissue_mask(x0, y0, x1 - x0, y1 - y0)
    return not bool((mask & ~tissue).any())


def cell_mask(cell: PlantedCell, part: str = "outline") -> np.ndarray:
    """The cell's (or its nucleus') rasterised mask over the cell's box.

    Tiles paste this very mask, so a cell is drawn identically whichever tiles it spans.
    """
    x0, y0, x1, y1 = cell.box
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    _fill(mask, getattr(cell, part), x0, y0, 1)
    return mask.astype(bool)


_BRIGHTFIELD = {
    "background": np.array([243, 242, 240], np.float32),
    "tissue": np.array([232, 195, 214], np.float32),
    "mk_cytoplasm": np.array([190, 120, 190], np.float32),
    "mk_nucleus": np.array([92, 44, 124], np.float32),
    "hspc": np.array([104, 66, 156], np.float32),
}
_FLUORESCENCE = {  # DAPI, CD41
    "background": np.array([100, 100], np.float32),
    "tissue": np.array([900, 260], np.float32),
    "mk_cytoplasm": np.array([1100, 6000], np.float32),
    "mk_nucleus": np.array([4200, 6000], np.float32),
    "hspc": np.array([5200, 320], np.float32),
}


def _brightfield_base(tissue: np.ndarray, shade: np.ndarray) -> np.ndarray:
    """White background and pink tissue whose tone drifts slowly; float32 RGB."""
    image = np.where(tissue[..., None], _BRIGHTFIELD["tissue"], _BRIGHTFIELD["background"])
    image = image.astype(np.float32)
    image -= (np.float32(6) * shade * tissue)[..., None]
    return image


def _fluorescence_base(tissue: np.ndarray, shade: np.ndarray) -> np.ndarray:
    """Dark background and dim tissue autofluorescence; float32 (DAPI, CD41)."""
    image = np.where(tissue[..., None], _FLUORESCENCE["tissue"], _FLUORESCENCE["background"])
    image = image.astype(np.float32)
    image *= (1 + np.float32(0.15) * shade * tissue)[..., None]
    return image


def _draw_cell(image: np.ndarray, cell: PlantedCell, x: int, y: int, modality: str) -> None:
    """Paint one cell into a float32 tile whose pixel (0, 0) is slide (x, y)."""
    colours = _BRIGHTFIELD if modality == "brightfield" else _FLUORESCENCE
    parts = [("outline", "mk_cytoplasm"), ("nucleus", "mk_nucleus")]
    if cell.cell_type == "HSPC":
        parts = [("outline", "hspc")]
    x0, y0, x1, y1 = cell.box
    left, top = max(x0, x), max(y0, y)
    right, bottom = min(x1, x + image.shape[1]), min(y1, y + image.shape[0])
    if right <= left or bottom <= top:
        return
    region = image[top - y : bottom - y, left - x : right - x]
    for part, colour in parts:
        mask = cell_mask(cell, part)[top - y0 : bottom - y0, left - x0 : right - x0]
        region[mask] = colours[colour] * cell.shade


def truth_table(layout: SyntheticLayout, slide_id: str):
    """The planted cells measured on their rasterised masks, as a pyarrow table."""
    columns: dict[str, list] = {
        key: []
        for key in (
            "cell_uid",
            "cell_type",
            "centroid_x_px",
            "centroid_y_px",
            "area_px",
            "area_um2",
            "bbox_x_px",
            "bbox_y_px",
            "bbox_w_px",
            "bbox_h_px",
            "contour_x_px",
            "contour_y_px",
        )
    }
    for cell in layout.cells:
        x0, y0, _, _ = cell.box
        mask = cell_mask(cell)
        rows, cols = np.nonzero(mask)
        cx, cy = float(cols.mean() + x0), float(rows.mean() + y0)
        contours, _ = cv2.findContours(
            mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
        )
        contour = max(contours, key=len)[:, 0, :]
        columns["cell_uid"].append(f"{slide_id}:{cell.cell_type}:{round(cx)}:{round(cy)}")
        columns["cell_type"].append(cell.cell_type)
        columns["centroid_x_px"].append(cx)
        columns["centroid_y_px"].append(cy)
        columns["area_px"].append(float(rows.size))
        columns["area_um2"].append(rows.size * PIXEL_SIZE_UM**2)
        columns["bbox_x_px"].append(int(cols.min() + x0))
        columns["bbox_y_px"].append(int(rows.min() + y0))
        columns["bbox_w_px"].append(int(cols.max() - cols.min() + 1))
        columns["bbox_h_px"].append(int(rows.max() - rows.min() + 1))
        columns["contour_x_px"].append((contour[:, 0] + x0).astype(np.float32))
        columns["contour_y_px"].append((contour[:, 1] + y0).astype(np.float32))
    schema = pa.schema(
        [
            ("cell_uid", pa.string()),
            ("cell_type", pa.string()),
            ("centroid_x_px", pa.float64()),
            ("centroid_y_px", pa.float64()),
            ("area_px", pa.float64()),
            ("area_um2", pa.float64()),
            ("bbox_x_px", pa.int64()),
            ("bbox_y_px", pa.int64()),
            ("bbox_w_px", pa.int64()),
            ("bbox_h_px", pa.int64()),
            ("contour_x_px", pa.list_(pa.float32())),
            ("contour_y_px", pa.list_(pa.float32())),
        ]
    )
    return pa.table(columns, schema=schema)


def truth_labels(layout: SyntheticLayout, rect: Rect, cell_type: str) -> np.ndarray:
    """(h, w) int32 label image of the planted cells of ``cell_type`` in ``rect``, numbered
    1.. in layout order: the very masks the truth table is measured on and the tiles paint."""
    labels = np.zeros((rect.h, rect.w), np.int32)
    cells = [c for c in layout._cells_meeting(rect) if c.cell_type == cell_type]
    for number, cell in enumerate(cells, start=1):
        x0, y0, x1, y1 = cell.box
        left, top = max(x0, rect.x), max(y0, rect.y)
        right, bottom = min(x1, rect.right), min(y1, rect.bottom)
        mask = cell_mask(cell)[top - y0 : bottom - y0, left - x0 : right - x0]
        labels[top - rect.y : bottom - rect.y, left - rect.x : right - rect.x][mask] = number
    return labels
