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

The package: :mod:`~bmseg.slide.base` (the :class:`Slide` interface, ids, pixel sizes, planes),
:mod:`~bmseg.slide.czi` and :mod:`~bmseg.slide.tiff` (the readers),
:mod:`~bmseg.slide.modality` (brightfield or fluorescence), :mod:`~bmseg.slide.intensity`
(PLAN's intensity range), :mod:`~bmseg.slide.geometry` (:class:`Rect`); :func:`open_slide`
picks the reader.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from bmseg.errors import BmsegError
from bmseg.slide.base import (
    SLIDE_ID_PATTERN,
    Channel,
    Slide,
    check_pixel_size,
    check_slide_id,
    default_slide_id,
    parse_plane,
)
from bmseg.slide.czi import CZI_MAGIC, CziSlide
from bmseg.slide.geometry import Rect
from bmseg.slide.intensity import intensity_ranges
from bmseg.slide.tiff import TiffSlide

__all__ = [
    "SLIDE_ID_PATTERN",
    "Channel",
    "Rect",
    "Slide",
    "check_slide_id",
    "default_slide_id",
    "intensity_ranges",
    "open_slide",
    "parse_plane",
]

log = logging.getLogger(__name__)


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
        slide: Slide = CziSlide(path)
    elif name.endswith(".czi"):
        raise BmsegError(
            f"{path}: not a CZI file (no ZISRAWFILE header); pass the original Zeiss .czi file"
        )
    elif head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        slide = TiffSlide(path)
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
