"""The -profile test DAG run end to end outside Nextflow, by the modules' own command lines.

Each step runs as Nextflow would run it: in its own task folder, its inputs linked in under
their staged names, its command line rendered from the module's script and conf/modules.config
under the test profile's params. Afterwards every output the module declares must exist, no
temporary file may be left, and no input may have changed (what -resume relies on). The
steps run in the order workflows/bmseg.nf calls them, on a synthetic slide with random
test checkpoints (so SEGMENT may find few or no cells; the wiring is what is tested).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest

from nextflow_text import PathList, evaluate, sections, staged_names
from test_nextflow import (
    bmseg_commands,
    processes,
    profile_params,
    render_script,
    stage_pattern,
    workflow_calls,
)

# A smaller run than -profile test itself, to stay quick on two CPU cores: one 2000-px slide
# in 1000-px tiles, half of them sampled, one tile per batch (so GATHER joins several SEGMENT
# tasks).
CHAIN_PARAMS = {
    "synth_size": 2000,
    "tile_size": 1000,
    "sample_fraction": 0.5,
    "batch_size": 1,
    "mk_points_per_side": 4,
}


def workflow_call_order() -> list[str]:
    """Processes in the order main.nf and workflows/bmseg.nf call them."""
    known = processes()
    return [name for name in re.findall(r"\b([A-Z]+)\(", workflow_calls()) if name in known]


class TaskRunner:
    """Runs processes like Nextflow's local executor: one folder per task, inputs linked in."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch, **params: Any) -> None:
        self.root = root
        self.monkeypatch = monkeypatch
        self.params = {**profile_params("test"), **CHAIN_PARAMS, **params}
        self.count = 0

    def run(self, name: str, inputs: dict[str, Any], staged: dict[str, Path]) -> Path:
        """Run process ``name``; ``staged`` maps staged names in the task folder to real files."""
        from bmseg.cli import main

        self.count += 1
        task_dir = self.root / f"{self.count:02d}_{name.lower()}"
        task_dir.mkdir()
        for staged_name, source in staged.items():
            link = task_dir / staged_name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(source.resolve())
        script = render_script(name, self.params, inputs=inputs)
        before = fingerprint(staged.values())
        self.monkeypatch.chdir(task_dir)
        for argv in bmseg_commands(script):
            if argv[1] == "versions":
                continue
            assert main(argv[1:]) == 0, f"{name}: {' '.join(argv)} failed"
        self.check_outputs(name, inputs, task_dir)
        assert fingerprint(staged.values()) == before, f"{name} changed one of its inputs"
        leftovers = [p.name for p in task_dir.rglob("*") if ".tmp" in p.name]
        assert not leftovers, f"{name} left temporary files {leftovers}"
        return task_dir

    @staticmethod
    def check_outputs(name: str, inputs: dict[str, Any], task_dir: Path) -> None:
        """Every non-optional output the module declares (but versions.yml) was written."""
        output = sections(processes()[name][1])["output"]
        for line in output.splitlines():
            match = re.search(r"path\s*\(?\s*(\"[^\"]*\"|'[^']*')", line)
            if not match or "optional: true" in line or "versions.yml" in match.group(1):
                continue
            pattern = evaluate(match.group(1), dict(inputs))
            assert list(task_dir.glob(pattern)), f"{name} declares {pattern} but did not write it"


def fingerprint(sources: Any) -> dict[str, str]:
    """SHA-256 of every file in ``sources`` (files or folders, searched recursively)."""
    digests = {}
    for source in sources:
        files = [source] if source.is_file() else sorted(source.rglob("*"))
        for path in files:
            if path.is_file():
                digests[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def stage_all(process: str, variable: str, files: list[Path]) -> tuple[PathList, dict[str, Path]]:
    """Files staged as the module's ``stageAs`` pattern for input ``variable`` names them."""
    names = PathList(staged_names(stage_pattern(process, variable), [f.name for f in files]))
    return names, dict(zip(names, files, strict=True))


def test_chain_follows_the_workflow_order() -> None:
    assert workflow_call_order() == [
        "SYNTH",
        "TESTMODELS",
        "CALIBRATE",
        "PLAN",
        "BATCH",
        "SEGMENT",
        "GATHER",
        "TRAIN",
        "FINETUNE",
        "CLASSIFY",
        "PAGES",
        "REPORT",
    ]


@pytest.mark.slow
def test_test_profile_chain_runs_end_to_end(tmp_path: Path, monkeypatch) -> None:
    runner = TaskRunner(tmp_path, monkeypatch)

    synth = runner.run("SYNTH", {"slide_id": "synth1", "seed": 1}, {})
    slide = synth / "synth1.czi"
    models = runner.run("TESTMODELS", {}, {}) / "models"

    assert runner.params["tissue_calibration"], "-profile test calibrates tissue across slides"
    slides, staged = stage_all("CALIBRATE", "slides", [slide])
    inputs = {"pixel_sizes": [None], "slides": slides}
    calibration = runner.run("CALIBRATE", inputs, staged) / "tissue_calibration.json"

    meta = {"id": "synth1", "pixel_size_um": None, "modality": None}
    inputs = {"meta": meta, "slide": "synth1.czi", "calibration": "tissue_calibration.json"}
    staged = {"synth1.czi": slide, "tissue_calibration.json": calibration}
    plan = runner.run("PLAN", inputs, staged)
    plan_files = sorted(plan.glob("synth1.*"))

    tiles, staged = stage_all("BATCH", "tiles", [plan / "synth1.tiles.parquet"])
    batches = sorted((runner.run("BATCH", {"tiles": tiles}, staged) / "batches").glob("*.parquet"))
    assert len(batches) >= 2, "the chain should exercise several SEGMENT tasks"

    batch_dirs = []
    for batch in batches:
        # The workflow stages the slides BATCH lists for this batch, by id.
        slide_ids = json.loads(batch.with_suffix(".slides.json").read_text(encoding="utf-8"))
        assert slide_ids == ["synth1"]
        slides, staged = stage_all("SEGMENT", "slides", [slide])
        plans, plan_staged = stage_all("SEGMENT", "plans", [plan / "synth1.slide.json"])
        inputs = {
            "batch_id": batch.stem,
            "batch": batch.name,
            "slide_ids": slide_ids,
            "slides": slides,
            "plans": plans,
            "models": "models",
        }
        staged |= plan_staged | {batch.name: batch, "models": models}
        batch_dirs.append(runner.run("SEGMENT", inputs, staged) / batch.stem)

    batch_names, staged = stage_all("GATHER", "batch_dirs", batch_dirs)
    plan_names, plan_staged = stage_all("GATHER", "plans", plan_files)
    gather = runner.run(
        "GATHER", {"batch_dirs": batch_names, "plans": plan_names}, staged | plan_staged
    )
    gathered = gather / "gathered"
    summary = (gathered / "summary.csv").read_text(encoding="utf-8").splitlines()
    assert len(summary) == 2 and "synth1" in summary[1], "one summary row for the one slide"

    # No labels in -profile test: TRAIN and CLASSIFY do not run, PAGES gets no ranking, and
    # runs only when GATHER kept cells (the workflow filters on gather.json's cells_kept).
    cells_kept = json.loads((gathered / "gather.json").read_text(encoding="utf-8"))["cells_kept"]
    if cells_kept:
        site = runner.run("PAGES", {"cells": "gathered", "ranking": []}, {"gathered": gathered})
        assert (site / "site" / "index.html").is_file()
    else:
        from bmseg.cli import main

        assert main(["pages", str(gathered), "--out", str(tmp_path / "site")]) == 2, (
            "bmseg pages refuses a run without cells: that is why the workflow skips PAGES"
        )

    results, staged = stage_all("REPORT", "results", [gathered, *batch_dirs])
    report = runner.run("REPORT", {"results": results}, staged) / "report.html"
    assert "synth1" in report.read_text(encoding="utf-8")

    record = json.loads((batch_dirs[0] / "batch.json").read_text(encoding="utf-8"))
    assert record, "SEGMENT's batch record is written last, so it marks a finished batch"


def fake_segment_outputs(root: Path) -> tuple[list[Path], list[Path]]:
    """Two SEGMENT batch folders and PLAN's files for one slide, cells carrying a signal.

    Random-initialised checkpoints find no cells, so the labelled half of the DAG starts from
    cell tables in SEGMENT's exact schema (bmseg.testing.cells): half the cells carry a signal
    in their features that a classifier can learn, and the labels say which.
    """
    import numpy as np
    import pyarrow.compute as pc

    from bmseg.testing.cells import random_cells, write_batch, write_plan

    signal = (np.random.default_rng(5).random(400) < 0.5).astype(float)
    table = random_cells(
        400, slide_id="synth1", width_px=6000, height_px=6000, signal=signal, seed=5
    )
    left = pc.less(table["centroid_x_px"], 3000)
    batch_dirs = [
        write_batch(root / "batch_0000", [table.filter(left)], batch=0),
        write_batch(root / "batch_0001", [table.filter(pc.invert(left))], batch=1),
    ]
    plans = root / "plans"
    write_plan(plans, "synth1", tissue_area_mm2=1.0, bounds=(0, 0, 6000, 6000), tiles_kept=4)
    labels = [
        {
            "cell_uid": uid,
            "label": "yes" if flag else "no",
            "annotator": "test",
            "time": "2026-11-21T12:00:00Z",
        }
        for uid, flag in zip(table["cell_uid"].to_pylist(), signal, strict=True)
    ]
    label_file = root / "labels.json"
    label_file.write_text(json.dumps({"version": 1, "labels": labels}), encoding="utf-8")
    return batch_dirs, [*sorted(plans.iterdir()), label_file]


@pytest.mark.slow
def test_labelled_run_trains_classifies_and_ranks(tmp_path: Path, monkeypatch) -> None:
    """Given labels: GATHER -> TRAIN -> CLASSIFY -> PAGES (uncertainty order) -> REPORT."""
    batch_dirs, (*plan_files, label_file) = fake_segment_outputs(tmp_path / "inputs")
    runner = TaskRunner(tmp_path, monkeypatch, page_order="uncertainty")

    batch_names, staged = stage_all("GATHER", "batch_dirs", batch_dirs)
    plan_names, plan_staged = stage_all("GATHER", "plans", plan_files)
    gathered = (
        runner.run("GATHER", {"batch_dirs": batch_names, "plans": plan_names}, staged | plan_staged)
        / "gathered"
    )

    label_names, label_staged = stage_all("TRAIN", "labels", [label_file])
    classifiers = (
        runner.run(
            "TRAIN",
            {"cells": "gathered", "labels": label_names},
            label_staged | {"gathered": gathered},
        )
        / "classifiers"
    )

    metrics = json.loads((classifiers / "metrics.json").read_text(encoding="utf-8"))
    assert metrics, "TRAIN writes the cross-validated metrics the report and tower.yml show"

    inputs = {"cells": "gathered", "classifiers": "classifiers", "labels": label_names}
    staged = label_staged | {"gathered": gathered, "classifiers": classifiers}
    classified = runner.run("CLASSIFY", inputs, staged) / "classified"
    assert (classified / "ranking.parquet").is_file()

    inputs = {"cells": "gathered", "ranking": "ranking.parquet"}
    staged = {"gathered": gathered, "ranking.parquet": classified / "ranking.parquet"}
    site = runner.run("PAGES", inputs, staged) / "site"
    assert (site / "index.html").is_file()

    results, staged = stage_all(
        "REPORT", "results", [gathered, classifiers, classified, *batch_dirs]
    )
    report = runner.run("REPORT", {"results": results}, staged) / "report.html"
    assert "synth1" in report.read_text(encoding="utf-8")


def bare_tiff(path: Path, seed: int) -> Path:
    """An RGB brightfield TIFF without resolution tags: its pixel size must come from outside."""
    import numpy as np
    import tifffile

    rng = np.random.default_rng(seed)
    image = np.full((1200, 1200, 3), 240, np.uint8)
    image[300:900, 250:950] = rng.integers(90, 160, (600, 700, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, image, photometric="rgb")
    return path


def test_calibration_uses_each_slides_own_pixel_size(tmp_path: Path, monkeypatch) -> None:
    """--tissue_calibration on two same-named slides without metadata pixel sizes.

    The samplesheet gives each its pixel size; CALIBRATE must get them (not only the global
    --pixel_size_um, null here) and stage the two files apart.
    """
    runner = TaskRunner(tmp_path, monkeypatch, pixel_size_um=None)
    slides = [
        bare_tiff(tmp_path / "run1" / "slide.tif", 1),
        bare_tiff(tmp_path / "run2" / "slide.tif", 2),
    ]
    names, staged = stage_all("CALIBRATE", "slides", slides)
    task = runner.run("CALIBRATE", {"pixel_sizes": [0.25, 0.5], "slides": names}, staged)
    calibration = json.loads((task / "tissue_calibration.json").read_text(encoding="utf-8"))
    assert calibration["threshold"] > 0
    from bmseg.cli import main

    out = tmp_path / "other.json"
    wrong = ["--slide-pixel-size-um", "elsewhere.tif=0.25"]
    assert main(["calibrate-tissue", str(slides[0]), *wrong, "--out", str(out)]) == 2
    assert not out.exists()
