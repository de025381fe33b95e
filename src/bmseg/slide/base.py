"""The :class:`Slide` interface every reader implements, and the rules for ids, pixel sizes
and planes that hold whatever the file format.

Slide coordinates are full-resolution pixels in the file's own frame; :attr:`Slide.bounds` is
the box around everything acquired and :meth:`Slide.read` fills un-acquired area with the
background (white for brightfield RGB, 0 for fluorescence). See docs/tiles.md.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

from bmseg.contract import MODALITIES, check_id
from bmseg.errors import BmsegError
from bmseg.slide import modality as modality_rules
from bmseg.slide.geometry import Rect

log = logging.getLogger(__name__)

SLIDE_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]+$")
# --plane Z=max / Z=min: the brightest (fluorescence) or darkest (brightfield stain) value over
# that dimension's planes
PROJECTIONS = {"max": np.maximum, "min": np.minimum}
_WARNED: set[tuple[Path, str]] = set()  # (file, dimension) already warned about, once a process
# Modality decided from the image, by (file, size, mtime, plane): decided once a process.
_IMAGE_MODALITY: dict[tuple[Path, int, int, str], tuple[str, str]] = {}


@dataclass(frozen=True)
class Channel:
    """One channel of what :meth:`Slide.read` returns."""

    name: str
    dtype: str


def _white(dtype: str) -> float:
    """Full scale of an RGB channel's dtype: white."""
    return 1.0 if dtype.startswith("float") else float(np.iinfo(dtype).max)


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
                _IMAGE_MODALITY[key] = modality_rules.modality_from_image(self)
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


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
