"""Writing outputs safely: every file appears under its final name only once it is complete.

A step that fails half-way must leave nothing that a resumed run (Nextflow ``-resume``, a retry)
could mistake for a finished output, so every writer here goes through :func:`atomic_path`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it to ``path`` when the block succeeds.

    On any exception the temporary file is removed and ``path`` is left untouched.
    The temporary name keeps the suffix, so libraries that pick a format by extension work.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.stem}.tmp{os.getpid()}{final.suffix}")
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_parquet(table: pa.Table, path: str | os.PathLike[str], **kwargs: Any) -> Path:
    """Write ``table`` to ``path`` atomically (zstd-compressed Parquet)."""
    kwargs.setdefault("compression", "zstd")
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **kwargs)
    return Path(path)


def write_json(data: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return Path(path)


def write_bytes(data: bytes, path: str | os.PathLike[str]) -> Path:
    """Write raw bytes (a PNG, an HTML page) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


@contextlib.contextmanager
def parquet_writer(
    path: str | os.PathLike[str], schema: pa.Schema, **kwargs: Any
) -> Iterator[pq.ParquetWriter]:
    """Stream tables with ``schema`` into ``path`` (zstd), which appears only when complete.

    For outputs too large to build in memory at once: call ``write_table`` per chunk; each
    chunk becomes its own row group. Closing without a write leaves a valid empty table.
    """
    kwargs.setdefault("compression", "zstd")
    with atomic_path(path) as tmp:
        writer = pq.ParquetWriter(tmp, schema, **kwargs)
        try:
            yield writer
        finally:
            writer.close()


CROPS_SCHEMA = pa.schema(
    [
        ("cell_uid", pa.string()),
        ("x", pa.int64()),
        ("y", pa.int64()),
        ("scale", pa.float32()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("image", pa.binary()),
    ]
)
"""``crops.parquet``: one gallery image per cell (docs/data.md), via :func:`parquet_writer`."""


class MaskWriter:
    """Adds tiles' label images to an open ``masks.h5`` (see :func:`masks_writer`)."""

    def __init__(self, h5file: Any) -> None:
        self._file = h5file

    def add(self, slide_id: str, tile_id: str, labels: Any, read_x: int, read_y: int) -> None:
        """Store ``labels`` (uint32, the tile's read window) as ``/{slide_id}/{tile_id}/labels``."""
        import hdf5plugin

        group = self._file.require_group(slide_id).create_group(tile_id)
        group.attrs["read_x"] = int(read_x)
        group.attrs["read_y"] = int(read_y)
        chunks = (min(512, labels.shape[0]), min(512, labels.shape[1])) if labels.size else None
        group.create_dataset(
            "labels", data=labels.astype("uint32", copy=False), chunks=chunks, **hdf5plugin.LZ4()
        )


@contextlib.contextmanager
def masks_writer(path: str | os.PathLike[str]) -> Iterator[MaskWriter]:
    """Open ``masks.h5`` for writing tile label images (LZ4); it appears only when complete."""
    import h5py

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5file:
        yield MaskWriter(h5file)
