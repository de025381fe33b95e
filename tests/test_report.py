"""The run report: one self-contained page, user text escaped, read in a real browser."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from bmseg.cli import main
from bmseg.testing.cells import random_cells, write_batch, write_plan

HOSTILE = "<script>alert('x')</script>&amp;"


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """Gathered, classifiers and classified outputs of two slides, under a hostile folder name."""
    root = tmp_path_factory.mktemp("report") / "run <i>one</i>"
    rng = np.random.default_rng(2)
    signal = (rng.random(300) < 0.5).astype(float)
    tables = {
        "alpha": random_cells(300, slide_id="alpha", signal=signal, embedding_dim=32, seed=1),
        "beta": random_cells(120, slide_id="beta", embedding_dim=32, seed=2),
    }
    write_batch(root / "b0", [tables["alpha"]], device="cuda:0 (test GPU)")
    write_batch(root / "b1", [tables["beta"]], batch=1)
    write_plan(root / "plans", "alpha", tissue_area_mm2=4.0)
    write_plan(root / "plans", "beta", tissue_area_mm2=2.5)
    record = json.loads((root / "plans" / "beta.slide.json").read_text())
    (root / "plans" / "beta.slide.json").write_text(json.dumps(dict(record, source=HOSTILE)))
    results = root / "results"
    gathered = results / "gathered"
    dirs = [str(root / "b0"), str(root / "b1")]
    assert main(["gather", *dirs, "--plans", str(root / "plans"), "--out", str(gathered)]) == 0
    alpha = tables["alpha"]
    hspc = [i for i, t in enumerate(alpha["cell_type"].to_pylist()) if t == "HSPC"][:80]
    labels = {
        "version": 1,
        "labels": [
            {
                "cell_uid": alpha["cell_uid"][i].as_py(),
                "label": "yes" if signal[i] else "no",
                "annotator": "a",
                "time": "2026-01-01T00:00:00Z",
            }
            for i in hspc
        ],
    }
    (root / "labels.json").write_text(json.dumps(labels))
    flags = ["--pca-components", "3", "--folds", "3"]
    models = results / "classifiers"
    assert (
        main(["train", str(gathered), str(root / "labels.json"), "--out", str(models), *flags]) == 0
    )
    classify = ["classify", str(gathered), "--classifiers", str(models)]
    assert main([*classify, "--out", str(results / "classified")]) == 0
    assert main(["report", str(results), "--out", str(root / "report.html")]) == 0
    return root


def test_page_is_self_contained_and_escapes_user_text(results):
    page = (results / "report.html").read_text(encoding="utf-8")
    assert HOSTILE not in page and "<i>one</i>" not in page
    assert html_escaped(HOSTILE) in page
    assert "<script" not in page.lower()
    assert 'src="http' not in page and "<link" not in page
    # summary from the classified tables (accepted counts), metrics, timings and devices
    assert "HSPC accepted" in page and "cuda:0 (test GPU)" in page
    assert "random_forest" in page and "hist_gradient_boosting" in page


def html_escaped(text: str) -> str:
    import html

    return html.escape(text)


def test_missing_results_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r.html")])
    assert code == 2 and "no summary.csv found" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


@pytest.mark.browser
def test_browser_shows_every_image_and_the_summary_numbers(results):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium is not installed")
    sync_api = pytest.importorskip("playwright.sync_api")
    import pandas as pd

    summary = pd.read_csv(results / "results" / "classified" / "summary.csv").set_index("slide_id")
    requests = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page()
        page.on("request", lambda r: requests.append(r.url))
        page.goto((results / "report.html").as_uri())
        images = page.eval_on_selector_all(
            "img", "els => els.map(e => [e.complete, e.naturalWidth, e.alt])"
        )
        rows = page.eval_on_selector_all(
            "table:first-of-type tr",
            "rows => rows.map(r => Array.from(r.cells).map(c => c.textContent))",
        )
        text = page.inner_text("body")
        browser.close()
    assert all(url.startswith(("file:", "data:")) for url in requests)
    alts = [alt for _, _, alt in images]
    assert all(complete and width > 0 for complete, width, _ in images)
    assert {"density per slide", "area histograms", "tissue of alpha", "tissue of beta"} <= set(
        alts
    )
    assert HOSTILE in text  # shown as text, not run
    by_slide = {row[0]: row for row in rows if row and row[0] in summary.index}
    for slide in ("alpha", "beta"):
        assert f"{summary.loc[slide, 'MK_count']:,}" in by_slide[slide]
        assert f"{summary.loc[slide, 'HSPC_accepted']:,}" in by_slide[slide]


def test_models_are_one_line_of_names_and_test_weights_are_flagged(results, tmp_path):
    """SEGMENT's models record (manifest and every setting) is summarised, not dumped."""
    from dataclasses import asdict

    from bmseg.models.layout import Manifest

    copy = tmp_path / "results"
    shutil.copytree(results / "results", copy)
    record_path = copy / "gathered" / "batches.json"
    record = json.loads(record_path.read_text(encoding="utf-8"))
    manifest = asdict(Manifest(sam2_checkpoint="sam2.1_hiera_tiny_random.pt", random_init=True))
    models = {
        "dir": "some/where/test_models",
        "manifest": manifest,
        "mk": {"points_per_side": 8, "stability_score_thresh": 0.95},
        "hspc": {"refine": True, "flow_threshold": 0.4},
        "embedder": {"crop_size": 224, "batch_size": 128},
    }
    for batch in record["batches"]:
        batch["models"] = models
    record_path.write_text(json.dumps(record), encoding="utf-8")
    assert main(["report", str(copy), "--out", str(tmp_path / "report.html")]) == 0
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    summary = (
        "MK sam2.1_hiera_tiny_random · HSPC cpsam + SAM2 · embedder resnet50 · from test_models/"
    )
    assert page.count(summary) == 1  # once above the table: every batch ran the same models
    assert "stability_score_thresh" not in page and "flow_threshold" not in page
    assert f"{len(record['batches'])} of {len(record['batches'])} batches ran" in page
    assert "random-initialised test checkpoints" not in (results / "report.html").read_text()


def _with_metrics(results: Path, tmp_path: Path, change) -> tuple[Path, Path]:
    """A copy of the run's results whose classifiers/metrics.json ``change`` edited in place."""
    copy = tmp_path / "results"
    shutil.copytree(results / "results", copy)
    path = copy / "classifiers" / "metrics.json"
    metrics = json.loads(path.read_text())
    change(metrics["cell_types"]["HSPC"])
    path.write_text(json.dumps(metrics))
    return copy, path


def test_fields_of_metrics_json_cannot_put_script_in_the_page(results, tmp_path):
    def hostile(entry: dict) -> None:
        entry["status"] = "PASS'><script>alert(1)</script>"
        entry["model"] = HOSTILE
        chosen = entry["candidates"][entry["chosen"]]
        chosen["status"] = "<img src=x onerror=alert(2)>"
        entry["candidates"] = {HOSTILE: chosen}
        entry["chosen"] = HOSTILE

    copy, _ = _with_metrics(results, tmp_path, hostile)
    assert main(["report", str(copy), "--out", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "<script" not in page.lower() and "<img src=x" not in page
    assert "Content-Security-Policy" in page and "script-src" not in page  # default-src 'none'
    training = (results / "results" / "classifiers" / "report.html").read_text(encoding="utf-8")
    assert "Content-Security-Policy" in training


def test_a_metrics_json_with_fields_of_the_wrong_type_is_one_line(results, tmp_path, capsys):
    def wrong(entry: dict) -> None:
        entry["counts"]["yes"] = "<img src=x onerror=alert(1)>"

    copy, path = _with_metrics(results, tmp_path, wrong)
    assert main(["report", str(copy), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r.html").exists()
    path.write_text("[" * 100000)
    assert main(["report", str(copy), "--out", str(tmp_path / "r.html")]) == 2
    assert str(path) in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["summary.csv", "cells"])
def test_a_damaged_result_file_is_one_line_naming_it(results, tmp_path, capsys, damage):
    copy = tmp_path / "results"
    shutil.copytree(results / "results", copy)
    if damage == "summary.csv":
        victim = copy / "gathered" / "summary.csv"
        victim.write_bytes(b'slide_id,"unclosed\n' + bytes(range(256)))
    else:
        victim = sorted((copy / "gathered").glob("*.cells.parquet"))[0]
        victim.write_bytes(victim.read_bytes()[:300])
    for other in copy.rglob(victim.name):
        if other != victim:
            other.unlink()
    assert main(["report", str(copy), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err.strip()
    assert victim.name in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "r.html").exists()
