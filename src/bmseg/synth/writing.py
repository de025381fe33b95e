"""CZI files written with pylibCZIrw: the synthetic mosaic and its truth table, frames placed
at chosen positions and planes, and ZEN-like channel metadata."""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from pylibCZIrw import czi
from tqdm import tqdm

from bmseg.contract import TRUTH_SUFFIX
from bmseg.errors import BmsegError
from bmseg.slide import Rect, default_slide_id
from bmseg.storage import atomic_path, write_parquet
from bmseg.synthetic import (
    FLUORESCENCE_CHANNELS,
    MOSAIC_TILE,
    PIXEL_SIZE_UM,
    SyntheticLayout,
    truth_table,
)

log = logging.getLogger(__name__)


def truth_path_for(path: str | Path) -> Path:
    """``OUT.czi`` -> ``OUT.truth.parquet``."""
    path = Path(path)
    return path.with_name(f"{path.stem}{TRUTH_SUFFIX}")


def write_synthetic_slide(
    path: str | Path,
    width: int = 4000,
    height: int = 4000,
    seed: int = 0,
    modality: str = "brightfield",
    density: str = "sparse",
) -> Path:
    """Write a synthetic CZI at ``path`` and its truth table; return the truth table's path."""
    path = Path(path)
    if path.suffix.lower() != ".czi":
        raise BmsegError(f"{path}: the synthetic slide must be named *.czi; change OUT")
    for name, value in (("--width", width), ("--height", height)):
        if value < 256:
            raise BmsegError(f"{name} {value}: a synthetic slide needs at least 256 px; raise it")
    layout = SyntheticLayout(width, height, seed, modality, density)
    slide_id = default_slide_id(path)
    tiles = [
        Rect(x, y, min(MOSAIC_TILE, width - x), min(MOSAIC_TILE, height - y))
        for y in range(0, height, MOSAIC_TILE)
        for x in range(0, width, MOSAIC_TILE)
    ]
    acquired = [tile for tile in tiles if layout.acquired(tile)]
    log.info(
        "synth %s: %d x %d px, seed %d, %s, %d cells, %d of %d mosaic tiles acquired",
        path,
        width,
        height,
        seed,
        modality,
        len(layout.cells),
        len(acquired),
        len(tiles),
    )
    truth_path = truth_path_for(path)
    with atomic_path(path) as tmp:
        tmp.unlink(missing_ok=True)
        with czi.create_czi(str(tmp), exist_ok=True) as writer:
            progress = tqdm(acquired, desc="synth", unit="tile", leave=False, delay=2)
            for tile in progress:
                image = layout.render(tile)
                if modality == "brightfield":
                    writer.write(image[:, :, ::-1], location=(tile.x, tile.y))  # Bgr24
                else:
                    for channel in range(image.shape[2]):
                        plane = np.ascontiguousarray(image[:, :, channel : channel + 1])
                        writer.write(plane, location=(tile.x, tile.y), plane={"C": channel})
            names = {0: "TL Brightfield"} if modality == "brightfield" else {}
            if modality == "fluorescence":
                names = dict(enumerate(FLUORESCENCE_CHANNELS))
            writer.write_metadata(
                document_name=slide_id,
                channel_names=names,
                scale_x=PIXEL_SIZE_UM * 1e-6,  # libCZI stores metres
                scale_y=PIXEL_SIZE_UM * 1e-6,
            )
        contrast = "Brightfield" if modality == "brightfield" else "Fluorescence"
        describe_channels(tmp, [{"ContrastMethod": contrast}] * len(names))
        write_parquet(truth_table(layout, slide_id), truth_path)
    log.info("wrote %s and %s", path, truth_path)
    return truth_path


def write_frames_czi(
    path: str | Path,
    frames: list[tuple[int, int, np.ndarray, dict[str, int], int]],
    pixel_size_um: float,
) -> Path:
    """Write a CZI of ``(x, y, array, plane, scene)`` subblocks: ``array`` (h, w) gray or
    (h, w, 3) RGB (stored as Bgr24), at slide ``(x, y)``, plane e.g. ``{"Z": 2, "C": 0}``."""
    path = Path(path)
    with czi.create_czi(str(path), exist_ok=True) as writer:
        for x, y, array, plane, scene in frames:
            data = array[:, :, ::-1] if array.ndim == 3 else array[:, :, None]
            writer.write(np.ascontiguousarray(data), location=(x, y), plane=plane, scene=scene)
        scale = pixel_size_um * 1e-6
        writer.write_metadata(document_name=path.stem, scale_x=scale, scale_y=scale)
    return path


def describe_channels(path: str | Path, channels: list[dict[str, str | None]]) -> None:
    """Edit the channel metadata of a CZI in place, as ZEN would have written it.

    One dict per channel (in C order): ``Name`` (``None`` removes it), ``ContrastMethod``,
    ``IlluminationType``, ``AcquisitionMode`` (child elements of
    ``Information/Image/Dimensions/Channels/Channel``) and ``DisplayName``, ``ShortName``,
    ``DyeName`` (of the channel's ``DisplaySetting/Channels/Channel``, made where given).
    """
    with czi.edit_czi(str(path)) as editor:
        root = ET.fromstring(editor.read_metadata_xml())
        metadata = root.find("Metadata")
        elements = root.findall("Metadata/Information/Image/Dimensions/Channels/Channel")
        displays = None
        for index, (element, fields) in enumerate(zip(elements, channels, strict=False)):
            if "Name" in fields:
                element.attrib.pop("Name", None)
                if fields["Name"] is not None:
                    element.set("Name", fields["Name"])
            for tag in ("ContrastMethod", "IlluminationType", "AcquisitionMode"):
                if fields.get(tag):
                    ET.SubElement(element, tag).text = fields[tag]
            shown = {k: fields[k] for k in ("DisplayName", "ShortName", "DyeName") if fields.get(k)}
            if shown:
                if displays is None:
                    displays = ET.SubElement(ET.SubElement(metadata, "DisplaySetting"), "Channels")
                display = ET.SubElement(displays, "Channel", Id=f"Channel:{index}")
                if "DisplayName" in shown:
                    display.set("Name", shown.pop("DisplayName"))
                for tag, text in shown.items():
                    ET.SubElement(display, tag).text = text
        with editor.edit_session() as builder:
            builder.set_xml(ET.tostring(root, encoding="unicode"))
