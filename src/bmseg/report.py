"""REPORT: one self-contained HTML page a lab lead reads after a run.

It looks through the result directories it is given (gathered, classified, classifiers; any
depth) and shows: the per-slide summary, density and size plots, the tissue QC pictures,
classifier metrics when present, per-stage timings and devices from the batch records, and
package versions. Images are inlined as base64 PNG, so the page is one file; every piece of
user text (slide names, paths, metadata) is HTML-escaped.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
from PIL import Image

from bmseg import __version__
from bmseg.cell_tables import CELL_TABLES_GLOB
from bmseg.contract import (
    BATCHES_RECORD,
    CELL_TYPES,
    GATHER_RECORD,
    METRICS_FILE,
    SLIDE_RECORD_SUFFIX,
    SUMMARY_FILE,
    TISSUE_PICTURE_SUFFIX,
    accepted_column,
    accepted_density_column,
    area_quantile_column,
    count_column,
    density_column,
    slide_file,
)
from bmseg.errors import BmsegError, reading
from bmseg.html_page import CSP, esc, img_tag
from bmseg.metrics_html import label_summary_html, metrics_tables
from bmseg.storage import write_bytes
from bmseg.summaries import area_histogram_png, density_plot_png
from bmseg.tissue_picture import PICTURE_COLOURS
from bmseg.versions import package_versions

log = logging.getLogger(__name__)

THUMBNAIL_PX = 540
"""Width of the tissue QC pictures on the page: wide enough for their outlines to read."""
BATCHES_SHOWN_OPEN = 20
"""Longer per-batch tables start folded."""
STYLE = """
body{font-family:system-ui,-apple-system,sans-serif;max-width:1180px;margin:1.5em auto;
color:#1f2328;padding:0 1.2em;line-height:1.45}
h1{margin-bottom:.1em}h2{border-bottom:2px solid #e5e7eb;padding-bottom:.25em;margin-top:1.8em}
.muted{color:#667085;font-size:.92em}
.cards{display:flex;flex-wrap:wrap;gap:.8em;margin:1em 0}
.card{border:1px solid #e5e7eb;border-radius:8px;padding:.6em 1em;min-width:9em;background:#fafafa}
.card b{display:block;font-size:1.5em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.9em}
td,th{border:1px solid #d0d7de;padding:4px 9px;text-align:right;white-space:nowrap}
th{background:#f3f4f6;white-space:normal;text-align:center}td:first-child,th:first-child,td.text{text-align:left}
tr:nth-child(even) td{background:#fbfbfc}
.scroll{overflow-x:auto}
.PASS{color:#fff;background:#2e7d32;padding:1px 8px;border-radius:4px;font-size:.85em}
.FAIL{color:#fff;background:#c62828;padding:1px 8px;border-radius:4px;font-size:.85em}
img{max-width:100%}
.gallery{display:flex;flex-wrap:wrap;gap:1em}
.gallery figure{margin:0;border:1px solid #e5e7eb;border-radius:6px;padding:.4em;
background:#fff}
.gallery figcaption{font-size:.85em;color:#444;margin-top:.3em}
code{background:#f3f4f6;padding:0 .25em;border-radius:3px}
.warning{background:#fff4e5;border:1px solid #f0b429;border-radius:6px;padding:.6em 1em}
"""


def _thumbnail(path: Path) -> bytes:
    """The QC picture scaled down to at most THUMBNAIL_PX wide, as PNG bytes."""
    with Image.open(path) as image:
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX * 4))
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _find(roots: Sequence[Path], pattern: str) -> list[Path]:
    """Files matching ``pattern`` anywhere under ``roots``, in a stable order."""
    found: dict[Path, None] = {}
    for root in roots:
        for path in sorted(root.rglob(pattern)):
            if path.is_file() and not path.name.startswith("."):
                found[path] = None
    return list(found)


def _load_summary(roots: Sequence[Path]) -> tuple[pd.DataFrame, Path]:
    """The run's summary: a classified one (with accepted counts) wins over the gathered one."""
    paths = _find(roots, SUMMARY_FILE)
    if not paths:
        raise BmsegError(
            f"{roots[0]}: no summary.csv found; pass the directories gather (and classify) wrote"
        )
    frames = []
    for path in paths:
        with reading(path, "re-run bmseg gather or classify, which write it"):
            frames.append((pd.read_csv(path, dtype={"slide_id": str}), path))
    frames.sort(key=lambda item: any(accepted_column(t) in item[0] for t in CELL_TYPES))
    return frames[-1]


def _cell_areas(roots: Sequence[Path]) -> pd.DataFrame | None:
    """Cell type and area of every gathered cell (two columns only), or None without tables."""
    tables = _find(roots, CELL_TABLES_GLOB)
    by_name = {p.name: p for p in tables}
    if not by_name:
        return None
    frames = []
    for path in by_name.values():
        with reading(path, "re-run bmseg gather, which writes it"):
            frames.append(pq.read_table(path, columns=["cell_type", "area_um2"]).to_pandas())
    return pd.concat(frames, ignore_index=True)


def _summary_section(summary: pd.DataFrame) -> str:
    """Headline cards and the per-slide table."""
    cards = [("slides", f"{len(summary)}")]
    if "segmented_tissue_mm2" in summary:
        cards.append(("mm² tissue segmented", f"{summary['segmented_tissue_mm2'].sum():,.2f}"))
    for cell_type in CELL_TYPES:
        count, accepted = count_column(cell_type), accepted_column(cell_type)
        if count in summary:
            cards.append((f"{cell_type} detected", f"{int(summary[count].sum()):,}"))
        if accepted in summary:
            cards.append((f"{cell_type} accepted", f"{int(summary[accepted].sum()):,}"))
    if "duplicates_removed" in summary:
        cards.append(("seam duplicates removed", f"{int(summary['duplicates_removed'].sum()):,}"))
    card_html = "".join(f"<div class='card'><b>{esc(v)}</b>{esc(k)}</div>" for k, v in cards)

    groups: list[tuple[str, list[tuple[str, str, str]]]] = [
        (
            "",
            [
                ("slide_id", "slide", "{}"),
                ("tissue_area_mm2", "tissue mm²", "{:.2f}"),
                ("tiles_segmented", "tiles", "{:.0f}"),
                ("segmented_tissue_mm2", "segmented mm²", "{:.2f}"),
            ],
        )
    ]
    for cell_type in CELL_TYPES:
        groups.append(
            (
                cell_type,
                [
                    (count_column(cell_type), "cells", "{:,.0f}"),
                    (density_column(cell_type), "/mm²", "{:.1f}"),
                    (accepted_column(cell_type), "accepted", "{:,.0f}"),
                    (accepted_density_column(cell_type), "accepted /mm²", "{:.1f}"),
                    (area_quantile_column(cell_type, 50), "median µm²", "{:.0f}"),
                ],
            )
        )
    groups = [(g, [c for c in cols if c[0] in summary]) for g, cols in groups]
    columns = [c for _, cols in groups for c in cols]
    group_head = "".join(f"<th colspan='{len(cols)}'>{esc(g)}</th>" for g, cols in groups if cols)
    head = "".join(f"<th>{esc(title)}</th>" for _, title, _ in columns)
    rows = []
    for _, record in summary.iterrows():
        cells = []
        for name, _, fmt in columns:
            value = record[name]
            text = "–" if _is_missing(value) else fmt.format(value)
            cells.append(f"<td>{esc(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f"<div class='cards'>{card_html}</div>"
        f"<div class='scroll'><table><tr>{group_head}</tr><tr>{head}</tr>{''.join(rows)}"
        "</table></div>"
        "<p class='muted'>Densities are per mm² of the tissue in the tiles that were segmented; "
        "all columns, size quantiles included, are in summary.csv.</p>"
    )


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def _plots_section(summary: pd.DataFrame, areas: pd.DataFrame | None) -> str:
    counts = [summary[count_column(t)].sum() for t in CELL_TYPES if count_column(t) in summary]
    if counts and not any(counts):
        return "<p class='muted'>No cells were detected, so there is nothing to plot.</p>"
    parts = [img_tag(density_plot_png(summary), "density per slide")]
    if areas is not None:
        parts.append(img_tag(area_histogram_png(areas), "area histograms"))
    return "".join(f"<p>{p}</p>" for p in parts)


def _tissue_section(roots: Sequence[Path], slides: Sequence[str]) -> str:
    figures = []
    for slide in slides:
        pictures = _find(roots, slide_file(slide, TISSUE_PICTURE_SUFFIX))
        records = _find(roots, slide_file(slide, SLIDE_RECORD_SUFFIX))
        caption = esc(slide)
        if records:
            record = json.loads(records[0].read_text(encoding="utf-8"))
            area = float(record.get("tissue_area_mm2", 0))
            caption += (
                f"<br>{esc(record.get('source', ''))} · {area:.2f} mm² tissue · "
                f"{esc(record.get('pixel_size_um', ''))} µm/px · "
                f"{esc(record.get('tiles_kept', '?'))}/{esc(record.get('tiles_total', '?'))} "
                "tiles kept"
            )
            if record.get("modality") in PICTURE_COLOURS:  # the picture's legend, legible here
                outline, kept = PICTURE_COLOURS[record["modality"]][3:]
                caption += f"<br>{outline}: tissue outline · {kept}: kept tile cores"
        image = img_tag(_thumbnail(pictures[0]), f"tissue of {slide}") if pictures else "(none)"
        figures.append(f"<figure>{image}<figcaption>{caption}</figcaption></figure>")
    return f"<div class='gallery'>{''.join(figures)}</div>"


def _classifier_section(roots: Sequence[Path]) -> str:
    paths = _find(roots, METRICS_FILE)
    if not paths:
        return "<p class='muted'>No classifiers were trained in this run.</p>"
    parts = []
    for path in paths:
        with reading(path, "re-run bmseg train, which writes it"):
            metrics = json.loads(path.read_text(encoding="utf-8"))
            criteria = ", ".join(
                f"{esc(k)} ≥ {float(v):.2f}" for k, v in metrics["acceptance"].items()
            )
            parts.append(
                f"<p class='muted'>{esc(path.parent.name)}: {int(metrics['folds'])}-fold "
                f"stratified cross-validation; acceptance {criteria}.</p>"
            )
            parts += [metrics_tables(t, entry) for t, entry in metrics["cell_types"].items()]
            parts.append("<h3>Labels</h3>" + label_summary_html(metrics["labels"]))
    return "".join(parts)


def _timing_section(roots: Sequence[Path]) -> tuple[str, list[dict]]:
    """Per-stage seconds summed over batches, devices, and a per-batch table."""
    records = []
    for path in _find(roots, BATCHES_RECORD):
        with reading(path, "re-run bmseg gather, which writes it"):
            found = json.loads(path.read_text(encoding="utf-8"))["batches"]
            for record in found:  # the fields the tables below use, of the types they need
                float(record["wall_s"])
                [float(s) for s in dict(record.get("timings_s", {})).values()]
                [int(n) for n in dict(record.get("cells", {})).values()]
                len(list(record.get("tiles", [])))
            records += found
    if not records:
        return "<p class='muted'>No batch records found.</p>", []
    stages: dict[str, float] = {}
    for record in records:
        for stage, seconds in record.get("timings_s", {}).items():
            stages[stage] = stages.get(stage, 0.0) + float(seconds)
    tiles = sum(len(r.get("tiles", [])) for r in records)
    total = sum(stages.values())
    stage_rows = "".join(
        f"<tr><td>{esc(stage)}</td><td>{seconds:,.1f}</td>"
        f"<td>{100 * seconds / total if total else 0:.0f} %</td>"
        f"<td>{seconds / tiles if tiles else 0:.2f}</td></tr>"
        for stage, seconds in sorted(stages.items(), key=lambda item: -item[1])
    )
    models = [_models_summary(r.get("models")) for r in records]
    per_batch_models = len(set(models)) > 1  # a column only when batches differ
    batch_rows = "".join(
        f"<tr><td>{esc(r.get('batch', '?'))}</td><td class='text'>{esc(r.get('device', '?'))}"
        f"</td><td>{len(r.get('tiles', []))}</td>"
        f"<td>{sum(r.get('cells', {}).values()):,}</td>"
        f"<td>{r['wall_s']:,.1f}</td>"
        + (f"<td class='text'>{esc(summary)}</td>" if per_batch_models else "")
        + "</tr>"
        for r, summary in zip(records, models, strict=True)
    )
    devices = sorted({str(r.get("device", "?")) for r in records})
    models_line = "" if per_batch_models else f" Models: {esc(models[0])}."
    batch_table = (
        "<div class='scroll'><table><tr><th>batch</th><th>device</th><th>tiles</th><th>cells</th>"
        f"<th>wall s</th>{'<th>models</th>' if per_batch_models else ''}</tr>{batch_rows}"
        "</table></div>"
    )
    if len(records) > BATCHES_SHOWN_OPEN:
        batch_table = f"<details><summary>per batch</summary>{batch_table}</details>"
    return (
        f"<p>{len(records)} batches, {tiles:,} tiles, devices: {esc(', '.join(devices))}."
        f"{models_line}</p>"
        "<p class='muted'>Stages overlap (readers and workers run beside the device), so "
        "their seconds add up to more than a batch's wall time.</p>"
        "<table><tr><th>stage</th><th>seconds (all batches)</th><th>share</th>"
        f"<th>s per tile</th></tr>{stage_rows}</table>"
        f"{batch_table}<p class='muted'>Every model setting of a batch is in its batch.json.</p>",
        records,
    )


def _models_summary(models: object) -> str:
    """The models a batch ran, in one line: MK, HSPC and embedder weights and the models folder.

    ``models`` is the ``models`` object of batch.json (docs/data.md); its settings stay in the
    file.
    """
    manifest = models.get("manifest") if isinstance(models, dict) else None
    if not isinstance(manifest, dict):
        return "–"
    hspc = models.get("hspc") if isinstance(models.get("hspc"), dict) else {}
    parts = [
        f"MK {Path(str(manifest.get('sam2_checkpoint', '?'))).stem}",
        f"HSPC {manifest.get('cellpose_checkpoint', '?')}"
        + (" + SAM2" if hspc.get("refine") else ""),
        f"embedder {Path(str(manifest.get('resnet50_weights', '?'))).stem}",
        f"from {Path(str(models.get('dir', '?'))).name}/",
    ]
    if manifest.get("random_init"):
        parts.append("random-initialised test weights")
    return " · ".join(parts)


def _versions_section(roots: Sequence[Path], batches: list[dict]) -> str:
    """Package versions of this report, the gather step and the SEGMENT batches."""
    columns: dict[str, dict[str, str]] = {"report": package_versions()}
    for path in _find(roots, GATHER_RECORD):
        columns["gather"] = json.loads(path.read_text(encoding="utf-8")).get("versions", {})
    segment: dict[str, set[str]] = {}
    for record in batches:
        for name, version in record.get("versions", {}).items():
            segment.setdefault(name, set()).add(str(version))
    if segment:
        columns["segment"] = {k: " / ".join(sorted(v)) for k, v in segment.items()}
    names = list(dict.fromkeys(n for versions in columns.values() for n in versions))
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    rows = "".join(
        f"<tr><td>{esc(n)}</td>"
        + "".join(f"<td>{esc(v.get(n, '–'))}</td>" for v in columns.values())
        + "</tr>"
        for n in names
    )
    return f"<table><tr><th>package</th>{head}</tr>{rows}</table>"


def _test_weights_warning(batches: list[dict]) -> str:
    """A banner when any batch ran random-initialised test checkpoints: its cells mean nothing."""
    test_batches = [
        r.get("batch", "?")
        for r in batches
        if isinstance(r.get("models"), dict)
        and isinstance(r["models"].get("manifest"), dict)
        and r["models"]["manifest"].get("random_init")
    ]
    if not test_batches:
        return ""
    return (
        f"<p class='warning'>{len(test_batches)} of {len(batches)} batches ran "
        "random-initialised test checkpoints (<code>bmseg models make-test</code>): they test "
        "the pipeline but cannot find real cells. Segment with the real weights "
        "(<code>bmseg models fetch</code>) for results.</p>"
    )


def build_report(roots: Sequence[Path]) -> str:
    """The whole page as HTML text."""
    summary, summary_path = _load_summary(roots)
    areas = _cell_areas(roots)
    timing_html, batches = _timing_section(roots)
    slides = summary["slide_id"].astype(str).tolist()
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sources = ", ".join(f"<code>{esc(r)}</code>" for r in roots)
    return (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'>{CSP}"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>bmseg run report</title><style>{STYLE}</style></head><body>"
        "<h1>bmseg run report</h1>"
        f"<p class='muted'>bmseg {esc(__version__)} · generated {generated} · from {sources} "
        f"(summary: <code>{esc(summary_path.parent.name)}/{esc(summary_path.name)}</code>)</p>"
        f"{_test_weights_warning(batches)}"
        f"<h2>Slides</h2>{_summary_section(summary)}"
        f"<h2>Density and size</h2>{_plots_section(summary, areas)}"
        f"<h2>Tissue QC</h2>{_tissue_section(roots, slides)}"
        f"<h2>Classifiers</h2>{_classifier_section(roots)}"
        f"<h2>Timings and devices</h2>{timing_html}"
        f"<h2>Package versions</h2>{_versions_section(roots, batches)}"
        "</body></html>"
    )


def report(results: Sequence[Path], out: Path) -> Path:
    """``bmseg report``: check the result directories exist, then write the page atomically.

    ``results`` are the run's result directories (gathered, classified, classifiers), searched
    at any depth; ``out`` is the one HTML file written. Returns ``out``.
    """
    for root in results:
        if not root.is_dir():
            raise BmsegError(f"{root}: no such directory; pass the run's result directories")
    page = build_report(results)
    write_bytes(page.encode("utf-8"), out)
    log.info("wrote the run report (%d kB) to %s", len(page) // 1024, out)
    return out
