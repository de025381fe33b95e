"""README.md's "Step by step" is a script: its bash blocks run as written in an empty folder.

The blocks are taken from README.md itself, so the README and the code cannot drift apart: a
renamed flag, a missing output or a step that stops breaks this test. The only thing the
walk-through leaves to its reader, labelling cells in the galleries, is done here by writing
``labels.json`` (the file the galleries' Export gives) before the block that trains.

One line is not run as written: ``bmseg models make-demo --dest models`` trains for minutes,
so the test copies in the session's demo folder instead, which the ``demo_models_dir`` fixture
made with the same function and seed (and caches by code version); the line itself is checked
word for word, and ``make-demo`` has its own tests.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from qupath_geojson import read_like_qupath

README = Path(__file__).resolve().parents[1] / "README.md"
SLIDES = ("slide1", "slide2")  # brightfield, fluorescence


def step_by_step_blocks(text: str) -> list[str]:
    """The ```bash blocks of the "## Step by step" section, in order."""
    section = text.split("\n## Step by step\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)


def bmseg_commands(blocks: list[str]) -> list[str]:
    """Each ``bmseg`` command run (continuation lines joined, comments dropped), in order."""
    script = "\n".join(blocks).replace("\\\n", " ")
    lines = (line.split("#", 1)[0].strip() for line in script.splitlines())
    return [re.sub(r"\s+", " ", line) for line in lines if line.startswith("bmseg ")]


def test_the_walk_through_runs_the_whole_chain_in_order():
    """synth → plan → batch → models → segment (every batch) → gather → report → pages →
    train → classify → pages by uncertainty, on a brightfield and a fluorescence slide."""
    blocks = step_by_step_blocks(README.read_text(encoding="utf-8"))
    commands = bmseg_commands(blocks)
    steps = [" ".join(c.split()[1:3]) if c.startswith("bmseg models") else c.split()[1]
             for c in commands]  # fmt: skip
    assert steps == [
        "synth", "synth", "plan", "plan", "batch", "models make-demo", "segment", "gather",
        "report", "pages", "train", "classify", "pages",
    ]  # fmt: skip
    assert "--modality fluorescence" in commands[1] and "--modality" not in commands[0]
    segment_block = next(b for b in blocks if "bmseg segment" in b)
    assert re.search(r"^for batch in batches/batch_\*\.parquet; do\b", segment_block, re.M)
    assert "labels.json" in commands[10] and "--order uncertainty" in commands[12]


def found_hspcs(folder: Path) -> int:
    """How many HSPCs the walk-through's gathered tables hold."""
    gathered = folder / "results" / "gathered"
    tables = [pq.read_table(gathered / f"{s}.cells.parquet", columns=["cell_type"]) for s in SLIDES]
    return sum(t["cell_type"].to_pylist().count("HSPC") for t in tables)


def write_labels(folder: Path) -> Path:
    """``labels.json`` as an annotator's export: HSPCs larger than the median are "yes"."""
    columns = ["cell_uid", "cell_type", "area_um2"]
    gathered = folder / "results" / "gathered"
    tables = [pq.read_table(gathered / f"{s}.cells.parquet", columns=columns) for s in SLIDES]
    uids, areas = [], []
    for table in tables:
        hspc = table.filter(np.array(table["cell_type"].to_pylist()) == "HSPC")
        uids += hspc["cell_uid"].to_pylist()
        areas += hspc["area_um2"].to_pylist()
    yes = np.array(areas) >= np.median(areas)
    assert min(yes.sum(), (~yes).sum()) >= 10, f"only {len(uids)} HSPCs found to label"
    labels = [
        {"cell_uid": uid, "label": "yes" if is_yes else "no", "annotator": "reader",
         "time": "2026-12-01T10:00:00Z"}
        for uid, is_yes in zip(uids, yes, strict=True)
    ]  # fmt: skip
    path = folder / "labels.json"
    path.write_text(json.dumps({"version": 1, "labels": labels}), encoding="utf-8")
    return path


MAKE_DEMO = "bmseg models make-demo --dest models"


@pytest.mark.slow
def test_readme_step_by_step_runs_as_written_in_an_empty_folder(tmp_path, demo_models_dir):
    blocks = step_by_step_blocks(README.read_text(encoding="utf-8"))
    (models_block,) = [b for b in blocks if MAKE_DEMO in b]
    assert [c for c in bmseg_commands([models_block])] == [MAKE_DEMO]
    blocks = [b.replace(MAKE_DEMO, f'cp -r "{demo_models_dir}" models') for b in blocks]
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for block in blocks:
        if "bmseg train" in block:
            assert found_hspcs(tmp_path) >= 20, "too few HSPCs found to label 10 yes and 10 no"
            write_labels(tmp_path)
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, f"README block failed:\n{block}\n{done.stderr[-4000:]}"
        assert "Traceback" not in done.stderr, done.stderr[-4000:]

    gathered = tmp_path / "results" / "gathered"
    schemas = [pq.read_schema(gathered / f"{s}.cells.parquet") for s in SLIDES]
    assert schemas[0] == schemas[1]  # brightfield and fluorescence in one schema
    brightfield, fluorescence = (pq.read_table(gathered / f"{s}.cells.parquet") for s in SLIDES)
    for table, own, other in ((brightfield, "R", "DAPI"), (fluorescence, "DAPI", "R")):
        hspc = table.filter(np.array(table["cell_type"].to_pylist()) == "HSPC")
        assert hspc.num_rows > 0, "the demo model finds the HSPCs of both slides"
        assert hspc[f"intensity_mean_{own}"].null_count == 0
        assert hspc[f"intensity_mean_{other}"].null_count == hspc.num_rows

    metrics = json.loads((tmp_path / "results" / "classifiers" / "metrics.json").read_text())
    assert set(metrics["cell_types"]) == {"HSPC"}
    classified = tmp_path / "results" / "classified"
    for slide in SLIDES:
        objects = read_like_qupath(classified / f"{slide}.cells.geojson")
        table = pq.read_table(classified / f"{slide}.cells.parquet")
        assert len(objects) == table.num_rows
        assert {o.class_name for o in objects} <= {"HSPC", "rejected", "MK"}
        assert all("hspc_probability" in o.measurements for o in objects)
    ranking = pq.read_table(classified / "ranking.parquet")
    labels = json.loads((tmp_path / "labels.json").read_text())["labels"]
    labelled = {label["cell_uid"] for label in labels}
    assert not labelled & set(ranking["cell_uid"].to_pylist())
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "report.html").read_text(encoding="utf-8").count("slide2") > 0
