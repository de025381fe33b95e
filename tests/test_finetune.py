"""`bmseg finetune`: Cellpose-SAM trained on the HSPCs a lab accepted, from a gathered run.

The run is real: a synthetic CZI planned, batched, segmented through SEGMENT's own
``segment_batch`` (with segmenters that return the planted cells, so the masks in masks.h5 and
the cell tables are exactly the planted ones) and gathered by ``bmseg gather``; labels accept
most HSPCs and reject or leave out the rest.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from bmseg.cli import main as cli_main
from bmseg.models.base import Detections
from bmseg.segment import (
    SegmentOptions,
    hspc_windows,
    read_batch_table,
    segment_batch,
)
from bmseg.slide import Rect
from bmseg.slide_args import match_slides
from bmseg.synth import SyntheticLayout, truth_labels, write_synthetic_slide

RUN_SIDE = 3000
RUN_SEED = 31


def run_cli(*args) -> int:
    return cli_main(["-q", *map(str, args)])


class PlantedSegmenter:
    """Returns the planted cells of one type in each tile, in the order SEGMENT asks."""

    def __init__(self, layout: SyntheticLayout, cell_type: str, windows: list[Rect]) -> None:
        self.layout, self.cell_type, self._windows = layout, cell_type, iter(windows)

    def segment(self, tiles, pixel_size_um: float) -> list[Detections]:
        found = []
        for _ in tiles:
            labels = truth_labels(self.layout, next(self._windows), self.cell_type)
            count = int(labels.max(initial=0))
            found.append(Detections(labels=labels, scores=np.ones(count, np.float32)))
        return found


class MeanEmbedder:
    """The crop's mean R, G, B as a 3-d embedding."""

    dim = 3
    crop_size = 16

    def embed(self, crops: np.ndarray) -> np.ndarray:
        return crops.reshape(len(crops), -1, 3).mean(axis=1).astype(np.float32)


def write_labels(path: Path, decisions: dict[str, str]) -> Path:
    labels = [
        {"cell_uid": uid, "label": label, "annotator": "lab", "time": "2026-12-01T10:00:00Z"}
        for uid, label in decisions.items()
    ]
    path.write_text(json.dumps({"version": 1, "labels": labels}))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A gathered synthetic brightfield run (several batches) and labels: 80 % of HSPCs yes,
    10 % no, 10 % unsure; unlabelled MKs."""
    return gathered_run(tmp_path_factory.mktemp("finetune_run"), "brightfield")


@pytest.fixture(scope="module")
def fluorescence_run(tmp_path_factory) -> dict:
    """The same run on a fluorescence slide. The demo segments brightfield HSPCs about as well
    as its size allows (AP@0.5 0.93 on an unseen layout) and fluorescence ones less well (0.70),
    so fine-tuning has room to show there."""
    return gathered_run(tmp_path_factory.mktemp("finetune_fluorescence_run"), "fluorescence")


def gathered_run(work: Path, modality: str) -> dict:
    """Plan, batch, segment (planted cells) and gather one synthetic slide; write labels."""
    slide = work / "marrow.czi"
    write_synthetic_slide(slide, RUN_SIDE, RUN_SIDE, seed=RUN_SEED, modality=modality)
    layout = SyntheticLayout(RUN_SIDE, RUN_SIDE, RUN_SEED, modality)
    assert run_cli("plan", slide, "--tile-size", "1000", "--out", work / "plans") == 0
    tables = sorted((work / "plans").glob("*.tiles.parquet"))
    assert run_cli("batch", *tables, "--batch-size", "3", "--out", work / "batches") == 0
    batch_dirs = []
    for batch_path in sorted((work / "batches").glob("batch_*.parquet")):
        number, tiles = read_batch_table(batch_path)
        windows = [t.read for t in tiles]
        out = work / batch_path.stem
        segment_batch(
            tiles,
            match_slides([t.slide_id for t in tiles], [str(slide)]),
            PlantedSegmenter(layout, "MK", windows),
            PlantedSegmenter(
                layout, "HSPC", hspc_windows(tiles, SegmentOptions().hspc_max_area_um2)
            ),
            MeanEmbedder(),
            out,
            SegmentOptions(progress=False),
            {"batch": number, "device": "cpu"},
        )
        batch_dirs.append(out)
    assert len(batch_dirs) >= 2
    gathered = work / "gathered"
    assert run_cli("gather", *batch_dirs, "--plans", work / "plans", "--out", gathered) == 0
    cells = pq.read_table(next(gathered.glob("*.cells.parquet"))).to_pandas()
    hspcs = sorted(cells.loc[cells["cell_type"] == "HSPC", "cell_uid"])
    assert len(hspcs) >= 30
    rng = np.random.default_rng(0)
    draws = rng.uniform(size=len(hspcs))
    decisions = {
        uid: "yes" if d < 0.8 else "no" if d < 0.9 else "unsure"
        for uid, d in zip(hspcs, draws, strict=True)
    }
    labels = write_labels(work / "labels.json", decisions)
    return {
        "slide": slide,
        "batches": batch_dirs,
        "gathered": gathered,
        "labels": labels,
        "decisions": decisions,
        "cells": cells,
        "work": work,
    }


def finetune_args(run: dict, models: Path, out: Path, *extra) -> list:
    return [
        "finetune",
        run["gathered"],
        run["labels"],
        "--batches",
        *run["batches"],
        "--slides",
        run["slide"],
        "--models",
        models,
        "--out",
        out,
        "--device",
        "cpu",
        "--no-progress",
        *extra,
    ]


@pytest.mark.timeout(3600)  # may build the demo folder, then trains
def test_finetune_improves_validation_ap_and_writes_a_models_folder(
    fluorescence_run: dict, demo_models_dir: Path, tmp_path: Path
):
    run = fluorescence_run
    out = tmp_path / "tuned"
    extra = ["--epochs", "15", "--images-per-epoch", "8", "--learning-rate", "5e-4"]
    extra += ["--validation-fraction", "0.4"]
    assert run_cli(*finetune_args(run, demo_models_dir, out, *extra)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    parent = json.loads((demo_models_dir / "manifest.json").read_text())
    training = manifest["training"]
    assert manifest["cellpose_checkpoint"] == "cpsam_finetuned"
    assert training["kind"] == "finetune"
    assert training["parent"]["cellpose_checkpoint"] == parent["cellpose_checkpoint"]
    accepted = sum(v == "yes" for v in run["decisions"].values())
    assert sum(training["data"]["accepted_hspcs"].values()) == accepted
    assert training["settings"]["epochs"] == 15
    assert training["validation_ap50_after"] > training["validation_ap50_before"]
    for name in (manifest["sam2_checkpoint"], manifest["resnet50_weights"]):
        assert (out / name).read_bytes() == (demo_models_dir / name).read_bytes()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            manifest["sam2_checkpoint"],
            manifest["resnet50_weights"],
            "cpsam_finetuned",
            "manifest.json",
        ]
    )
    assert [p.name for p in tmp_path.iterdir()] == ["tuned"]  # no temporary folder left


def test_unaccepted_hspcs_are_masked_out_of_the_tile(run: dict):
    """Accepted HSPCs become the targets; rejected, unsure and unlabelled ones vanish from the
    image (inpainted with tissue) and the targets; MKs stay as pixels and background."""
    from bmseg.finetune import accepted_tiles, index_masks, pixel_sizes, read_labels, tile_region
    from bmseg.slide import open_slide

    tiles = accepted_tiles([run["gathered"]], [run["labels"]])
    index = index_masks(run["batches"])
    cells = run["cells"]
    tile = max(tiles, key=lambda t: len(t.accepted))
    key = (tile.slide_id, tile.tile_id)
    masks = index[key]
    labels = read_labels(masks, *key)
    with open_slide(run["slide"], pixel_size_um=pixel_sizes([run["gathered"]])[tile.slide_id]) as s:
        region = tile_region(tile, masks, s, s.pixel_size_um)
        original = s.read(masks.read_x, masks.read_y, labels.shape[1], labels.shape[0])
    in_tile = cells[(cells["slide_id"] == tile.slide_id) & (cells["tile_id"] == tile.tile_id)]
    accepted = set(tile.accepted)
    assert region.labels.max() == len(accepted)
    assert np.array_equal(region.labels > 0, np.isin(labels, list(accepted)))
    hidden = in_tile[(in_tile["cell_type"] == "HSPC") & ~in_tile["mask_label"].isin(accepted)]
    assert len(hidden) >= 1
    hspc_colour = original[np.isin(labels, list(accepted))].mean(axis=0)
    for label in hidden["mask_label"]:
        inpainted = region.rgb[labels == label].astype(float).mean(axis=0)
        was = original[labels == label].astype(float).mean(axis=0)
        assert np.abs(was - hspc_colour).max() < 30  # it was drawn as an HSPC
        assert inpainted.sum() > was.sum() + 150  # now light like the tissue around it
    mk_labels = in_tile.loc[in_tile["cell_type"] == "MK", "mask_label"]
    mk_pixels = np.isin(labels, list(mk_labels))
    if mk_pixels.any():
        assert np.array_equal(region.rgb[mk_pixels], original[mk_pixels])


def test_no_accepted_hspc_is_one_line_and_writes_nothing(run, test_models_dir, tmp_path, capsys):
    no_labels = write_labels(tmp_path / "no.json", dict.fromkeys(run["decisions"], "no"))
    args = finetune_args({**run, "labels": no_labels}, test_models_dir, tmp_path / "out")
    assert run_cli(*args) == 2
    assert "labelled yes" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no.json"]


def test_masks_missing_from_the_batches_given(run, test_models_dir, tmp_path, capsys):
    args = finetune_args({**run, "batches": run["batches"][:1]}, test_models_dir, tmp_path / "o")
    assert run_cli(*args) == 2
    err = capsys.readouterr().err
    assert "has no mask" in err and "--batches" in err
    assert not list(tmp_path.iterdir())


def test_a_slide_that_does_not_match_the_tables(run, test_models_dir, tmp_path, capsys):
    other = tmp_path / "other" / run["slide"].name
    other.parent.mkdir()
    write_synthetic_slide(other, RUN_SIDE, RUN_SIDE, seed=RUN_SEED + 1)
    args = finetune_args({**run, "slide": other}, test_models_dir, tmp_path / "out")
    assert run_cli(*args) == 2
    err = capsys.readouterr().err
    assert "pass the slide file the run segmented" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_models_folder_without_cellpose_sam(run, test_models_dir, tmp_path, capsys):
    models = tmp_path / "models"
    shutil.copytree(test_models_dir, models)
    manifest = json.loads((models / "manifest.json").read_text())
    (models / manifest["cellpose_checkpoint"]).unlink()
    assert run_cli(*finetune_args(run, models, tmp_path / "out")) == 2
    assert "model weights missing" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_refuses_to_overwrite_its_input_or_an_existing_folder(run, test_models_dir, capsys):
    assert run_cli(*finetune_args(run, test_models_dir, test_models_dir)) == 2
    assert "input models folder" in capsys.readouterr().err
    assert run_cli(*finetune_args(run, test_models_dir, run["gathered"])) == 2
    assert "exists" in capsys.readouterr().err
