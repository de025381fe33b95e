"""FINETUNE: Cellpose-SAM fine-tuned on the HSPCs a lab accepted in the galleries.

``bmseg finetune CELLS LABELS... --batches DIRS... --slides SLIDES... --models DIR --out MODELS``
takes the HSPCs labelled *yes* (majority of annotators, :func:`bmseg.labels.merge_labels`),
their masks from SEGMENT's ``masks.h5`` (the batch folders) and the slide pixels under them
(read and shown to the network exactly as SEGMENT does), and trains the models folder's
Cellpose-SAM on them with Cellpose's own training code (:mod:`bmseg.models.training`).

In each tile that holds an accepted HSPC, every other HSPC detection (labelled no or unsure,
unlabelled, or dropped by GATHER) is *masked out of the tile*: its pixels are inpainted from the
surrounding tissue and it is background in the targets, so the network is neither taught that
an unchecked cell is background nor shown it as a cell. MK detections stay as they are: they are
background for the HSPC network. Tiles are split into training and validation (seeded, by tile
or by slide); the validation AP@0.5 of the parent and of the fine-tuned network, both run by
SEGMENT's HSPC path, go into the new folder's manifest with the parent, data and settings.

The new folder holds the other weights hard-linked (or copied) from the parent folder; it is
built under a temporary name and renamed when complete, and never replaces its input.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import h5py
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from bmseg.cell_tables import EMBEDDED_COLUMNS, find_cell_tables, table_uids
from bmseg.errors import BmsegError
from bmseg.features import cell_centroids, intensity_stats
from bmseg.label_images import relabel
from bmseg.labels import merge_labels
from bmseg.models.choices import FINETUNE_SPLITS
from bmseg.models.device import resolve_device
from bmseg.models.layout import read_manifest, weight_path, write_manifest
from bmseg.models.loading import load_cellpose
from bmseg.models.training import (
    Region,
    TrainSettings,
    crops_around,
    train_cellpose,
    validation_ap50,
)
from bmseg.pixels import to_rgb8
from bmseg.slide import Rect, open_slide
from bmseg.slide_args import match_slides

log = logging.getLogger(__name__)

FINETUNED_NAME = "cpsam_finetuned"
"""File name of the fine-tuned Cellpose-SAM in the new models folder."""
MASK_OUT_GROWTH_PX = 2
"""Masked-out cells are inpainted over their mask grown by this much (their blurred edge)."""
TABLE_COLUMNS = (
    "cell_uid",
    "slide_id",
    "tile_id",
    "cell_type",
    "mask_label",
    "area_px",
    "area_um2",
)
MEAN_PREFIX = "intensity_mean_"
MEAN_TOLERANCE = 0.5
"""Largest difference between a cell's mean intensity in the tables and in the slide file:
SEGMENT measured it on these very pixels, so only float32 rounding may differ."""


@dataclass
class TileCells:
    """One tile of the run with accepted HSPCs: which of its mask labels are what."""

    slide_id: str
    tile_id: str
    accepted: dict[int, str]  # mask_label -> cell_uid
    mks: set[int]  # mask labels of MKs (kept as they are: background)
    means: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    """The tables' ``intensity_mean_*`` of the accepted cells, in ``accepted`` order."""


@dataclass
class TileMasks:
    """Where a tile's label image lives: the masks.h5 file and the read window origin."""

    path: Path
    read_x: int
    read_y: int


def accepted_tiles(cell_paths: Sequence[Path], label_paths: Sequence[Path]) -> list[TileCells]:
    """The tiles holding HSPCs labelled yes, with each tile's accepted HSPCs and MKs."""

    files = find_cell_tables(cell_paths, EMBEDDED_COLUMNS)
    merged, _ = merge_labels(label_paths, table_uids(files))
    yes = pa.array(sorted(uid for uid, is_yes in merged.items() if is_yes), pa.string())
    means = sorted(
        set.intersection(
            *({n for n in pq.read_schema(f).names if n.startswith(MEAN_PREFIX)} for f in files)
        )
    )
    columns = [*TABLE_COLUMNS, *means]
    table = pa.concat_tables(pq.read_table(f, columns=columns) for f in files)
    hspc = pc.equal(table["cell_type"], "HSPC")
    accepted = table.filter(pc.and_(hspc, pc.is_in(table["cell_uid"], value_set=yes)))
    if not accepted.num_rows:
        raise BmsegError(
            f"{label_paths[0]}: no HSPC of {cell_paths[0]} is labelled yes; accept HSPCs in the "
            "gallery (or pass the label files of this run) before fine-tuning"
        )
    tiles: dict[tuple[str, str], TileCells] = {}
    for row in accepted.to_pylist():
        key = (row["slide_id"], row["tile_id"])
        tile = tiles.setdefault(key, TileCells(*key, accepted={}, mks=set()))
        tile.accepted[int(row["mask_label"])] = row["cell_uid"]
        for column in means:
            tile.means.setdefault(column, []).append(row[column])
    mks = table.filter(pc.equal(table["cell_type"], "MK")).select(
        ["slide_id", "tile_id", "mask_label"]
    )
    for row in mks.to_pylist():
        tile = tiles.get((row["slide_id"], row["tile_id"]))
        if tile is not None:
            tile.mks.add(int(row["mask_label"]))
    log.info(
        "%d accepted HSPCs in %d tiles (of %d labelled yes/no cells)",
        accepted.num_rows,
        len(tiles),
        len(merged),
    )
    return [tiles[key] for key in sorted(tiles)]


def pixel_sizes(cell_paths: Sequence[Path]) -> dict[str, float]:
    """µm per pixel of each slide, from its cells' areas in px and µm²."""

    sizes: dict[str, float] = {}
    for path in find_cell_tables(cell_paths, EMBEDDED_COLUMNS):
        table = pq.read_table(path, columns=["slide_id", "area_px", "area_um2"]).to_pandas()
        table = table[table["area_px"] > 0]
        ratio = np.sqrt(table["area_um2"] / table["area_px"])
        sizes.update(ratio.groupby(table["slide_id"]).median().to_dict())
    return sizes


def index_masks(batch_dirs: Sequence[Path]) -> dict[tuple[str, str], TileMasks]:
    """``{(slide, tile): TileMasks}`` over the masks.h5 of every batch folder given."""

    index: dict[tuple[str, str], TileMasks] = {}
    for folder in batch_dirs:
        path = folder / "masks.h5" if folder.is_dir() else folder
        if not path.is_file():
            raise BmsegError(f"--batches {folder}: no masks.h5; pass SEGMENT's batch folders")
        try:
            with h5py.File(path, "r") as masks:
                for slide_id, group in masks.items():
                    for tile_id, tile in group.items():
                        origin = (int(tile.attrs["read_x"]), int(tile.attrs["read_y"]))
                        index[(slide_id, tile_id)] = TileMasks(path, *origin)
        except (OSError, KeyError) as error:
            raise BmsegError(f"{path}: not a readable masks.h5 ({error}); rerun SEGMENT") from error
    return index


def read_labels(masks: TileMasks, slide_id: str, tile_id: str) -> np.ndarray:
    """The tile's label image from its masks.h5."""

    with h5py.File(masks.path, "r") as h5:
        return h5[f"{slide_id}/{tile_id}/labels"][...]


def check_masks(tiles: Sequence[TileCells], index: dict, batch_dirs: Sequence[Path]) -> None:
    """Every accepted cell's tile is in the batch outputs given."""
    for tile in tiles:
        if (tile.slide_id, tile.tile_id) not in index:
            uid = next(iter(tile.accepted.values()))
            raise BmsegError(
                f"--batches: accepted cell {uid} (tile {tile.slide_id}/{tile.tile_id}) has no "
                f"mask in the {len(batch_dirs)} masks.h5 given; pass every SEGMENT batch "
                "folder of the run the tables come from"
            )


def mask_out(rgb: np.ndarray, labels: np.ndarray, drop: np.ndarray) -> np.ndarray:
    """``rgb`` with the pixels of the labels in ``drop`` (bool per label value) inpainted from
    their surroundings (OpenCV's Telea method) over the masks grown by MASK_OUT_GROWTH_PX."""

    hidden = drop[labels]
    if not hidden.any():
        return rgb
    kernel = np.ones((2 * MASK_OUT_GROWTH_PX + 1,) * 2, np.uint8)
    grown = cv2.dilate(hidden.astype(np.uint8), kernel)
    return cv2.inpaint(np.ascontiguousarray(rgb), grown, 3, cv2.INPAINT_TELEA)


def tile_region(tile: TileCells, masks: TileMasks, slide, pixel_size_um: float):
    """The tile as a training region: SEGMENT's RGB with the unaccepted HSPCs masked out, the
    accepted HSPCs numbered 1..n, crops centred on them. Checks the slide against the table."""

    labels = read_labels(masks, tile.slide_id, tile.tile_id).astype(np.int64)
    height, width = labels.shape
    window = Rect(masks.read_x, masks.read_y, width, height)
    where = f"tile {tile.slide_id}/{tile.tile_id}"
    if window.intersection(slide.bounds) != window:
        raise BmsegError(
            f"{slide.path}: {where} reads {window.as_dict()} outside the slide "
            f"{slide.bounds.as_dict()}; pass the slide file the run segmented"
        )
    count = int(labels.max(initial=0))
    missing = [uid for label, uid in tile.accepted.items() if label > count]
    if missing or not np.isin(list(tile.accepted), labels).all():
        raise BmsegError(
            f"{masks.path}: accepted cell {(missing or list(tile.accepted.values()))[0]} has no "
            f"pixels in {where}'s label image; pass the batch folders of this very run"
        )
    drop = np.ones(count + 1, bool)
    drop[0] = False
    drop[list(tile.accepted)] = False
    drop[[m for m in tile.mks if m <= count]] = False
    pixels = slide.read(window.x, window.y, window.w, window.h)
    accepted = relabel(labels, list(tile.accepted), size=count + 1)
    check_pixels(tile, accepted, pixels, slide)
    rgb = mask_out(to_rgb8(pixels, slide.modality), labels, drop)
    cx, cy = cell_centroids(accepted, len(tile.accepted))
    return Region(rgb, accepted, np.column_stack([cx, cy]))


def check_pixels(tile: TileCells, accepted: np.ndarray, pixels: np.ndarray, slide) -> None:
    """The accepted cells' mean intensities in this slide file are the tables' (measured by
    SEGMENT on the same pixels): otherwise the file is not the slide the run segmented."""

    names = [channel.name for channel in slide.channels]
    measured = intensity_stats(accepted, pixels, names, len(tile.accepted))
    uids = list(tile.accepted.values())
    for column, values in measured.items():
        if not column.startswith(MEAN_PREFIX):
            continue
        if column not in tile.means:
            raise BmsegError(
                f"{slide.path}: channel column {column} is not in the tables; pass the slide "
                "file the run segmented"
            )
        expected = np.asarray(tile.means[column], np.float64)
        wrong = np.flatnonzero(np.abs(values - expected) > MEAN_TOLERANCE)
        if len(wrong):
            first = wrong[0]
            raise BmsegError(
                f"{slide.path}: cell {uids[first]} has {column} {expected[first]:.1f} in the "
                f"tables but {values[first]:.1f} in this file; pass the slide file the run "
                "segmented"
            )


def split_tiles(
    tiles: Sequence[TileCells], fraction: float, by: str, seed: int
) -> tuple[list[TileCells], list[TileCells]]:
    """Seeded split into training and validation tiles, by tile or by whole slides."""
    rng = np.random.default_rng(seed)
    groups = sorted({t.slide_id if by == "slide" else (t.slide_id, t.tile_id) for t in tiles})
    if len(groups) < 2:
        unit = "slides" if by == "slide" else "tiles with accepted HSPCs"
        raise BmsegError(
            f"--split {by}: {len(groups)} {unit}, at least 2 needed for a validation set; "
            "accept HSPCs in more tiles (or slides), or pass --split tile"
        )
    order = rng.permutation(len(groups))
    held = max(1, round(fraction * len(groups)))
    validation_groups = {groups[i] for i in order[:held]}
    key = (lambda t: t.slide_id) if by == "slide" else (lambda t: (t.slide_id, t.tile_id))
    train = [t for t in tiles if key(t) not in validation_groups]
    validation = [t for t in tiles if key(t) in validation_groups]
    return train, validation


def link_or_copy(source: Path, dest: Path) -> None:
    """Hard-link ``source`` (through symlinks) to ``dest``, or copy it across file systems."""
    try:
        os.link(source.resolve(), dest)
    except OSError:
        shutil.copy2(source, dest)


def finetune(
    cells: Path,
    labels: Sequence[Path],
    *,
    batches: Sequence[Path],
    slides: Sequence[str],
    models_dir: Path,
    out: Path,
    slide_ids: Sequence[str] | None = None,
    split: str = "tile",
    validation_fraction: float = 0.2,
    seed: int = 0,
    epochs: int = 100,
    images_per_epoch: int = 0,
    batch_size: int = 8,
    learning_rate: float = 1e-5,
    weight_decay: float = 0.1,
    device: str = "auto",
    progress: bool = True,
) -> Path:
    """FINETUNE: train ``models_dir``'s Cellpose-SAM on the HSPCs ``labels`` accept in the
    gathered ``cells``, their masks in the SEGMENT ``batches`` and the pixels of ``slides``
    (file names, or ``ID=PATH``, or named by ``slide_ids``); write and return the new models
    folder ``out`` (never ``models_dir`` itself). ``images_per_epoch`` 0 is every crop."""
    started = time.perf_counter()
    models_dir, out = Path(models_dir), Path(out)
    if out.resolve() == models_dir.resolve() or models_dir.resolve() in out.resolve().parents:
        raise BmsegError(f"--out {out}: is the input models folder {models_dir}; pass a new folder")
    if out.exists():
        raise BmsegError(f"--out {out}: exists; pass a new folder (finetune never overwrites)")
    if split not in FINETUNE_SPLITS:
        raise BmsegError(f"--split {split}: choose one of {', '.join(FINETUNE_SPLITS)}")
    if not 0.0 < validation_fraction < 1.0:
        raise BmsegError(f"--validation-fraction {validation_fraction}: must lie in (0, 1)")
    for flag, value in (("epochs", epochs), ("batch_size", batch_size)):
        if value < 1:
            raise BmsegError(f"--{flag.replace('_', '-')} {value}: must be ≥ 1")
    parent = read_manifest(models_dir)
    cellpose_path = weight_path(models_dir, parent.cellpose_checkpoint)
    others = [weight_path(models_dir, parent.sam2_checkpoint)]
    others.append(weight_path(models_dir, parent.resnet50_weights))
    cell_paths, label_paths = [Path(cells)], [Path(p) for p in labels]
    batch_dirs = [Path(p) for p in batches]
    tiles = accepted_tiles(cell_paths, label_paths)
    index = index_masks(batch_dirs)
    check_masks(tiles, index, batch_dirs)
    slide_paths = match_slides((t.slide_id for t in tiles), slides, slide_ids)
    sizes = pixel_sizes(cell_paths)
    torch_device = resolve_device(device)
    model = load_cellpose(cellpose_path, torch_device)

    train_tiles, validation_tiles = split_tiles(tiles, validation_fraction, split, seed)
    rng = np.random.default_rng(seed)
    images: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    validation = []
    opened = {}
    try:
        for slide_id, path in slide_paths.items():
            opened[slide_id] = open_slide(path, pixel_size_um=sizes[slide_id], slide_id=slide_id)
        held = {(t.slide_id, t.tile_id) for t in validation_tiles}
        for tile in tqdm(tiles, desc="finetune: read tiles", unit="tile", disable=not progress):
            key = (tile.slide_id, tile.tile_id)
            region = tile_region(tile, index[key], opened[tile.slide_id], sizes[tile.slide_id])
            if key in held:
                validation.append(region)
            else:
                crops = crops_around([region], TrainSettings.crop_px, rng)
                images += crops[0]
                targets += crops[1]
    finally:
        for slide in opened.values():
            slide.close()
    pixel_size = float(np.median(list(sizes.values())))
    accepted_train = sum(len(t.accepted) for t in train_tiles)
    accepted_val = sum(len(t.accepted) for t in validation_tiles)
    log.info(
        "training on %d accepted HSPCs in %d tiles, validating on %d in %d tiles",
        accepted_train,
        len(train_tiles),
        accepted_val,
        len(validation_tiles),
    )
    ap_before = validation_ap50(model, validation, pixel_size)
    log.info("validation AP@0.5 of %s: %.3f", cellpose_path, ap_before)
    settings = TrainSettings(
        epochs=epochs,
        images_per_epoch=images_per_epoch or len(images),
        batch_size=batch_size,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        seed=seed,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
    try:
        record = train_cellpose(
            model.net,
            images,
            targets,
            settings,
            work / FINETUNED_NAME,
            progress,
            desc="finetune Cellpose-SAM",
        )
        tuned = load_cellpose(work / FINETUNED_NAME, torch_device)
        ap_after = validation_ap50(tuned, validation, pixel_size)
        log.info("validation AP@0.5 fine-tuned: %.3f (was %.3f)", ap_after, ap_before)
        for source in others:
            link_or_copy(source, work / source.name)
        training = {
            "kind": "finetune",
            "parent": {
                "models": str(models_dir),
                "cellpose_checkpoint": parent.cellpose_checkpoint,
                "description": parent.description,
                "training": parent.training,
            },
            "data": {
                "cells": [str(p) for p in cell_paths],
                "labels": [str(p) for p in label_paths],
                "batches": [str(p) for p in batch_dirs],
                "slides": {s: str(p) for s, p in slide_paths.items()},
                "accepted_hspcs": {"train": accepted_train, "validation": accepted_val},
                "tiles": {"train": len(train_tiles), "validation": len(validation_tiles)},
                "split": split,
                "validation_fraction": validation_fraction,
            },
            "settings": settings.as_dict(),
            "device": str(torch_device),
            **record,
            "validation_ap50_before": round(ap_before, 4),
            "validation_ap50_after": round(ap_after, 4),
            "total_seconds": round(time.perf_counter() - started, 1),
        }
        description = (
            f"Cellpose-SAM fine-tuned by bmseg finetune on {accepted_train} accepted HSPCs from "
            f"{parent.cellpose_checkpoint} of {models_dir.name}"
        )
        if parent.description:
            description += f" (parent: {parent.description})"
        manifest = dataclasses.replace(
            parent,
            cellpose_checkpoint=FINETUNED_NAME,
            description=description,
            training=training,
        )
        write_manifest(manifest, work)
        work.replace(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log.info("wrote %s: validation AP@0.5 %.3f → %.3f", out, ap_before, ap_after)
    return out
