"""QuPath GeoJSON of cell tables: one detection per cell, its class coloured, its id stable.

GATHER writes each slide's cells, CLASSIFY the same cells with their classifier's verdict as
the class. Features are built column-wise by Arrow and written in chunks from Arrow's buffers,
so a slide of a million cells never becomes a million Python strings.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bmseg.cell_tables import flat_contours
from bmseg.contract import REJECTED_CLASS
from bmseg.errors import BmsegError
from bmseg.storage import atomic_path

TYPE_COLOURS = {"MK": (220, 50, 47), "HSPC": (38, 139, 210)}
"""RGB of each cell type, in QuPath and in the plots."""
CLASS_COLOURS = {**TYPE_COLOURS, REJECTED_CLASS: (150, 150, 150)}
CELL_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/bmseg/bmseg/cell_uid")
"""Namespace of the version-5 UUIDs that identify cells in GeoJSON (docs/results.md)."""
GEOJSON_CHUNK = 50000
"""Cells joined into text at once: bounds the memory of one write."""


def _number_strings(values: np.ndarray, decimals: int, non_finite: str = "null") -> pa.Array:
    """Numbers as JSON text, non-finite values as ``non_finite``."""
    array = pa.array(np.round(values.astype(np.float64), decimals))
    text = pc.cast(array, pa.string())
    return pc.if_else(pc.is_finite(array), text, pa.scalar(non_finite))


def cell_uuids(uids: pa.Array | pa.ChunkedArray) -> pa.Array:
    """RFC 4122 version-5 UUIDs of cell uids under :data:`CELL_UUID_NAMESPACE`, as strings.

    Equal to ``str(uuid.uuid5(CELL_UUID_NAMESPACE, uid))``: QuPath keeps a feature's ``id`` as
    the object's id only when it is a UUID, so the same cell gets the same id in every file
    and every run. One SHA-1 per cell; the bit setting and hex formatting are numpy.
    """
    prefix = CELL_UUID_NAMESPACE.bytes
    values = uids.to_pylist()
    digests = b"".join(hashlib.sha1(prefix + u.encode("utf-8")).digest()[:16] for u in values)
    raw = np.frombuffer(digests, np.uint8).reshape(-1, 16).copy()
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x50  # version 5
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
    hexed = np.frombuffer(raw.tobytes().hex().encode("ascii"), np.uint8).reshape(-1, 32)
    text = np.full((len(values), 36), ord("-"), np.uint8)
    text[:, [i for i in range(36) if i not in (8, 13, 18, 23)]] = hexed
    offsets = np.arange(0, 36 * (len(values) + 1), 36, dtype=np.int32)
    return pa.StringArray.from_buffers(
        len(values), pa.py_buffer(offsets.tobytes()), pa.py_buffer(text.tobytes())
    )


def geojson_features(
    meta: pa.Table, origin: tuple[float, float], measurements: Sequence[str], classes: pa.Array
) -> pa.Array:
    """One GeoJSON Feature (JSON text) per cell, built column-wise by Arrow.

    The feature ``id`` is the cell's :func:`cell_uuids`; its ``name`` and ``metadata.cell_uid``
    are the cell uid (QuPath's measurements are numbers only), ``classes`` its classification.
    Coordinates are full-resolution pixels relative to the slide's top-left corner (slide
    coordinates minus the bounds origin), the frame QuPath shows when it opens the slide.
    Cells whose contour has fewer than three vertices get their bounding box as polygon.
    Non-finite measurements are written as the string ``"NaN"``, as QuPath writes them.
    """
    flat_x, flat_y, offsets = flat_contours(meta)
    lengths = np.diff(offsets)
    degenerate = lengths < 3
    if degenerate.any():
        x0 = meta["bbox_x_px"].to_numpy().astype(np.float64)
        y0 = meta["bbox_y_px"].to_numpy().astype(np.float64)
        x1 = x0 + meta["bbox_w_px"].to_numpy()
        y1 = y0 + meta["bbox_h_px"].to_numpy()
        lengths = np.where(degenerate, 4, lengths)
        new_offsets = np.concatenate([[0], np.cumsum(lengths)])
        keep = np.repeat(~degenerate, np.diff(offsets))
        new_x = np.empty(new_offsets[-1])
        new_y = np.empty(new_offsets[-1])
        target = np.repeat(~degenerate, lengths)
        new_x[target], new_y[target] = flat_x[keep], flat_y[keep]
        box_x = np.stack([x0, x1, x1, x0], 1)[degenerate].ravel()
        box_y = np.stack([y0, y0, y1, y1], 1)[degenerate].ravel()
        new_x[~target], new_y[~target] = box_x, box_y
        flat_x, flat_y, offsets = new_x, new_y, new_offsets
    points = pc.binary_join_element_wise(
        "[",
        _number_strings(flat_x - origin[0], 2),
        ",",
        _number_strings(flat_y - origin[1], 2),
        "]",
        "",
    )
    first_points = points.take(pa.array(offsets[:-1]))
    rings = pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), points), ",")
    colours = {t: ",".join(map(str, c)) for t, c in CLASS_COLOURS.items()}
    encoded = classes.dictionary_encode()
    colour = pa.array(
        [colours.get(t, "128,128,128") for t in encoded.dictionary.to_pylist()], pa.string()
    ).take(encoded.indices)
    measured = [
        pc.binary_join_element_wise(
            json.dumps(name) + ":",
            _number_strings(meta[name].to_numpy(zero_copy_only=False), 4, '"NaN"'),
            "",
        )
        for name in measurements
    ]
    measurement_text = pc.binary_join_element_wise(*measured, ",") if measured else pa.scalar("")
    uids = meta["cell_uid"].combine_chunks()
    return pc.binary_join_element_wise(
        '{"type":"Feature","id":"',
        cell_uuids(uids),
        '","geometry":{"type":"Polygon","coordinates":[[',
        rings,
        ",",
        first_points,
        ']]},"properties":{"objectType":"detection","name":"',
        uids,
        '","classification":{"name":"',
        classes,
        '","color":[',
        colour,
        ']},"metadata":{"cell_uid":"',
        uids,
        '","cell_type":"',
        meta["cell_type"].combine_chunks(),
        '"},"measurements":{',
        measurement_text,
        "}}}",
        "",
    )


def write_geojson(
    meta: pa.Table,
    origin: tuple[float, float],
    measurements: Sequence[str],
    path: Path,
    classes: pa.Array | None = None,
) -> None:
    """Write a FeatureCollection of ``meta``'s cells to ``path`` (atomically, in chunks).

    ``classes`` (one QuPath class name per row) defaults to each cell's type.
    """
    for column in ("cell_uid", "cell_type"):
        unsafe = pc.any(pc.match_substring_regex(meta[column], r'["\\\x00-\x1f]')).as_py()
        if unsafe:
            raise BmsegError(f"{path}: {column} with quotes or control characters; re-run SEGMENT")
    classes = meta["cell_type"].combine_chunks() if classes is None else classes
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        handle.write(b'{"type":"FeatureCollection","features":[\n')
        for start in range(0, meta.num_rows, GEOJSON_CHUNK):
            features = geojson_features(
                meta.slice(start, GEOJSON_CHUNK),
                origin,
                measurements,
                classes.slice(start, GEOJSON_CHUNK),
            )
            if start:
                handle.write(b",\n")
            # One Arrow join, written from its buffer: no Python string per feature.
            whole = pa.ListArray.from_arrays(pa.array([0, len(features)], pa.int32()), features)
            handle.write(pc.binary_join(whole, ",\n")[0].as_buffer())
        handle.write(b"\n]}\n")
