"""CZI files read through pylibCZIrw (libCZI): mosaics, scenes, pyramids, Z/T/... planes.

A :class:`CziSlide` wraps one libCZI reader, and libCZI readers are not shared across threads:
open one per reader thread (opening is cheap: only the subblock directory and the metadata are
read).
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from pylibCZIrw import czi

from bmseg.errors import BmsegError
from bmseg.slide.base import PROJECTIONS, Channel, Slide, one_line
from bmseg.slide.geometry import Rect, merge_overlapping
from bmseg.slide.modality import modality_from_channel_metadata

log = logging.getLogger(__name__)

CZI_MAGIC = b"ZISRAWFILE"
"""The first bytes of every CZI file."""

# libCZI pixel types: (numpy dtype, samples per pixel). Bgr* types come back as three channels.
_CZI_PIXEL_TYPES = {
    "Gray8": ("uint8", 1),
    "Gray16": ("uint16", 1),
    "Gray32Float": ("float32", 1),
    "Bgr24": ("uint8", 3),
    "Bgr48": ("uint16", 3),
    "Bgr96Float": ("float32", 3),
}


class CziSlide(Slide):
    """A CZI file read through one libCZI reader (not to be shared across threads)."""

    def __init__(self, path: Path) -> None:
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
                f"{path}: cannot read this CZI file (truncated or damaged? {one_line(error)}); "
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
                f"(truncated or damaged file? {one_line(error)}); copy the complete file again"
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
