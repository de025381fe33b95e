"""The run summary: per-slide counts and densities (``summary.csv``) and its two plots.

GATHER writes it from the gathered cells, CLASSIFY again with the accepted counts; REPORT
draws the same plots from either. Densities are per mm² of the tissue in the tiles that were
segmented, so a run that segmented part of a slide is not diluted by the rest.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from bmseg.contract import (
    AREA_HISTOGRAMS_PLOT,
    AREA_QUANTILES,
    CELL_TYPES,
    DENSITY_PLOT,
    SUMMARY_FILE,
    accepted_column,
    accepted_density_column,
    area_quantile_column,
    count_column,
    density_column,
    label_column,
)
from bmseg.html_page import png_bytes
from bmseg.qupath import TYPE_COLOURS
from bmseg.storage import atomic_path, write_bytes


def summarise(cells: pd.DataFrame, tissue: pd.DataFrame) -> pd.DataFrame:
    """One row per slide: tissue, counts, densities per mm² of segmented tissue, size quantiles.

    ``cells`` needs ``slide_id``, ``cell_type``, ``area_um2`` and optionally classifier
    ``{type}_label`` columns (then accepted counts and densities are added); ``tissue`` is
    indexed by slide and holds ``segmented_tissue_mm2`` and any other per-slide columns to keep.
    """
    summary = tissue.copy()
    for cell_type in CELL_TYPES:
        of_type = cells[cells["cell_type"] == cell_type]
        grouped = of_type.groupby("slide_id")
        count = grouped.size().reindex(summary.index, fill_value=0)
        summary[count_column(cell_type)] = count
        summary[density_column(cell_type)] = count / summary["segmented_tissue_mm2"]
        label = label_column(cell_type)
        if label in of_type:
            accepted = of_type[of_type[label].fillna(False).astype(bool)]
            accepted_count = accepted.groupby("slide_id").size()
            accepted_count = accepted_count.reindex(summary.index, fill_value=0)
            summary[accepted_column(cell_type)] = accepted_count
            summary[accepted_density_column(cell_type)] = (
                accepted_count / summary["segmented_tissue_mm2"]
            )
        for q in AREA_QUANTILES:
            summary[area_quantile_column(cell_type, q)] = grouped["area_um2"].quantile(q / 100)
    return summary.reset_index()


def write_summary(summary: pd.DataFrame, cells: pd.DataFrame, out: Path) -> None:
    """``summary.csv``, the density plot and the area histograms, into ``out``."""
    with atomic_path(out / SUMMARY_FILE) as tmp:
        summary.to_csv(tmp, index=False, float_format="%.6g")
    write_bytes(density_plot_png(summary), out / DENSITY_PLOT)
    write_bytes(area_histogram_png(cells), out / AREA_HISTOGRAMS_PLOT)


def density_plot_png(summary: pd.DataFrame) -> bytes:
    """Bar chart of cells per mm² of segmented tissue, per slide and cell type."""
    slides = summary["slide_id"].astype(str).tolist()
    fig = Figure(figsize=(5 * len(CELL_TYPES), 0.35 * len(slides) + 1.8))
    axes = fig.subplots(1, len(CELL_TYPES))
    for axis, cell_type in zip(axes, CELL_TYPES, strict=True):
        positions = np.arange(len(slides))
        colour = np.array(TYPE_COLOURS[cell_type]) / 255
        axis.barh(
            positions, summary[density_column(cell_type)], color=colour, alpha=0.35,
            label="detected",
        )  # fmt: skip
        if accepted_density_column(cell_type) in summary:
            axis.barh(
                positions,
                summary[accepted_density_column(cell_type)],
                color=colour,
                label="accepted by classifier",
            )
            axis.legend(loc="lower right", fontsize=8)
        axis.set_yticks(positions, slides, fontsize=8)
        axis.invert_yaxis()
        axis.set_xlabel("cells per mm² of segmented tissue")
        axis.set_title(cell_type)
    fig.tight_layout()
    return png_bytes(fig)


def area_histogram_png(cells: pd.DataFrame) -> bytes:
    """Histograms of cell area (µm², log scale) per cell type, all slides pooled."""
    fig = Figure(figsize=(5 * len(CELL_TYPES), 3.2))
    axes = fig.subplots(1, len(CELL_TYPES))
    for axis, cell_type in zip(axes, CELL_TYPES, strict=True):
        areas = cells.loc[cells["cell_type"] == cell_type, "area_um2"].to_numpy()
        areas = areas[np.isfinite(areas) & (areas > 0)]
        if len(areas):
            bins = np.geomspace(areas.min(), areas.max() * 1.0001, 50)
            axis.hist(areas, bins=bins, color=np.array(TYPE_COLOURS[cell_type]) / 255)
            axis.set_xscale("log")
        axis.set_title(f"{cell_type} (n = {len(areas):,})")
        axis.set_xlabel("area µm²")
        axis.set_ylabel("cells")
    fig.tight_layout()
    return png_bytes(fig)
