"""Writing outputs safely: every file appears under its final name only once it is complete.

A step that fails half-way must leave nothing that a resumed run (Nextflow ``-resume``, a retry)
could mistake for a finished output, so every writer here goes through :func:`atomic_path`, and
a step's whole ``--out`` folder goes through :func:`output_set` (all files or none; a rerun
leaves only its own).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bmseg.contract import embedding_type
from bmseg.errors import BmsegError

log = logging.getLogger(__name__)

_FLOAT16_LE = np.dtype("<f2")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it to ``path`` when the block succeeds.

    On any exception the temporary file is removed and ``path`` is left untouched; an
    OSError that names no file (a write meeting a full disk) is given ``path`` as its file.
    The temporary name keeps the suffix, so libraries that pick a format by extension work.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.stem}.tmp{os.getpid()}{final.suffix}")
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename is None:
            error.filename = str(final)  # a failed write(2) names no file: name the output
        raise


MANIFEST = ".bmseg-outputs.json"
"""Lists the files of the last output set written to a folder, and whether it is complete."""
STAGING_PREFIX = ".bmseg-staging-"


@contextlib.contextmanager
def output_set(out: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a hidden staging folder inside ``out``; on success its files become ``out``'s.

    Write every output of a step below the yielded folder. When the block succeeds, the files
    are renamed into ``out`` (web pages last, ``index.html`` the very last), the files of the
    previous set that this one lacks are deleted, and :data:`MANIFEST` lists the new set. On any
    exception the staging folder is deleted and ``out`` keeps the previous set untouched. Files
    in ``out`` that no bmseg set listed (a user's notes, ``labels.json``) are left alone.
    While the renames run the manifest says ``"complete": false``, so a reader calling
    :func:`check_complete` refuses a folder a kill left half-renamed. One run per folder at a
    time: staging folders of earlier, killed runs are deleted first.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BmsegError(f"--out {out}: is a file, not a folder; pass a folder")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    for leftover in out.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    staging = out / f"{STAGING_PREFIX}{os.getpid()}"
    staging.mkdir()
    try:
        yield staging
        _commit(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(out.iterdir()):
            out.rmdir()  # a failed first run leaves no empty folder behind
        raise
    shutil.rmtree(staging, ignore_errors=True)


def _commit_order(name: str) -> tuple[int, str]:
    """Data first, then pages, then ``index.html``: a page is never ahead of its images."""
    rank = 2 if name == "index.html" else 1 if name.endswith(".html") else 0
    return rank, name


def _commit(staging: Path, out: Path) -> None:
    new = sorted(
        (path.relative_to(staging).as_posix() for path in staging.rglob("*") if not path.is_dir()),
        key=_commit_order,
    )
    old = set(read_manifest(out)["files"])
    write_json({"complete": False, "files": sorted(old | set(new))}, out / MANIFEST)
    for name in new:
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(staging / name, target)
    for name in sorted(old - set(new)):
        (out / name).unlink(missing_ok=True)
        for parent in (out / name).parents:
            if parent == out or any(parent.iterdir()):
                break
            parent.rmdir()
    write_json({"complete": True, "files": sorted(new)}, out / MANIFEST)
    if old - set(new):
        log.info("removed %d file(s) of the previous run in %s", len(old - set(new)), out)


def read_manifest(folder: Path) -> dict[str, Any]:
    """``{"complete": bool, "files": [...]}`` of ``folder``'s last output set (none: complete).

    Entries that could name a file outside ``folder`` (absolute, ``..``, through a symbolic
    link) are dropped: a hostile manifest must not make a rerun delete anything else.
    """
    path = folder / MANIFEST
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"complete": True, "files": []}
    except (OSError, ValueError, RecursionError):
        return {"complete": False, "files": []}
    if not isinstance(document, dict) or not isinstance(document.get("files"), list):
        return {"complete": False, "files": []}
    root = folder.resolve()
    files = [
        name
        for name in document["files"]
        if isinstance(name, str)
        and name
        and not Path(name).is_absolute()
        and ".." not in Path(name).parts
        and (root / name).resolve().is_relative_to(root)
    ]
    return {"complete": document.get("complete") is True, "files": files}


def check_complete(folder: Path) -> None:
    """BmsegError if a bmseg run was killed while it renamed its outputs into ``folder``."""
    if not read_manifest(folder)["complete"]:
        raise BmsegError(
            f"{folder}: an interrupted bmseg run left this folder half-written "
            f"({MANIFEST} says incomplete); rerun the step that writes it"
        )


def check_no_nulls(table: pa.Table, columns: Sequence[str], path: Path, fix: str) -> None:
    """BmsegError naming ``path`` and the columns of ``columns`` that hold nulls."""
    with_nulls = [name for name in columns if table.column(name).null_count]
    if with_nulls:
        raise BmsegError(f"{path}: nulls in column {', '.join(with_nulls)}; {fix}")


def write_parquet(table: pa.Table, path: str | os.PathLike[str], **kwargs: Any) -> Path:
    """Write ``table`` to ``path`` atomically (zstd-compressed Parquet)."""
    kwargs.setdefault("compression", "zstd")
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **kwargs)
    return Path(path)


def write_json(data: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically; NaN and infinities are refused
    (ValueError): JSON has no such numbers, and a reader would take ``Infinity`` for one."""
    with atomic_path(path) as tmp:
        text = json.dumps(data, indent=2, sort_keys=False, allow_nan=False)
        tmp.write_text(text + "\n", encoding="utf-8")
    return Path(path)


def write_bytes(data: bytes | memoryview, path: str | os.PathLike[str]) -> Path:
    """Write raw bytes (a PNG, an HTML page) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def embedding_array(embeddings: np.ndarray) -> pa.FixedSizeBinaryArray:
    """The ``embedding`` column for an (N, dim) array (cast to float16), without a per-cell copy."""
    values = np.ascontiguousarray(embeddings, dtype=_FLOAT16_LE)
    if values.ndim != 2:
        raise ValueError(f"embeddings must be (N, dim), got shape {values.shape}")
    return pa.FixedSizeBinaryArray.from_buffers(
        embedding_type(values.shape[1]), values.shape[0], [None, pa.py_buffer(values)]
    )


def embeddings_to_numpy(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """(N, dim) float16 array of an ``embedding`` column; a read-only view for one chunk.

    Equivalent for one value: ``np.frombuffer(value, "<f2")``.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not pa.types.is_fixed_size_binary(column.type) or column.null_count:
        raise ValueError(f"embedding column must be float16 bytes, {embedding_type()}, no nulls")
    width = column.type.byte_width
    dim = width // _FLOAT16_LE.itemsize
    values = np.frombuffer(
        column.buffers()[1], _FLOAT16_LE, count=len(column) * dim, offset=column.offset * width
    )
    return values.reshape(len(column), dim)


def unique_cell_uids(uids: Sequence[str] | np.ndarray, taken: set[str]) -> np.ndarray:
    """``uids`` made unique: one in ``taken`` or earlier in ``uids`` gets ``:2``, ``:3``, ...

    The suffix is the smallest one free in both; ``taken`` gets the results added. Two cells of
    one type whose centroids round to the same pixel would otherwise share a ``cell_uid``; given
    the cells in a stable order, the result is the same on every run (docs/data.md).
    """
    values = np.asarray(uids, dtype=object)
    _, first = np.unique(values.astype(str), return_index=True)
    clash = np.ones(len(values), dtype=bool)
    clash[first] = False
    clash |= np.fromiter(map(taken.__contains__, values), dtype=bool, count=len(values))
    result = values.copy()
    if clash.any():
        local = set(values.tolist())
        for index in np.flatnonzero(clash):  # rare: only cells that share a centroid pixel
            suffix = 2
            while (candidate := f"{values[index]}:{suffix}") in taken or candidate in local:
                suffix += 1
            result[index] = candidate
            local.add(candidate)
    taken.update(result.tolist())
    return result


def table_options(schema: pa.Schema) -> dict[str, Any]:
    """Parquet writer options: dictionaries for strings, statistics for plain scalars only.

    Dictionary encoding and min/max statistics of binary and list columns (embeddings, JPEGs,
    contours) cost time to write and buy nothing: nobody filters on them.
    """
    strings = [
        f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)
    ]
    scalars = [
        f.name
        for f in schema
        if not (pa.types.is_nested(f.type) or pa.types.is_binary(f.type))
        and not pa.types.is_fixed_size_binary(f.type)
    ]
    return {"use_dictionary": strings, "write_statistics": scalars}


@contextlib.contextmanager
def parquet_writer(
    path: str | os.PathLike[str], schema: pa.Schema, **kwargs: Any
) -> Iterator[pq.ParquetWriter]:
    """Stream tables with ``schema`` into ``path`` (zstd), which appears only when complete.

    For outputs too large to build in memory at once: call ``write_table`` per chunk; each
    chunk becomes its own row group. Closing without a write leaves a valid empty table.
    Options default to :func:`table_options`.
    """
    kwargs.setdefault("compression", "zstd")
    for key, value in table_options(schema).items():
        kwargs.setdefault(key, value)
    with atomic_path(path) as tmp:
        writer = pq.ParquetWriter(tmp, schema, **kwargs)
        try:
            yield writer
        finally:
            writer.close()


class MaskWriter:
    """Adds tiles' label images to an open ``masks.h5`` (see :func:`masks_writer`)."""

    def __init__(self, h5file: Any) -> None:
        self._file = h5file

    def add(
        self,
        slide_id: str,
        tile_id: str,
        labels: Any,
        read_x: int,
        read_y: int,
        hspc_labels: Any = None,
    ) -> None:
        """Store ``labels`` (uint32, the tile's read window) as ``/{slide_id}/{tile_id}/labels``,
        and ``hspc_labels`` (the whole HSPC layer, same shape) beside it when given."""
        group = self._file.require_group(slide_id).create_group(tile_id)
        group.attrs["read_x"] = int(read_x)
        group.attrs["read_y"] = int(read_y)
        chunks = (min(512, labels.shape[0]), min(512, labels.shape[1])) if labels.size else None
        layers = {"labels": labels, "hspc_labels": hspc_labels}
        for name, layer in layers.items():
            if layer is not None:
                data = layer.astype("uint32", copy=False)
                group.create_dataset(name, data=data, chunks=chunks, **hdf5plugin.LZ4())


@contextlib.contextmanager
def masks_writer(path: str | os.PathLike[str]) -> Iterator[MaskWriter]:
    """Open ``masks.h5`` for writing tile label images (LZ4); it appears only when complete.

    The HDF5 file is built in memory (the masks compress to a small share of the batch) and
    written out in one go: HDF5 meeting a full disk mid-file leaves its library in a state in
    which closing the file crashes the process (exit 139, which Nextflow retries); a plain
    write meets it as an OSError, reported as one line.
    """

    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as h5file:
        yield MaskWriter(h5file)
    write_bytes(buffer.getbuffer(), path)
