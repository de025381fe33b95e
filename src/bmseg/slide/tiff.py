"""OME-TIFF and plain TIFF files read through tifffile, lazily through zarr."""

from __future__ import annotations

import logging
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import tifffile
import zarr
from tifffile.zarr import ZarrTiffStore

from bmseg.errors import BmsegError
from bmseg.slide.base import PROJECTIONS, Channel, Slide, one_line
from bmseg.slide.geometry import Rect
from bmseg.slide.modality import modality_from_channel_metadata

log = logging.getLogger(__name__)


class TiffSlide(Slide):
    """An OME-TIFF or plain TIFF; its first series, with the series' pyramid levels if any.

    Levels are opened as zarr arrays over tifffile's store (``aszarr``), so a read decodes only
    the tiles (or strips) that meet its window: a 20 GB slide is never loaded whole. A file
    stored as one uncompressed strip is one chunk and is read whole; write large slides tiled.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._tiff = tifffile.TiffFile(path)
            series = self._tiff.series[0]
            self._levels = list(series.levels)
            axes = series.axes
            shape = series.shape
        except Exception as error:
            raise BmsegError(
                f"{path}: cannot read this TIFF file ({one_line(error)}); "
                "check that it is a complete TIFF or OME-TIFF"
            ) from error
        self._axes = axes
        height, width = shape[axes.index("Y")], shape[axes.index("X")]
        self.bounds = Rect(0, 0, int(width), int(height))
        dtype = np.dtype(series.dtype).name
        samples = shape[axes.index("S")] if "S" in axes else 1
        channel_count = shape[axes.index("C")] if "C" in axes else 1
        channel_metadata = _ome_channel_metadata(self._tiff.ome_metadata, channel_count)
        names = [channel["name"] for channel in channel_metadata]
        self._rgb = samples == 3 and channel_count == 1
        decided = modality_from_channel_metadata(channel_metadata)
        if decided is not None:
            self.set_modality(decided[0], "metadata")
            log.debug("%s: modality %s from the metadata (%s)", path, *decided)
        if self._rgb:
            self.channels = [Channel(c, dtype) for c in "RGB"]
        else:
            self.channels = [
                Channel(f"{name}_{s}" if samples > 1 else name, dtype)
                for name in names
                for s in range(samples)
            ]
        self.scenes = [self.bounds]
        self._dimensions = {
            axis: (0, int(size))
            for axis, size in zip(axes, shape, strict=True)
            if axis not in "YXCS"
        }
        self.plane = dict.fromkeys(self._dimensions, 0)
        self.native_pixel_size_um = _tiff_pixel_size_um(self._tiff)
        self._stores: dict[int, tuple[ZarrTiffStore, zarr.Array]] = {}

    def _level_array(self, index: int) -> zarr.Array:
        """Level ``index`` as a lazily read zarr array in the level's own axes, opened once."""
        if index not in self._stores:
            store = self._tiff.series[0].aszarr(level=index)
            self._stores[index] = (store, zarr.open(store, mode="r"))
        return self._stores[index][1]

    def _level_window(self, index: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Rows ``y0:y1``, columns ``x0:x1`` of level ``index`` as (Y, X, C); only their tiles."""
        level = self._levels[index]
        try:
            return _yxc_window(self._level_array(index), level.axes, y0, y1, x0, x1, self.plane)
        except Exception as error:
            raise BmsegError(
                f"{self.path}: cannot read pixels ({one_line(error)}); copy the complete file again"
            ) from error

    def _read(self, x: int, y: int, w: int, h: int, zoom: float) -> np.ndarray:
        full_w = self.bounds.w
        # The coarsest level that still has at least the requested resolution.
        index = 0
        for candidate, level in enumerate(self._levels):
            level_w = level.shape[level.axes.index("X")]
            if level_w / full_w >= zoom * 0.999:
                index = candidate
        level = self._levels[index]
        level_h, level_w = level.shape[level.axes.index("Y")], level.shape[level.axes.index("X")]
        scale = level_w / full_w
        x0, y0 = int(np.floor(x * scale)), int(np.floor(y * scale))
        x1, y1 = int(np.ceil((x + w) * scale)), int(np.ceil((y + h) * scale))
        dtype = np.dtype(level.dtype)
        region = np.empty((y1 - y0, x1 - x0, len(self.channels)), dtype=dtype)
        region[...] = self.background.astype(dtype)
        sx0, sy0 = max(x0, 0), max(y0, 0)
        sx1, sy1 = min(x1, level_w), min(y1, level_h)
        if sx1 > sx0 and sy1 > sy0:
            window = self._level_window(index, sy0, sy1, sx0, sx1)
            region[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = window
        out_h, out_w = max(1, round(h * zoom)), max(1, round(w * zoom))
        if region.shape[:2] == (out_h, out_w):
            return region
        channels = [
            cv2.resize(region[:, :, c], (out_w, out_h), interpolation=cv2.INTER_AREA)
            for c in range(region.shape[2])
        ]
        return np.stack(channels, axis=2)

    def close(self) -> None:
        stores, self._stores = getattr(self, "_stores", {}), {}
        for store, _ in stores.values():
            store.close()
        tiff, self._tiff = getattr(self, "_tiff", None), None
        if tiff is not None:
            tiff.close()


def _yxc_window(
    array: zarr.Array | np.ndarray,
    axes: str,
    y0: int,
    y1: int,
    x0: int,
    x1: int,
    plane: dict[str, int | str] | None = None,
) -> np.ndarray:
    """Rows ``y0:y1``, columns ``x0:x1`` of an array in tifffile ``axes`` as (Y, X, C).

    Every axis other than Y, X, C and S at its ``plane`` index (0 if not named), or its maximum
    (minimum) over all indices where ``plane`` says ``"max"`` (``"min"``); one slicing call,
    so a lazily read array (zarr) reads only the chunks the window meets.
    """
    plane = plane or {}
    spans = {"Y": slice(y0, y1), "X": slice(x0, x1), "C": slice(None), "S": slice(None)}
    projected = [a for a in axes if a not in spans and plane.get(a) in PROJECTIONS]
    index = tuple(
        spans.get(axis, slice(None) if axis in projected else int(plane.get(axis, 0)))
        for axis in axes
    )
    data = np.asarray(array[index])
    kept = [a for a in axes if a in spans or a in projected]
    for axis in projected:
        data = PROJECTIONS[str(plane[axis])].reduce(data, axis=kept.index(axis))
        kept.remove(axis)
    order = [kept.index("Y"), kept.index("X")] + [kept.index(a) for a in "CS" if a in kept]
    data = np.transpose(data, order)
    return data.reshape(data.shape[0], data.shape[1], -1)


def _ome_channel_metadata(ome_xml: str | None, count: int) -> list[dict[str, str]]:
    """Per OME ``Channel``: ``name`` (``C{i}`` where missing) and its ``ContrastMethod``,
    ``IlluminationType`` and ``AcquisitionMode`` attributes."""
    elements: list[ET.Element] = []
    if ome_xml:
        try:
            root = ET.fromstring(ome_xml)
            elements = [e for e in root.iter() if e.tag.endswith("}Channel") or e.tag == "Channel"]
        except ET.ParseError:
            elements = []
    result = []
    for index in range(count):
        element = elements[index] if index < len(elements) else ET.Element("Channel")
        entry = {"name": element.get("Name") or f"C{index}"}
        for key in ("ContrastMethod", "IlluminationType", "AcquisitionMode"):
            entry[key] = element.get(key) or ""
        result.append(entry)
    return result


_UNIT_TO_UM = {"nm": 1e-3, "µm": 1.0, "um": 1.0, "micron": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6}


def _tiff_pixel_size_um(tiff) -> float | None:
    """Pixel size from OME ``PhysicalSizeX``, ImageJ's unit, or the TIFF resolution tags."""
    if tiff.ome_metadata:
        try:
            root = ET.fromstring(tiff.ome_metadata)
        except ET.ParseError:
            root = None
        for element in root.iter() if root is not None else ():
            if element.tag.endswith("}Pixels") and element.get("PhysicalSizeX"):
                unit = element.get("PhysicalSizeXUnit", "µm")
                try:
                    size = float(element.get("PhysicalSizeX"))
                except ValueError:  # "abc": refused with the file named by open_slide
                    return math.nan
                return size * _UNIT_TO_UM.get(unit, 1.0)
    page = tiff.pages.first
    tag = page.tags.get("XResolution")
    if tag is None:
        return None
    numerator, denominator = tag.value
    if not numerator or not denominator:
        return None
    per_unit = denominator / numerator
    unit = int(page.tags["ResolutionUnit"].value) if "ResolutionUnit" in page.tags else 2
    imagej_unit = (tiff.imagej_metadata or {}).get("unit")
    if unit == 1 and imagej_unit in _UNIT_TO_UM:
        return per_unit * _UNIT_TO_UM[imagej_unit]
    return {2: per_unit * 25400.0, 3: per_unit * 1e4}.get(unit)
