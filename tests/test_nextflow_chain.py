"""The -profile test DAG run end to end outside Nextflow, by the modules' own command lines.

Each step runs as Nextflow would run it: in its own task folder, its inputs linked in under
their staged names, its command line rendered from the module's script and conf/modules.config
under the test profile's params (plain ``${name}`` substitution, tests/nextflow_text.py).
Afterwards every output the module declares must exist, no temporary file may be left, and no
input may have changed (what -resume relies on). Which task's outputs each step is given is
checked against the wiring read from main.nf and workflows/bmseg.nf (``workflow_dag``): a step
fed from a process the workflow does not connect to it fails, and so does an edit of the
workflow that the runner does not follow. The chain runs on a brightfield and a fluorescence
synthetic slide with random test checkpoints (``bmseg models make-test``, not the test profile's
``make-demo``, whose training takes most of an hour on two cores: so SEGMENT may find few or no
cells; the wiring is what is tested).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest

from nextflow_text import PathList, staged_names, strip_comments, workflow_dag
from test_nextflow import (
    WORKFLOW_FILES,
    bmseg_commands,
    declared_outputs,
    processes,
    profile_params,
    read,
    render_script,
    stage_pattern,
    workflow_calls,
)

# A smaller run than -profile test itself, to stay quick on two CPU cores: 2000-px slides in
# 1000-px tiles, half of them sampled, one tile per batch (so GATHER joins several SEGMENT
# tasks).
CHAIN_PARAMS = {
    "synth_size": 2000,
    "tile_size": 1000,
    "sample_fraction": 0.5,
    "batch_size": 1,
    "mk_points_per_side": 4,
}

# The test profile's slides as main.nf's SYNTH call makes them (checked against its text below).
SYNTH_SLIDES = [("synth1", 1, "brightfield"), ("synth2", 2, "fluorescence")]


def workflow_bodies(texts: list[str] | None = None) -> list[str]:
    """The workflow blocks of main.nf and workflows/bmseg.nf (comments removed), in run order."""
    texts = texts or [read(path) for path in WORKFLOW_FILES]
    bodies = []
    for text in texts:
        text = strip_comments(text)
        bodies.append(text[re.search(r"^workflow\b", text, re.MULTILINE).start() :])
    return bodies


def workflow_wiring(texts: list[str] | None = None) -> dict[str, set[str]]:
    """Each process the workflows call and the processes whose outputs its call takes."""
    return workflow_dag(workflow_bodies(texts), set(processes()))


def workflow_call_order() -> list[str]:
    """Processes in the order main.nf and workflows/bmseg.nf call them."""
    known = processes()
    return [name for name in re.findall(r"\b([A-Z]+)\(", workflow_calls()) if name in known]


class TaskRunner:
    """Runs processes like Nextflow's local executor: one folder per task, inputs linked in.

    It records which earlier task made each staged input (``fed``), and refuses an input from
    a process the workflow text does not wire into this one.
    """

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch, **params: Any) -> None:
        self.root = root
        self.monkeypatch = monkeypatch
        self.params = {**profile_params("test"), **CHAIN_PARAMS, **params}
        self.count = 0
        self.wiring = workflow_wiring()
        self.tasks: list[tuple[str, Path]] = []
        self.fed: dict[str, set[str]] = {}

    def producer(self, source: Path) -> str | None:
        """The process whose task folder holds ``source``, None for a file from outside."""
        resolved = source.resolve()
        for name, task_dir in self.tasks:
            if resolved == task_dir or task_dir in resolved.parents:
                return name
        return None

    def run(self, name: str, inputs: dict[str, Any], staged: dict[str, Path]) -> Path:
        """Run process ``name``; ``staged`` maps staged names in the task folder to real files."""
        from bmseg.cli import main

        producers = {self.producer(source) for source in staged.values()} - {None}
        unwired = producers - self.wiring[name]
        assert not unwired, f"{name} is fed by {sorted(unwired)}, which the workflow does not wire"
        self.fed.setdefault(name, set()).update(producers)
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
        self.tasks.append((name, task_dir.resolve()))
        return task_dir

    def check_wiring_is_the_workflows(self) -> None:
        """Every process that ran was fed by all the processes the workflow wires into it
        (those that ran), in an order the workflow's calls allow."""
        ran = {name for name, _ in self.tasks}
        for name, fed in self.fed.items():
            assert fed == self.wiring[name] & ran, (
                f"{name} was fed by {sorted(fed)}; the workflow wires {sorted(self.wiring[name])}"
            )
        order = workflow_call_order()
        first_runs = list(dict.fromkeys(name for name, _ in self.tasks))
        assert first_runs == [name for name in order if name in ran], "runs out of workflow order"

    @staticmethod
    def check_outputs(name: str, inputs: dict[str, Any], task_dir: Path) -> None:
        """Every non-optional output the module declares (but versions.yml) was written."""
        for pattern, optional in declared_outputs(name, inputs):
            if not optional:
                assert list(task_dir.glob(pattern)), f"{name} declares {pattern}, did not write it"


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
        "DEMOMODELS",
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


def test_wiring_is_read_from_the_workflow_text() -> None:
    """The wiring the runner checks against is the workflow's: rewiring GATHER from PLAN's
    records to the bare slides changes it, so the chain tests would fail on such an edit."""
    wiring = workflow_wiring()
    assert wiring["GATHER"] == {"SEGMENT", "PLAN"}
    assert wiring["SEGMENT"] == {"BATCH", "PLAN", "SYNTH", "DEMOMODELS"}
    assert wiring["PLAN"] == {"SYNTH", "CALIBRATE"}
    texts = [read(path) for path in WORKFLOW_FILES]
    assert "GATHER(ch_batch_outputs, ch_plans)" in texts[1]
    texts[1] = texts[1].replace(
        "GATHER(ch_batch_outputs, ch_plans)", "GATHER(ch_batch_outputs, ch_slides)"
    )
    assert workflow_wiring(texts)["GATHER"] == {"SEGMENT", "SYNTH"}


def test_test_profile_makes_both_modalities() -> None:
    """main.nf's SYNTH call gives odd slides brightfield and even ones fluorescence, and
    -profile test makes two: the SYNTH_SLIDES the chain runs."""
    main = strip_comments(read(WORKFLOW_FILES[0]))
    call = re.search(r"SYNTH\(channel\.of\(1\.\.n_synth\)\.map \{ i -> (.*?) \}\)", main)
    assert (
        call and call.group(1) == "[\"synth${i}\", i, i % 2 == 1 ? 'brightfield' : 'fluorescence']"
    )
    count = profile_params("test")["synth_slides"]
    expected = [
        (f"synth{i}", i, "brightfield" if i % 2 else "fluorescence") for i in range(1, count + 1)
    ]
    assert expected == SYNTH_SLIDES


@pytest.mark.slow
def test_test_profile_chain_runs_end_to_end(tmp_path: Path, monkeypatch) -> None:
    """A brightfield and a fluorescence slide: CALIBRATE per modality, each PLAN with its
    modality's calibration, BATCH over both, SEGMENT per batch, one GATHER of both."""
    from bmseg.cli import main

    runner = TaskRunner(tmp_path, monkeypatch)
    slides, modality_of = {}, {}
    for slide_id, seed, modality in SYNTH_SLIDES:
        inputs = {"slide_id": slide_id, "seed": seed, "modality": modality}
        slides[slide_id] = runner.run("SYNTH", inputs, {}) / f"{slide_id}.czi"
        modality_of[slide_id] = modality
    # The test profile's DEMOMODELS trains for most of an hour: random test checkpoints here.
    models = tmp_path / "test_models"
    assert main(["models", "make-test", "--dest", str(models)]) == 0

    assert runner.params["tissue_calibration"], "-profile test calibrates tissue per modality"
    calibrations = {}
    for modality in sorted(set(modality_of.values())):
        group = sorted(s for s, m in modality_of.items() if m == modality)
        names, staged = stage_all("CALIBRATE", "slides", [slides[s] for s in group])
        inputs = {
            "modality": modality,
            "pixel_sizes": ",".join(["null"] * len(group)),
            "slides": names,
        }
        task = runner.run("CALIBRATE", inputs, staged)
        calibrations[modality] = task / f"{modality}.tissue_calibration.json"
        assert json.loads(calibrations[modality].read_text(encoding="utf-8"))["threshold"] > 0
    assert len(calibrations) == 2, "one calibration per modality"

    plan_files: dict[str, list[Path]] = {}
    for slide_id, slide in slides.items():
        calibration = calibrations[modality_of[slide_id]]
        meta = {"id": slide_id, "pixel_size_um": None, "modality": modality_of[slide_id]}
        inputs = {"meta": meta, "slide": slide.name, "calibration": calibration.name}
        plan = runner.run("PLAN", inputs, {slide.name: slide, calibration.name: calibration})
        # What PLAN emits (its declared outputs), not the slide staged beside them.
        plan_files[slide_id] = [plan / path for path, _ in declared_outputs("PLAN", inputs)]
        record = json.loads((plan / f"{slide_id}.slide.json").read_text(encoding="utf-8"))
        assert record["modality"] == modality_of[slide_id], "PLAN read the slide as its modality"
    by_name = {path.name: path for files in plan_files.values() for path in files}

    tables = [by_name[f"{slide_id}.tiles.parquet"] for slide_id in slides]
    tiles, staged = stage_all("BATCH", "tiles", tables)
    batches = sorted((runner.run("BATCH", {"tiles": tiles}, staged) / "batches").glob("*.parquet"))
    assert len(batches) >= 2, "the chain should exercise several SEGMENT tasks"

    batch_dirs, batch_slides = [], set()
    for batch in batches:
        # The workflow stages the slides BATCH lists for this batch, by id, ids comma-joined.
        slide_ids = json.loads(batch.with_suffix(".slides.json").read_text(encoding="utf-8"))
        batch_slides.update(slide_ids)
        slide_names, staged = stage_all("SEGMENT", "slides", [slides[s] for s in slide_ids])
        plan_list = [by_name[f"{s}.slide.json"] for s in slide_ids]
        plans, plan_staged = stage_all("SEGMENT", "plans", plan_list)
        inputs = {
            "batch_id": batch.stem,
            "batch": batch.name,
            "slide_ids": ",".join(slide_ids),
            "slides": slide_names,
            "plans": plans,
            "models": "models",
        }
        staged |= plan_staged | {batch.name: batch, "models": models}
        batch_dirs.append(runner.run("SEGMENT", inputs, staged) / batch.stem)
    assert batch_slides == set(slides), "the sampled batches read both slides"

    all_plans = sorted(by_name.values(), key=lambda path: path.name)
    batch_names, staged = stage_all("GATHER", "batch_dirs", batch_dirs)
    plan_names, plan_staged = stage_all("GATHER", "plans", all_plans)
    gather = runner.run(
        "GATHER", {"batch_dirs": batch_names, "plans": plan_names}, staged | plan_staged
    )
    gathered = gather / "gathered"
    summary = (gathered / "summary.csv").read_text(encoding="utf-8").splitlines()
    assert len(summary) == 3, "one summary row per slide, both modalities in one GATHER"
    assert {row.split(",")[0] for row in summary[1:]} == set(slides)

    # No labels in -profile test: TRAIN and CLASSIFY do not run, PAGES gets no ranking, and
    # runs only when GATHER kept cells (the workflow filters on gather.json's cells_kept).
    cells_kept = json.loads((gathered / "gather.json").read_text(encoding="utf-8"))["cells_kept"]
    if cells_kept:
        site = runner.run("PAGES", {"cells": "gathered", "ranking": []}, {"gathered": gathered})
        assert (site / "site" / "index.html").is_file()
    else:
        assert main(["pages", str(gathered), "--out", str(tmp_path / "site")]) == 2, (
            "bmseg pages refuses a run without cells: that is why the workflow skips PAGES"
        )

    results, staged = stage_all("REPORT", "results", [gathered, *batch_dirs])
    report = runner.run("REPORT", {"results": results}, staged) / "report.html"
    text = report.read_text(encoding="utf-8")
    assert "synth1" in text and "synth2" in text

    record = json.loads((batch_dirs[0] / "batch.json").read_text(encoding="utf-8"))
    assert record, "SEGMENT's batch record is written last, so it marks a finished batch"
    runner.check_wiring_is_the_workflows()


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
    runner.check_wiring_is_the_workflows()


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
    inputs = {"modality": "brightfield", "pixel_sizes": "0.25,0.5", "slides": names}
    task = runner.run("CALIBRATE", inputs, staged)
    calibration_file = task / "brightfield.tissue_calibration.json"
    calibration = json.loads(calibration_file.read_text(encoding="utf-8"))
    assert calibration["threshold"] > 0
    from bmseg.cli import main

    out = tmp_path / "other.json"
    wrong = ["--slide-pixel-size-um", "elsewhere.tif=0.25"]
    assert main(["calibrate-tissue", str(slides[0]), *wrong, "--out", str(out)]) == 2
    assert not out.exists()
