"""The tissue picture PLAN writes (``{slide}.tissue.png``): one panel per scene, the tissue
outlined, the kept tile cores washed and framed, a caption and a legend.

A module of its own because two steps use it: PLAN draws the picture and REPORT names its
colours (:data:`PICTURE_COLOURS`) beside it.
"""

from __future__ import annotations

import io
import math

import cv2
import numpy as np
from PIL import Image

from bmseg.slide import Rect
from bmseg.tissue import acquired_pixels

PICTURE_SIDE = 1400  # px, longer side of tissue.png (small slides are enlarged to it)
PICTURE_MIN_WIDTH = 640  # px, so that the caption fits
PANEL_LABEL_H = 22  # px, the strip above each scene's panel naming it
PANEL_GAP = 8  # px between scene panels
# Opacity of the colour laid over kept cores: light on white glass, where the stain must stay
# readable; stronger on black, where a light wash would vanish.
KEPT_WASH = {"brightfield": 0.18, "fluorescence": 0.35}
# Picture colours per modality: (tissue outline, kept cores, dropped cores), and their names.
# The kept cores' wash is a saturated colour that stands out from the background of its
# modality (blue on white glass; magenta on black, apart from the stains' blue and green),
# the dropped cores a faint grey frame.
PICTURE_COLOURS = {
    "brightfield": ((0, 170, 60), (40, 90, 230), (175, 175, 175), "green", "blue"),
    "fluorescence": ((255, 215, 0), (255, 60, 220), (110, 110, 110), "yellow", "magenta"),
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


def area_text(mm2: float) -> str:
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
    buffer = io.BytesIO()
    palette = Image.fromarray(rgb).quantize(colors=256, method=Image.Quantize.FASTOCTREE)
    palette.save(buffer, format="PNG")
    return buffer.getvalue()
