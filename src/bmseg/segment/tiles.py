"""SEGMENT's inputs: the batch table's tiles, the slides' plan records, and the reader threads
that fetch each tile's read window ahead of the device."""

from __future__ import annotations

import collections
import itertools
import json
import logging
import re
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bmseg.contract import BATCH_COLUMNS, MODALITIES, check_id
from bmseg.errors import BmsegError
from bmseg.pixels import to_rgb8
from bmseg.slide import Rect, Slide, open_slide
from bmseg.storage import check_no_nulls

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tile:
    """One row of a batch table: the core it owns and the window it reads, slide px."""

    slide_id: str
    tile_id: str
    core: Rect
    read: Rect
    pixel_size_um: float


ReadTile = tuple[Tile, np.ndarray, np.ndarray, float]
"""A read tile: the tile, its slide pixels, its RGB model input, seconds spent reading."""


def read_batch_table(path: Path) -> tuple[int, list[Tile]]:
    """The batch number and tiles of a ``batch_NNNN.parquet``, in ``order``; validated."""
    try:
        table = pq.read_table(path)
    except FileNotFoundError as error:
        raise BmsegError(f"{path}: no such batch table; pass a batch_NNNN.parquet") from error
    except (OSError, pa.ArrowException) as error:
        raise BmsegError(
            f"{path}: not a readable Parquet batch table ({error}); re-run bmseg batch"
        ) from error
    missing = [c for c in (*BATCH_COLUMNS, "batch", "order") if c not in table.column_names]
    if missing:
        raise BmsegError(
            f"{path}: batch table lacks columns {missing}; pass a table written by bmseg batch"
        )
    check_no_nulls(table, [*BATCH_COLUMNS, "batch", "order"], path, "re-run bmseg batch")
    if table.num_rows:
        table = table.sort_by("order")
    rows = table.select([*BATCH_COLUMNS, "batch"]).to_pylist()
    numbers = {row["batch"] for row in rows}
    if len(numbers) > 1:
        raise BmsegError(f"{path}: rows of several batches {sorted(numbers)}; pass one batch")
    if numbers:
        number = int(numbers.pop())
    else:
        digits = re.findall(r"\d+", path.stem)
        number = int(digits[-1]) if digits else 0
    tiles = [
        Tile(
            slide_id=check_id(row["slide_id"], f"{path}: slide_id"),
            tile_id=check_id(row["tile_id"], f"{path}: tile_id"),
            core=Rect(row["core_x"], row["core_y"], row["core_w"], row["core_h"]),
            read=Rect(row["read_x"], row["read_y"], row["read_w"], row["read_h"]),
            pixel_size_um=float(row["pixel_size_um"]),
        )
        for row in rows
    ]
    seen = collections.Counter((t.slide_id, t.tile_id) for t in tiles)
    duplicates = [f"{s}/{t}" for (s, t), n in seen.items() if n > 1]
    if duplicates:
        raise BmsegError(f"{path}: tiles listed twice {duplicates[:5]}; re-run bmseg batch")
    return number, tiles


def slide_pixel_sizes(batch_path: Path, tiles: Sequence[Tile]) -> dict[str, float]:
    """The pixel size the batch table records for each slide (one per slide)."""
    sizes: dict[str, set[float]] = collections.defaultdict(set)
    for tile in tiles:
        sizes[tile.slide_id].add(tile.pixel_size_um)
    for slide_id, values in sizes.items():
        if len(values) != 1 or not min(values) > 0:
            raise BmsegError(
                f"{batch_path}: slide {slide_id} has pixel sizes {sorted(values)}; "
                "re-run bmseg plan and bmseg batch"
            )
    return {slide_id: values.pop() for slide_id, values in sizes.items()}


def check_tiles(batch_path: Path, tiles: Sequence[Tile], slides: dict[str, Slide]) -> None:
    """Every tile's read window is non-empty, inside its slide and contains its core."""
    for tile in tiles:
        bounds = slides[tile.slide_id].bounds
        where = f"{batch_path}: tile {tile.slide_id}/{tile.tile_id}"
        if tile.read.w <= 0 or tile.read.h <= 0 or tile.core.w <= 0 or tile.core.h <= 0:
            raise BmsegError(f"{where} has an empty core or read window; re-run bmseg plan")
        if tile.read.intersection(bounds) != tile.read:
            raise BmsegError(
                f"{where} reads {tile.read.as_dict()} outside the slide {bounds.as_dict()}; "
                "re-run bmseg plan for this slide file"
            )
        if tile.core.intersection(tile.read) != tile.core:
            raise BmsegError(f"{where}: core lies outside its read window; re-run bmseg plan")


@dataclass(frozen=True)
class PlanRecords:
    """What SEGMENT takes from the slides' slide.json (``--plans``), by slide id."""

    intensity: dict[str, dict]
    """slide.json ``intensity``: the models' intensity scale (absent: per-tile stretching)."""
    choices: dict[str, dict]
    """``open_slide`` keywords PLAN decided: the ``modality`` and the ``plane`` it read."""


def read_plans(plan_paths: Sequence[str], slide_ids: Iterable[str]) -> PlanRecords:
    """slide.json records of the batch's slides, validated; slides without one are absent.

    Slides without an ``intensity`` record have their tiles stretched per tile (logged); a
    record that does not match its slide's channels, or a modality or plane that is not
    one, is an error naming the file.
    """
    wanted, records, choices = set(slide_ids), {}, {}
    for path_text in plan_paths:
        path = Path(path_text)
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
            slide_id, record = info["slide_id"], info.get("intensity")
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise BmsegError(
                f"--plans {path}: not a readable slide.json ({error}); pass the files bmseg plan "
                "wrote"
            ) from error
        if slide_id not in wanted:
            continue
        choices[slide_id] = _plan_choices(path, info)
        if record is None:
            continue
        channels = len(info.get("channels") or [])
        try:
            low = [float(v) for v in record["low"]]
            high = [float(v) for v in record["high"]]
            bits = record.get("bit_depth")
            bits = None if bits is None else int(bits)
        except (KeyError, TypeError, ValueError) as error:
            raise BmsegError(
                f"--plans {path}: bad intensity record ({error}); re-run bmseg plan"
            ) from error
        if (
            len(low) != len(high)
            or not np.isfinite(low + high).all()
            or (channels and len(low) != channels)
        ):
            raise BmsegError(
                f"--plans {path}: intensity ranges do not match the slide's {channels} channels; "
                "re-run bmseg plan"
            )
        records[slide_id] = {"low": low, "high": high, "bit_depth": bits}
    for slide_id in sorted(wanted - set(records)):
        log.info("slide %s: no slide.json intensity given (--plans): per-tile stretching", slide_id)
    return PlanRecords(records, choices)


def _plan_choices(path: Path, info: dict) -> dict:
    """slide.json's ``modality`` and ``plane``, checked, as :func:`open_slide` keywords."""
    modality, plane = info.get("modality"), info.get("plane") or {}
    plane_ok = isinstance(plane, dict) and all(
        isinstance(dim, str) and (isinstance(index, str) or type(index) is int)
        for dim, index in plane.items()
    )
    if modality not in (None, *MODALITIES) or not plane_ok:
        raise BmsegError(
            f"--plans {path}: modality {modality!r} or plane {plane!r} is not one bmseg plan "
            "writes; re-run bmseg plan"
        )
    return {"modality": modality, "plane": plane or None}


class TileReader:
    """Reads tiles on a pool of threads, one open :class:`Slide` per thread and slide."""

    def __init__(
        self,
        paths: dict[str, Path],
        pixel_sizes: dict[str, float],
        threads: int,
        intensity: dict[str, dict] | None = None,
        slide_choices: dict[str, dict] | None = None,
    ):
        self._paths = paths
        self._pixel_sizes = pixel_sizes
        self._intensity = intensity or {}
        self._choices = slide_choices or {}
        self._local = threading.local()
        self._opened: list[Slide] = []
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="bmseg-reader")
        self._depth = max(1, threads)

    def _slide(self, slide_id: str) -> Slide:
        slides = self._local.__dict__.setdefault("slides", {})
        if slide_id not in slides:
            slide = open_slide(
                self._paths[slide_id],
                pixel_size_um=self._pixel_sizes[slide_id],
                slide_id=slide_id,
                **self._choices.get(slide_id, {}),
            )
            slides[slide_id] = slide
            with self._lock:
                self._opened.append(slide)
        return slides[slide_id]

    def _read(self, tile: Tile) -> ReadTile:
        start = time.perf_counter()
        slide = self._slide(tile.slide_id)
        pixels = slide.read(tile.read.x, tile.read.y, tile.read.w, tile.read.h)
        record = self._intensity.get(tile.slide_id)
        bit_depth = (
            slide.bit_depth
            if record is None or record["bit_depth"] is None
            else record["bit_depth"]
        )
        rgb = to_rgb8(pixels, slide.modality, bit_depth, record)
        return tile, pixels, rgb, time.perf_counter() - start

    def iter_read(self, tiles: Sequence[Tile], lookahead: int) -> Iterator[ReadTile]:
        """Tiles' ``(tile, pixels, rgb, seconds)`` in order, ``lookahead`` reads kept in flight."""
        pending: collections.deque[Future] = collections.deque()
        remaining = iter(tiles)
        for tile in itertools.islice(remaining, self._depth + lookahead):
            pending.append(self._pool.submit(self._read, tile))
        while pending:
            result = pending.popleft().result()
            following = next(remaining, None)
            if following is not None:
                pending.append(self._pool.submit(self._read, following))
            yield result

    def close(self) -> None:
        """Stop the threads and close every slide they opened."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        for slide in self._opened:
            slide.close()
