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

Modality (brightfield or fluorescence) comes from, in order: the caller (``--modality``), the
channels' contrast method / illumination / acquisition mode in the metadata, the image itself
(bright or dark background), the pixel type. Scenes (one per tissue section on slide
scanners) are listed in :attr:`Slide.scenes`; the plane read (Z, T, Airyscan phase H, ...) in
:attr:`Slide.plane`.
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

from bmseg.contract import MODALITIES, check_id
from bmseg.errors import BmsegError

if TYPE_CHECKING:
    import zarr
    from tifffile.zarr import ZarrTiffStore

log = logging.getLogger(__name__)

SLIDE_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]+$")
# --plane Z=max / Z=min: the brightest (fluorescence) or darkest (brightfield stain) value over
# that dimension's planes
PROJECTIONS = {"max": np.maximum, "min": np.minimum}
MODALITY_PROBE_SIDE = 256  # px, longer side of the read that decides modality from the image
IMAGE_TAIL_SHARE = 0.15  # a tissue tail spans at least 15 % of the background's brightness
_WARNED: set[tuple[Path, str]] = set()  # (file, dimension) already warned about, once a process
# Modality decided from the image, by (file, size, mtime, plane): decided once a process.
_IMAGE_MODALITY: dict[tuple[Path, int, int, str], tuple[str, str]] = {}
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


INTENSITY_PERCENTILES = (1.0, 99.5)
"""Intensity range (per channel) fluorescence is stretched from to the models' 0..255."""


def intensity_ranges(pixels: np.ndarray, where: np.ndarray | None = None) -> dict[str, list]:
    """Per channel, the :data:`INTENSITY_PERCENTILES` of ``pixels`` (H, W, C) where ``where``.

    PLAN computes it once per slide from its low-resolution read (slide.json ``intensity``),
    so every tile of a slide is shown to the models on one scale.
    """
    values = pixels.reshape(-1, pixels.shape[-1]).astype(np.float64)
    if where is not None and where.any():
        values = values[where.reshape(-1)]
    low, high = np.percentile(values, INTENSITY_PERCENTILES, axis=0)
    return {"low": [float(v) for v in low], "high": [float(v) for v in high]}


def default_slide_id(path: str | Path) -> str:
    """The file stem (``.ome`` dropped), characters outside ``[A-Za-z0-9._-]`` and a leading
    ``.`` or ``-`` replaced by ``_`` (no hidden files, no flag-like ids)."""
    stem = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    else:
        stem = Path(stem).stem
    return re.sub(r"^[.-]", "_", re.sub(r"[^A-Za-z0-9._-]", "_", stem)) or "slide"


MIN_PIXEL_SIZE_UM = 0.01
MAX_PIXEL_SIZE_UM = 100.0
"""Pixel sizes outside these bounds (µm per full-resolution pixel) are not a microscope's: a
damaged or unit-confused value, refused before it becomes tile sizes, margins or areas."""


def check_pixel_size(value: float, where: str) -> float:
    """``value`` if it is a finite pixel size within the bounds above, else a BmsegError that
    blames ``where`` (the flag or the file's metadata)."""
    if not (math.isfinite(value) and MIN_PIXEL_SIZE_UM <= value <= MAX_PIXEL_SIZE_UM):
        raise BmsegError(
            f"{where} {value:g} µm per pixel is not a usable pixel size (expected "
            f"{MIN_PIXEL_SIZE_UM:g} to {MAX_PIXEL_SIZE_UM:g}); pass --pixel-size-um with the "
            "scanner's µm per pixel"
        )
    return value


def check_slide_id(slide_id: str, where: str = "--slide-id") -> str:
    """``slide_id`` if it is a valid id (:func:`bmseg.contract.check_id`), else BmsegError."""
    return check_id(slide_id, where)


class Slide:
    """An open whole-slide image; use as a context manager or call :meth:`close`.

    Attributes: ``slide_id``, ``path``, ``pixel_size_um`` (µm per full-resolution pixel),
    ``channels`` (what :meth:`read` returns, in order), ``bounds`` (box around all acquired
    pixels, slide coordinates), ``scenes`` (the acquired regions, one per scene, each inside
    ``bounds``), ``plane`` (index read along every other dimension, e.g. ``{"Z": 0, "T": 0}``,
    or ``"max"`` / ``"min"`` for a projection), ``modality`` (``"brightfield"`` or
    ``"fluorescence"``) and ``modality_source`` (what decided it).
    """

    slide_id: str
    path: Path
    pixel_size_um: float
    channels: list[Channel]
    bounds: Rect
    scenes: list[Rect]
    plane: dict[str, int | str]
    bit_depth: int | None = None
    """Significant bits per sample the scanner wrote (12, 14 in a uint16), when the file says."""
    _modality: str | None = None  # None until the image decides (see :attr:`modality`)
    _modality_source: str = ""
    _rgb: bool = False  # whether the file stores RGB pixels (the last-resort modality)
    _dimensions: dict[str, tuple[int, int]]  # index range of each dimension besides Y, X, C
    _fill_marks_gaps: bool = False  # whether reads can reach un-acquired area (CZI mosaics)

    @property
    def modality(self) -> str:
        """``"brightfield"`` or ``"fluorescence"``; decided from the image on first use when
        neither the caller nor the metadata said (one small low-resolution read)."""
        if self._modality is None:
            stat = self.path.stat()
            key = (self.path.resolve(), stat.st_size, stat.st_mtime_ns, str(self.plane))
            if key not in _IMAGE_MODALITY:  # once per file and process, not per reader thread
                _IMAGE_MODALITY[key] = _modality_from_image(self)
                log.info("%s: modality %s (from the %s)", self.path, *_IMAGE_MODALITY[key])
            self._modality, self._modality_source = _IMAGE_MODALITY[key]
        return self._modality

    @property
    def modality_source(self) -> str:
        """What decided :attr:`modality`: ``"override"``, ``"metadata"``, ``"image"`` or
        ``"pixel type"``."""
        _ = self.modality  # decided first where still open
        return self._modality_source

    def set_modality(self, modality: str | None, source: str) -> None:
        """Fix the modality (``None`` leaves it to the image), recording what decided it."""
        if modality is not None and modality not in MODALITIES:
            raise BmsegError(f"--modality {modality!r}: use brightfield or fluorescence")
        self._modality, self._modality_source = modality, source

    def select_plane(self, requested: dict[str, int | str]) -> None:
        """Read ``requested`` indices (or ``"max"`` projections) instead of each dimension's
        first; warn once for every other dimension that holds more than one plane."""
        plane = dict(self.plane)
        for dim, index in requested.items():
            if dim not in self._dimensions:
                have = ", ".join(self._dimensions) or "none"
                raise BmsegError(
                    f"--plane {dim}={index}: {self.path.name} has no {dim} dimension "
                    f"(its dimensions: {have})"
                )
            start, end = self._dimensions[dim]
            if index not in PROJECTIONS and not start <= int(index) < end:
                raise BmsegError(
                    f"--plane {dim}={index}: {self.path.name} has {dim} {start} to {end - 1}; "
                    f"pick one of those, {dim}=max or {dim}=min"
                )
            plane[dim] = index if index in PROJECTIONS else int(index)
        for dim, (start, end) in self._dimensions.items():
            if end - start > 1 and dim not in requested and (self.path, dim) not in _WARNED:
                _WARNED.add((self.path, dim))
                log.warning(
                    "%s: %s has %d planes; reading %s=%d (pass --plane %s=N, %s=max or %s=min)",
                    self.path,
                    dim,
                    end - start,
                    dim,
                    start,
                    dim,
                    dim,
                    dim,
                )
        self.plane = plane

    def _fill_is_white(self) -> bool:
        """Whether un-acquired area reads white: brightfield (or, while the modality is still
        undecided, RGB pixels)."""
        modality = self._modality or ("brightfield" if self._rgb else "fluorescence")
        return modality == "brightfield"

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
        """Per-channel value of un-acquired area: full scale (white) for brightfield, else 0."""
        if not self._fill_is_white():
            return np.zeros(len(self.channels))
        return np.array([_white(channel.dtype) for channel in self.channels])

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
        if image.shape[0] == 0 or image.shape[1] == 0:  # libCZI floors a sliver to nothing
            image = np.full((1, 1, len(self.channels)), self.background, image.dtype)
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
            raw_xml = self._reader.raw_metadata
            dimensions = self._reader.total_bounding_box
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
        channel_metadata = _czi_channel_metadata(raw_xml, len(self._pixel_types))
        names = [channel["name"] for channel in channel_metadata]
        self._rgb = any(_CZI_PIXEL_TYPES[t][1] == 3 for t in self._pixel_types)
        self._fill_marks_gaps = True
        decided = modality_from_channel_metadata(channel_metadata)
        if decided is not None:
            self.set_modality(decided[0], "metadata")
            log.debug("%s: modality %s from the metadata (%s)", path, *decided)
        self.channels = []
        for name, pixel_type in zip(names, self._pixel_types, strict=True):
            dtype, samples = _CZI_PIXEL_TYPES[pixel_type]
            if samples == 3:
                prefix = "" if len(self._pixel_types) == 1 else f"{name}_"
                self.channels += [Channel(f"{prefix}{c}", dtype) for c in "RGB"]
            else:
                self.channels.append(Channel(name, dtype))
        self.native_pixel_size_um = _czi_pixel_size_um(metadata)
        self.scenes = _czi_scenes(self._reader, self.bounds, path)
        self._dimensions = {
            dim: (int(start), int(end))
            for dim, (start, end) in dimensions.items()
            if dim not in ("X", "Y", "C")
        }
        self.plane = {dim: start for dim, (start, _) in self._dimensions.items()}
        self.bit_depth = _czi_bit_depth(metadata)

    def _read(self, x: int, y: int, w: int, h: int, zoom: float) -> np.ndarray:
        planes = []
        fill = (1.0, 1.0, 1.0) if self._fill_is_white() else (0.0, 0.0, 0.0)
        try:
            for index, pixel_type in enumerate(self._pixel_types):
                rgb = _CZI_PIXEL_TYPES[pixel_type][1] == 3
                plane = None
                for coordinates, combine in self._plane_coordinates():
                    image = self._reader.read(
                        roi=(x, y, w, h),
                        plane={**coordinates, "C": index},
                        zoom=zoom,
                        background_pixel=fill,
                    )
                    plane = image if plane is None else combine(plane, image)
                planes.append(plane[:, :, ::-1] if rgb else plane)
        except Exception as error:
            raise BmsegError(
                f"{self.path}: cannot read pixels at ({x}, {y}, {w}, {h}) "
                f"(truncated or damaged file? {_one_line(error)}); copy the complete file again"
            ) from error
        return planes[0] if len(planes) == 1 else np.concatenate(planes, axis=2)

    def _plane_coordinates(self) -> list[tuple[dict[str, int], np.ufunc]]:
        """The planes one read combines, each with how it joins the others: one plane, or
        every index of the projected dimension (one projection per read)."""
        projected = [(d, i) for d, i in self.plane.items() if i in PROJECTIONS]
        if len(projected) > 1:
            raise BmsegError(
                f"--plane: {self.path.name}: project one dimension at a time, not "
                + " and ".join(d for d, _ in projected)
            )
        fixed = {d: int(i) for d, i in self.plane.items() if i not in PROJECTIONS}
        if not projected:
            return [(fixed, np.maximum)]
        dim, kind = projected[0]
        return [({**fixed, dim: i}, PROJECTIONS[kind]) for i in range(*self._dimensions[dim])]

    def close(self) -> None:
        reader, self._reader = getattr(self, "_reader", None), None
        if reader is not None:
            reader.close()


def _czi_channel_metadata(raw_xml: str, count: int) -> list[dict[str, str]]:
    """Per channel: ``name`` and the ``ContrastMethod``, ``IlluminationType`` and
    ``AcquisitionMode`` texts of ``Information/Image/Dimensions/Channels/Channel``.

    The name falls back the way ZEN shows one: the channel's ``Name``, then its display
    setting's (matched by ``Id``, else by position) ``Name``, ``ShortName`` and ``DyeName``, then
    the channel's ``Fluor``, then ``C{i}``.
    """
    try:
        root = ET.fromstring(raw_xml)
    except ET.ParseError:
        root = ET.Element("ImageDocument")
    channels = root.findall("Metadata/Information/Image/Dimensions/Channels/Channel")
    displays = root.findall("Metadata/DisplaySetting/Channels/Channel")
    displays_by_id = {d.get("Id"): d for d in displays if d.get("Id")}
    result = []
    for index in range(count):
        channel = channels[index] if index < len(channels) else ET.Element("Channel")
        display = displays_by_id.get(channel.get("Id")) if channel.get("Id") else None
        if display is None:
            display = displays[index] if index < len(displays) else ET.Element("Channel")
        candidates = [
            channel.get("Name"),
            display.get("Name"),
            display.findtext("ShortName"),
            display.findtext("DyeName"),
            channel.findtext("Fluor"),
        ]
        name = next((c.strip() for c in candidates if c and c.strip()), f"C{index}")
        entry = {"name": name}
        for tag in ("ContrastMethod", "IlluminationType", "AcquisitionMode"):
            entry[tag] = (channel.findtext(tag) or "").strip()
        result.append(entry)
    return result


# ZEN / OME contrast methods, illumination types and acquisition modes, lower-cased, by the
# background they image on: bright (brightfield) or dark (fluorescence).
_BRIGHT_CONTRAST = {
    "brightfield",
    "phase",
    "dic",
    "polarizedlight",
    "hoffmanmodulation",
    "obliqueillumination",
}
_DARK_CONTRAST = {"fluorescence", "darkfield"}
_DARK_ILLUMINATION = {"epifluorescence", "fluorescence", "nonlinear"}
_DARK_ACQUISITION = {
    "laserscanningconfocalmicroscopy",
    "spinningdiskconfocal",
    "slitscanconfocal",
    "multiphotonmicroscopy",
    "totalinternalreflection",
    "tirf",
    "spim",
    "lightsheet",
    "airyscan",
    "structuredillumination",
    "fluorescencelifetime",
    "spectralimaging",
}


def modality_from_channel_metadata(channels: list[dict[str, str]]) -> tuple[str, str] | None:
    """``(modality, reason)`` from per-channel ``ContrastMethod``, ``IlluminationType`` and
    ``AcquisitionMode`` (CZI elements or OME attributes), or None when they are silent.

    A channel's contrast method decides; where it is absent or ``Other``, its illumination
    (transmitted light: brightfield), then its acquisition mode (confocal, light sheet...:
    fluorescence). Any fluorescence channel makes the slide fluorescence (a transmitted-light
    channel beside it is auxiliary); else any brightfield channel makes it brightfield.
    """
    verdicts: dict[str, str] = {}
    for channel in channels:
        contrast = channel.get("ContrastMethod", "").lower()
        illumination = channel.get("IlluminationType", "").lower()
        acquisition = channel.get("AcquisitionMode", "").lower()
        label = f"channel {channel.get('name', '?')!r}"
        if contrast in _DARK_CONTRAST:
            verdict = ("fluorescence", f"{label}: ContrastMethod {channel['ContrastMethod']}")
        elif contrast in _BRIGHT_CONTRAST:
            verdict = ("brightfield", f"{label}: ContrastMethod {channel['ContrastMethod']}")
        elif illumination == "transmitted":
            verdict = ("brightfield", f"{label}: IlluminationType Transmitted")
        elif illumination in _DARK_ILLUMINATION:
            verdict = ("fluorescence", f"{label}: IlluminationType {channel['IlluminationType']}")
        elif acquisition in _DARK_ACQUISITION:
            verdict = ("fluorescence", f"{label}: AcquisitionMode {channel['AcquisitionMode']}")
        elif acquisition == "brightfield":
            verdict = ("brightfield", f"{label}: AcquisitionMode BrightField")
        else:
            continue
        verdicts.setdefault(verdict[0], verdict[1])
    for modality in ("fluorescence", "brightfield"):
        if modality in verdicts:
            return modality, verdicts[modality]
    return None


def _modality_from_image(slide: Slide) -> tuple[str, str]:
    """``(modality, source)`` from a small read of the largest scene (its middle half, where
    a section lies; files without a pyramid decode those subblocks): a bright background with
    a dark tail of tissue is brightfield, a dark background with a bright tail fluorescence.

    Compares the spread of the acquired pixels' brightness (mean over channels) below and
    above its median; when neither side is clearly longer (1.5 times the other and
    ``IMAGE_TAIL_SHARE`` of the median: not so on a blank or flat frame), the pixel type
    decides (RGB: brightfield).
    """
    scene = max(slide.scenes, key=lambda r: r.w * r.h)
    # the middle half of its rows: glass and tissue both show, half the subblocks are read
    band = Rect(scene.x, scene.y + scene.h // 4, scene.w, max(1, scene.h // 2))
    zoom = min(1.0, MODALITY_PROBE_SIDE / max(band.w, band.h))
    thumbnail = slide.read(band.x, band.y, band.w, band.h, zoom)
    pixels = thumbnail.reshape(-1, thumbnail.shape[2])
    if slide._fill_marks_gaps:  # leave out what was never acquired
        pixels = pixels[~np.all(pixels == slide.background.astype(pixels.dtype), axis=1)]
    brightness = pixels.astype(np.float64).mean(axis=1)
    if brightness.size:
        low, median, high = np.percentile(brightness, (0.5, 50, 99.5))
        dark_tail, bright_tail = median - low, high - median
        clear = IMAGE_TAIL_SHARE * max(median, 1.0)  # a tail shorter than this is noise
        if dark_tail > max(1.5 * bright_tail, clear):
            return "brightfield", "image"
        if bright_tail > max(1.5 * dark_tail, clear):
            return "fluorescence", "image"
    return ("brightfield" if slide._rgb else "fluorescence"), "pixel type"


def _czi_scenes(reader, bounds: Rect, path: Path) -> list[Rect]:
    """The scenes' level-0 boxes (clipped to ``bounds``), boxes that overlap merged into one;
    ``[bounds]`` when the file has no scene index."""
    try:
        rectangles = reader.scenes_bounding_rectangle_no_pyramid
    except (ValueError, RuntimeError) as error:  # scene count in metadata and index disagree
        log.warning("%s: scenes not readable (%s); using the whole bounds", path, error)
        rectangles = {}
    boxes = [
        bounds.intersection(Rect(int(r.x), int(r.y), int(r.w), int(r.h)))
        for _, r in sorted(rectangles.items())
    ]
    return merge_overlapping([b for b in boxes if b.w > 0 and b.h > 0]) or [bounds]


def merge_overlapping(boxes: list[Rect]) -> list[Rect]:
    """``boxes`` with every group of overlapping rectangles replaced by the box around it,
    in order of first appearance (so that no pixel belongs to two of them)."""
    merged = list(boxes)
    changed = True
    while changed:
        changed = False
        for i in range(len(merged)):
            for j in range(i + 1, len(merged)):
                a, b = merged[i], merged[j]
                overlap = a.intersection(b)
                if overlap.w > 0 and overlap.h > 0:
                    x, y = min(a.x, b.x), min(a.y, b.y)
                    union = Rect(x, y, max(a.right, b.right) - x, max(a.bottom, b.bottom) - y)
                    merged[i] = union
                    del merged[j]
                    changed = True
                    break
            if changed:
                break
    return merged


def _czi_bit_depth(metadata: dict) -> int | None:
    """``ComponentBitCount`` of the image (the largest over its channels), or None."""
    try:
        image = metadata["ImageDocument"]["Metadata"]["Information"]["Image"]
        channels = (image.get("Dimensions") or {}).get("Channels", {}).get("Channel") or []
    except (KeyError, TypeError, AttributeError):
        return None
    channels = [channels] if isinstance(channels, dict) else channels
    values = [c.get("ComponentBitCount") for c in channels if isinstance(c, dict)]
    values.append(image.get("ComponentBitCount"))
    bits = []
    for value in values:
        try:
            bits.append(int(value))
        except (TypeError, ValueError):
            continue
    bits = [b for b in bits if 1 <= b <= 32]
    return max(bits) if bits else None


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
        import zarr

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


def parse_plane(text: str | None) -> dict[str, int | str]:
    """``"Z=3,T=0"`` or ``"Z=max"`` / ``"Z=min"`` (``--plane``: a plane, or the brightest /
    darkest value over a dimension) as ``{"Z": 3, "T": 0}``; ``None``: ``{}``."""
    plane: dict[str, int | str] = {}
    for part in filter(None, (text or "").replace(" ", "").split(",")):
        dim, _, index = part.partition("=")
        if not re.fullmatch(r"[A-Za-z]", dim) or not (
            index in PROJECTIONS or re.fullmatch(r"\d+", index)
        ):
            raise BmsegError(
                f"--plane {text!r}: write DIM=INDEX pairs such as Z=3,T=0, or Z=max / Z=min"
            )
        plane[dim.upper()] = index if index in PROJECTIONS else int(index)
    return plane


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
    path: str | Path,
    *,
    pixel_size_um: float | None = None,
    slide_id: str | None = None,
    modality: str | None = None,
    plane: dict[str, int | str] | None = None,
) -> Slide:
    """Open a CZI, OME-TIFF or TIFF slide; errors are one-line :class:`BmsegError` naming the file.

    ``pixel_size_um`` overrides the metadata (and is required when the file has none);
    ``slide_id`` defaults to the file stem with characters outside ``[A-Za-z0-9._-]`` replaced;
    ``modality`` overrides what the metadata or the image say; ``plane`` picks indices of
    dimensions beyond Y, X and C (see :func:`parse_plane`), the first of each otherwise.
    """
    path = Path(path)
    if slide_id is not None:
        check_slide_id(slide_id)
    if pixel_size_um is not None:
        check_pixel_size(float(pixel_size_um), "--pixel-size-um")
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
        if pixel_size_um is None:
            check_pixel_size(float(native), f"{path}: the metadata's pixel size")
        slide.pixel_size_um = float(pixel_size_um if pixel_size_um is not None else native)
        if slide_id is None:
            slide_id = check_slide_id(
                default_slide_id(path), f"{path}: the slide id from its name (or pass --slide-id)"
            )
        slide.slide_id = slide_id
        if modality is not None:
            if slide._modality not in (None, modality):
                log.info(
                    "%s: --modality %s overrides the metadata's %s", path, modality, slide._modality
                )
            slide.set_modality(modality, "override")
        slide.select_plane(plane or {})
    except BaseException:
        slide.close()
        raise
    log.debug("opened %r", slide)
    return slide
