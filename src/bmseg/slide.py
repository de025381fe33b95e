"""One small interface over whole-slide files: CZI (pylibCZIrw), OME-TIFF and TIFF (tifffile).

Every step reads pixels through :func:`open_slide`, so slide coordinates mean the same thing
everywhere: full-resolution pixels in the file's own frame. For CZI that frame is the one the
scanner wrote, whose origin can be an absolute stage position or negative, with scenes that lie
far apart and nothing acquired between them; :attr:`Slide.bounds` is the box around everything
acquired and :meth:`Slide.read` fills un-acquired area with the background (white for
brightfield RGB, 0 for fluorescence). See docs/tiles.md.

Threads: a :class:`Slide` wraps one libCZI reader, and libCZI readers are not shared across
threads. Open one :class:`Slide` per reader thread (opening is cheap: only the subblock
directory and the metadata are read).
"""

from __future__ import annotations

import logging
import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import numpy as np

from bmseg.errors import BmsegError

if TYPE_CHECKING:
    import zarr
    from tifffile.zarr import ZarrTiffStore

log = logging.getLogger(__name__)

SLIDE_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]+$")
CZI_MAGIC = b"ZISRAWFILE"

# libCZI pixel types: (numpy dtype, samples per pixel). Bgr* types come back as three channels.
_CZI_PIXEL_TYPES = {
    "Gray8": ("uint8", 1),
    "Gray16": ("uint16", 1),
    "Gray32Float": ("float32", 1),
    "Bgr24": ("uint8", 3),
    "Bgr48": ("uint16", 3),
    "Bgr96Float": ("float32", 3),
}


@dataclass(frozen=True)
class Rect:
    """A rectangle in slide pixels: top-left corner and size, half-open."""

    x: int
    y: int
    w: int
    h: int

    @property
    def right(self) -> int:
        """First column past the rectangle."""
        return self.x + self.w

    @property
    def bottom(self) -> int:
        """First row past the rectangle."""
        return self.y + self.h

    def intersection(self, other: Rect) -> Rect:
        """The overlap of two rectangles (zero-sized when they do not meet)."""
        x, y = max(self.x, other.x), max(self.y, other.y)
        right, bottom = min(self.right, other.right), min(self.bottom, other.bottom)
        return Rect(x, y, max(0, right - x), max(0, bottom - y))

    def as_dict(self) -> dict[str, int]:
        """``{x, y, w, h}`` as written to slide.json."""
        return {"x": self.x, "y": self.y, "w": self.w, "h": self.h}


@dataclass(frozen=True)
class Channel:
    """One channel of what :meth:`Slide.read` returns."""

    name: str
    dtype: str


def _white(dtype: str) -> float:
    """Full scale of an RGB channel's dtype: white."""
    return 1.0 if dtype.startswith("float") else float(np.iinfo(dtype).max)


def default_slide_id(path: str | Path) -> str:
    """The file stem (``.ome`` dropped) with characters outside ``[A-Za-z0-9._-]`` replaced."""
    stem = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    else:
        stem = Path(stem).stem
    return re.sub(r"[^A-Za-z0-9._-]", "_", stem) or "slide"


def check_slide_id(slide_id: str) -> str:
    """Return ``slide_id`` if it only uses ``[A-Za-z0-9._-]``, else raise a BmsegError."""
    if not SLIDE_ID_PATTERN.match(slide_id):
        raise BmsegError(
            f"--slide-id {slide_id!r}: use only letters, digits, '.', '_' and '-' "
            "(slide ids name files and table rows)"
        )
    return slide_id


class Slide:
    """An open whole-slide image; use as a context manager or call :meth:`close`.

    Attributes: ``slide_id``, ``path``, ``pixel_size_um`` (µm per full-resolution pixel),
    ``channels`` (what :meth:`read` returns, in order), ``bounds`` (box around all acquired
    pixels, slide coordinates) and ``modality`` (``"brightfield"`` for RGB, else
    ``"fluorescence"``).
    """

    slide_id: str
    path: Path
    pixel_size_um: float
    channels: list[Channel]
    bounds: Rect
    modality: str

    def __enter__(self) -> Slide:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Slide({self.slide_id!r}, {self.modality}, {len(self.channels)} channels, "
            f"{self.pixel_size_um:g} µm/px, bounds={self.bounds})"
        )

    @property
    def background(self) -> np.ndarray:
        """Per-channel value of un-acquired area: white for RGB channels, 0 otherwise."""
        return self._background

    def read(self, x: int, y: int, w: int, h: int, zoom: float = 1.0) -> np.ndarray:
        """Pixels of the rectangle ``(x, y, w, h)`` in slide coordinates, scaled by ``zoom``.

        Returns an array of shape ``(round(h * zoom), round(w * zoom), len(channels))``; output
        pixel ``(i, j)`` shows slide pixel ``(x + j / zoom, y + i / zoom)``. Area outside what
        was acquired holds the background value.
        """
        if w <= 0 or h <= 0:
            raise ValueError(f"read of an empty rectangle {w}x{h}")
        if not 0 < zoom <= 1:
            raise ValueError(f"zoom must lie in (0, 1], got {zoom}")
        out_h, out_w = max(1, round(h * zoom)), max(1, round(w * zoom))
        image = self._read(int(x), int(y), int(w), int(h), float(zoom))
        return _fit_shape(image, out_h, out_w)

    def thumbnail(self, max_side: int) -> tuple[np.ndarray, float]:
        """The whole slide with its longer side at most ``max_side`` px, and the zoom used.

        Uses the file's pyramid where it has one, so this stays cheap on large scans.
        """
        bounds = self.bounds
        zoom = min(1.0, max_side / max(bounds.w, bounds.h))
        return self.read(bounds.x, bounds.y, bounds.w, bounds.h, zoom), zoom

    def close(self) -> None:
        """Release the file."""

    def _read(self, x: int, y: int, w: int, h: int, zoom: float) -> np.ndarray:
        raise NotImplementedError


def _fit_shape(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Crop or edge-pad ``image`` to exactly ``(out_h, out_w)``.

    Readers floor the scaled size where :meth:`Slide.read` promises ``round``; the difference is
    at most one pixel, and padding keeps the pixel-to-slide mapping intact.
    """
    image = image[:out_h, :out_w]
    pad_h, pad_w = out_h - image.shape[0], out_w - image.shape[1]
    if pad_h or pad_w:
        image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return np.ascontiguousarray(image)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


class _CziSlide(Slide):
    """A CZI file read through one libCZI reader (not to be shared across threads)."""

    def __init__(self, path: Path) -> None:
        from pylibCZIrw import czi

        self.path = path
        try:
            self._reader = czi.CziReader(str(path))
            bounds = self._reader.total_bounding_rectangle
            pixel_types = self._reader.pixel_types
            metadata = self._reader.metadata
        except Exception as error:
            raise BmsegError(
                f"{path}: cannot read this CZI file (truncated or damaged? {_one_line(error)}); "
                "copy the complete file again"
            ) from error
        self.bounds = Rect(int(bounds.x), int(bounds.y), int(bounds.w), int(bounds.h))
        if self.bounds.w <= 0 or self.bounds.h <= 0:
            raise BmsegError(f"{path}: the CZI file holds no image data; check the export")
        unknown = {t for t in pixel_types.values() if t not in _CZI_PIXEL_TYPES}
        if unknown:
            raise BmsegError(
                f"{path}: unsupported CZI pixel type {sorted(unknown)}; export as Gray8/16 or Bgr24"
            )
        self._pixel_types = [pixel_types[c] for c in sorted(pixel_types)]
        names = _czi_channel_names(metadata, len(self._pixel_types))
        rgb_count = sum(_CZI_PIXEL_TYPES[t][1] == 3 for t in self._pixel_types)
        self.modality = "brightfield" if rgb_count else "fluorescence"
        self.channels = []
        background = []
        for name, pixel_type in zip(names, self._pixel_types, strict=True):
            dtype, samples = _CZI_PIXEL_TYPES[pixel_type]
            if samples == 3:
                prefix = "" if len(self._pixel_types) == 1 else f"{name}_"
                self.channels += [Channel(f"{prefix}{c}", dtype) for c in "RGB"]
                background += [_white(dtype)] * 3
            else:
                self.channels.append(Channel(name, dtype))
                background.append(0)
        self._background = np.array(background)
        self.native_pixel_size_um = _czi_pixel_size_um(metadata)

    def _read(self, x: int, y: int, w: int, h: int, zoom: float) -> np.ndarray:
        planes = []
        try:
            for index, pixel_type in enumerate(self._pixel_types):
                rgb = _CZI_PIXEL_TYPES[pixel_type][1] == 3
                background = (1.0, 1.0, 1.0) if rgb else (0.0, 0.0, 0.0)
                plane = self._reader.read(
                    roi=(x, y, w, h),
                    plane={"C": index},
                    zoom=zoom,
                    background_pixel=background,
                )
                planes.append(plane[:, :, ::-1] if rgb else plane)
        except Exception as error:
            raise BmsegError(
                f"{self.path}: cannot read pixels at ({x}, {y}, {w}, {h}) "
                f"(truncated or damaged file? {_one_line(error)}); copy the complete file again"
            ) from error
        return planes[0] if len(planes) == 1 else np.concatenate(planes, axis=2)

    def close(self) -> None:
        reader, self._reader = getattr(self, "_reader", None), None
        if reader is not None:
            reader.close()


def _czi_channel_names(metadata: dict, count: int) -> list[str]:
    """Channel names from the CZI metadata, ``C{i}`` where a name is missing."""
    try:
        channels = metadata["ImageDocument"]["Metadata"]["Information"]["Image"]["Dimensions"][
            "Channels"
        ]["Channel"]
    except (KeyError, TypeError):
        channels = []
    if isinstance(channels, dict):
        channels = [channels]
    names = [str(c.get("@Name") or "") if isinstance(c, dict) else "" for c in channels]
    names += [""] * (count - len(names))
    return [name or f"C{index}" for index, name in enumerate(names[:count])]


def _czi_pixel_size_um(metadata: dict) -> float | None:
    """The X pixel size in µm from ``Metadata/Scaling`` (stored in metres), or None."""
    try:
        items = metadata["ImageDocument"]["Metadata"]["Scaling"]["Items"]["Distance"]
    except (KeyError, TypeError):
        return None
    if isinstance(items, dict):
        items = [items]
    for item in items:
        if isinstance(item, dict) and item.get("@Id") == "X":
            try:
                value = float(item.get("Value"))
            except (TypeError, ValueError):
                return None
            return value * 1e6 if value > 0 else None
    return None


class _TiffSlide(Slide):
    """An OME-TIFF or plain TIFF; its first series, with the series' pyramid levels if any.

    Levels are opened as zarr arrays over tifffile's store (``aszarr``), so a read decodes only
    the tiles (or strips) that meet its window: a 20 GB slide is never loaded whole. A file
    stored as one uncompressed strip is one chunk and is read whole; write large slides tiled.
    """

    def __init__(self, path: Path) -> None:
        import tifffile

        self.path = path
        try:
            self._tiff = tifffile.TiffFile(path)
            series = self._tiff.series[0]
            self._levels = list(series.levels)
            axes = series.axes
            shape = series.shape
        except Exception as error:
            raise BmsegError(
                f"{path}: cannot read this TIFF file ({_one_line(error)}); "
                "check that it is a complete TIFF or OME-TIFF"
            ) from error
        self._axes = axes
        height, width = shape[axes.index("Y")], shape[axes.index("X")]
        self.bounds = Rect(0, 0, int(width), int(height))
        dtype = np.dtype(series.dtype).name
        samples = shape[axes.index("S")] if "S" in axes else 1
        channel_count = shape[axes.index("C")] if "C" in axes else 1
        names = _ome_channel_names(self._tiff.ome_metadata, channel_count)
        if samples == 3 and channel_count == 1:
            self.modality = "brightfield"
            self.channels = [Channel(c, dtype) for c in "RGB"]
            self._background = np.full(3, _white(dtype))
        else:
            self.modality = "fluorescence"
            self.channels = [
                Channel(f"{name}_{s}" if samples > 1 else name, dtype)
                for name in names
                for s in range(samples)
            ]
            self._background = np.zeros(len(self.channels))
        self.native_pixel_size_um = _tiff_pixel_size_um(self._tiff)
        self._stores: dict[int, tuple[ZarrTiffStore, zarr.Array]] = {}

    def _level_array(self, index: int) -> zarr.Array:
        """Level ``index`` as a lazily read zarr array in the level's own axes, opened once."""
        import zarr

        if index not in self._stores:
            store = self._tiff.series[0].aszarr(level=index)
            self._stores[index] = (store, zarr.open(store, mode="r"))
        return self._stores[index][1]

    def _level_window(self, index: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Rows ``y0:y1``, columns ``x0:x1`` of level ``index`` as (Y, X, C); only their tiles."""
        level = self._levels[index]
        try:
            return _yxc_window(self._level_array(index), level.axes, y0, y1, x0, x1)
        except Exception as error:
            raise BmsegError(
                f"{self.path}: cannot read pixels ({_one_line(error)}); "
                "copy the complete file again"
            ) from error

    def _read(self, x: int, y: int, w: int, h: int, zoom: float) -> np.ndarray:
        import cv2

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
    array: zarr.Array | np.ndarray, axes: str, y0: int, y1: int, x0: int, x1: int
) -> np.ndarray:
    """Rows ``y0:y1``, columns ``x0:x1`` of an array in tifffile ``axes`` as (Y, X, C).

    Index 0 of any axis other than Y, X, C and S; one slicing call, so a lazily read array
    (zarr) reads only the chunks the window meets.
    """
    spans = {"Y": slice(y0, y1), "X": slice(x0, x1), "C": slice(None), "S": slice(None)}
    data = np.asarray(array[tuple(spans.get(axis, 0) for axis in axes)])
    keep = [a for a in axes if a in spans]
    order = [keep.index("Y"), keep.index("X")] + [keep.index(a) for a in "CS" if a in keep]
    data = np.transpose(data, order)
    return data.reshape(data.shape[0], data.shape[1], -1)


def _ome_channel_names(ome_xml: str | None, count: int) -> list[str]:
    """Channel names from OME-XML, ``C{i}`` where missing."""
    names: list[str] = []
    if ome_xml:
        try:
            root = ET.fromstring(ome_xml)
            names = [
                element.get("Name") or ""
                for element in root.iter()
                if element.tag.endswith("}Channel") or element.tag == "Channel"
            ]
        except ET.ParseError:
            names = []
    names += [""] * (count - len(names))
    return [name or f"C{index}" for index, name in enumerate(names[:count])]


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
                return float(element.get("PhysicalSizeX")) * _UNIT_TO_UM.get(unit, 1.0)
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


_OVERRIDES_LOGGED: set[tuple[str, float, float]] = set()


def _log_override(path: str, pixel_size_um: float, native: float) -> None:
    """Say once per process and slide that a given pixel size replaces a different metadata one.

    SEGMENT opens a slide per reader thread and batch: a line per open would flood the log and
    break the progress bar, and an override equal to the metadata changes nothing.
    """
    key = (path, pixel_size_um, native)
    if math.isclose(pixel_size_um, native, rel_tol=1e-9) or key in _OVERRIDES_LOGGED:
        return
    _OVERRIDES_LOGGED.add(key)
    log.info("%s: pixel size %g µm overrides the metadata's %g µm", path, pixel_size_um, native)


def open_slide(
    path: str | Path, *, pixel_size_um: float | None = None, slide_id: str | None = None
) -> Slide:
    """Open a CZI, OME-TIFF or TIFF slide; errors are one-line :class:`BmsegError` naming the file.

    ``pixel_size_um`` overrides the metadata (and is required when the file has none);
    ``slide_id`` defaults to the file stem with characters outside ``[A-Za-z0-9._-]`` replaced.
    """
    path = Path(path)
    if slide_id is not None:
        check_slide_id(slide_id)
    if pixel_size_um is not None and not pixel_size_um > 0:
        raise BmsegError(f"--pixel-size-um {pixel_size_um}: must be a positive number of µm")
    if not path.is_file():
        raise BmsegError(f"{path}: no such slide file; check the path")
    with path.open("rb") as handle:
        head = handle.read(16)
    name = path.name.lower()
    if head.startswith(CZI_MAGIC):
        slide: Slide = _CziSlide(path)
    elif name.endswith(".czi"):
        raise BmsegError(
            f"{path}: not a CZI file (no ZISRAWFILE header); pass the original Zeiss .czi file"
        )
    elif head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        slide = _TiffSlide(path)
    else:
        raise BmsegError(f"{path}: not a CZI or TIFF file; pass a .czi, .ome.tiff or .tiff slide")
    try:
        native = slide.native_pixel_size_um
        if pixel_size_um is None and native is None:
            raise BmsegError(
                f"{path}: no pixel size in the metadata; pass --pixel-size-um (µm per pixel)"
            )
        if pixel_size_um is not None and native is not None:
            _log_override(str(path), float(pixel_size_um), float(native))
        slide.pixel_size_um = float(pixel_size_um if pixel_size_um is not None else native)
        slide.slide_id = slide_id if slide_id is not None else default_slide_id(path)
    except BaseException:
        slide.close()
        raise
    log.debug("opened %r", slide)
    return slide
