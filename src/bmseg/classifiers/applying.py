"""CLASSIFY: every saved classifier applied to gathered cell tables, streamed row group by group.

Adds ``{type}_probability`` / ``{type}_label`` columns (no slide, no GPU), writes the QuPath
GeoJSON with rejected cells classed ``rejected``, the summary with accepted counts and,
optionally, the uncertainty ranking PAGES orders galleries by. The classified tables leave the
2048-d embedding out unless asked (it stays in the gathered tables, joined by ``cell_uid``):
re-encoding it would be most of the time to classify.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from bmseg.cell_tables import EMBEDDED_COLUMNS, find_cell_tables, meta_columns
from bmseg.classifiers.bundles import feature_matrix, load_classifiers
from bmseg.contract import (
    CELLS_SUFFIX,
    CLASSIFY_RECORD,
    EMBEDDING_COLUMN,
    GEOJSON_SUFFIX,
    RANKING_FILE,
    RANKING_SCHEMA,
    REJECTED_CLASS,
    SLIDE_RECORD_SUFFIX,
    SUMMARY_FILE,
    TISSUE_COLUMNS,
    feature_columns,
    label_column,
    probability_column,
    slide_file,
)
from bmseg.errors import BmsegError, reading
from bmseg.labels import read_label_file
from bmseg.qupath import write_geojson
from bmseg.slide_records import read_plans
from bmseg.storage import output_set, parquet_writer, write_json, write_parquet
from bmseg.summaries import summarise, write_summary
from bmseg.versions import package_versions

log = logging.getLogger(__name__)

RECORD_COLUMNS = ["cell_uid", "slide_id", "cell_type", "area_um2"]
"""What the summary and the ranking need of each classified cell, besides its verdicts."""


def check_features(path: Path, bundles: Sequence[dict]) -> None:
    """Fail before any output if a table lacks a model's feature columns or embedding size."""
    schema = pq.read_schema(path)
    for bundle in bundles:
        missing = [f for f in bundle["features"] if f not in schema.names]
        if missing:
            raise BmsegError(
                f"{path}: columns {', '.join(missing[:5])} that {bundle['path'].name} needs are "
                "missing; retrain on tables from this SEGMENT version"
            )
        embedding = schema.field(EMBEDDING_COLUMN).type
        if not pa.types.is_fixed_size_binary(embedding):
            raise BmsegError(
                f"{path}: embedding stored as {embedding}, not float16 bytes; re-run SEGMENT "
                "and GATHER with this bmseg"
            )
        dim = embedding.byte_width // 2
        if dim != bundle["embedding_dim"]:
            raise BmsegError(
                f"{path}: embedding has {dim} dimensions, {bundle['path'].name} expects "
                f"{bundle['embedding_dim']}; retrain on these tables"
            )


def classify_table(table: pa.Table, bundles: Sequence[dict]) -> pa.Table:
    """``table`` with each model's probability and label columns (null on other cell types).

    Gradient boosting predicts with one OpenMP thread: its threads spin on a shared node
    (2x slower on a loaded 2-core machine); the forest predicts with joblib threads.
    """
    matrices: dict[tuple[str, ...], np.ndarray] = {}  # one matrix per feature list, not per model
    for bundle in bundles:
        cell_type = bundle["cell_type"]
        probability = np.full(table.num_rows, np.nan, np.float32)
        rows = np.flatnonzero(
            pc.equal(table["cell_type"], cell_type).to_numpy(zero_copy_only=False)
        )
        if len(rows):
            features = tuple(bundle["features"])
            if features not in matrices:
                matrices[features] = feature_matrix(table, features)
            with threadpool_limits(limits=1, user_api="openmp"):
                probability[rows] = bundle["pipeline"].predict_proba(matrices[features][rows])[:, 1]
        present = ~np.isnan(probability)
        columns = {
            probability_column(cell_type): pa.array(probability, mask=~present),
            label_column(cell_type): pa.array(probability >= bundle["threshold"], mask=~present),
        }
        for name, column in columns.items():
            if name in table.column_names:
                table = table.drop_columns(name)
            table = table.append_column(name, column)
    return table


def slide_origins(files: Sequence[Path]) -> dict[Path, tuple[float, float]]:
    """Each table's slide origin, from the ``{slide}.slide.json`` gather wrote beside it.

    The classified GeoJSON needs it to place contours in QuPath's frame, as gather's does.
    """
    origins = {}
    for path in files:
        slide = table_slide(path)
        record = path.parent / slide_file(slide, SLIDE_RECORD_SUFFIX)
        if not record.is_file():
            raise BmsegError(
                f"{record}: missing; classify places the QuPath GeoJSON with it: pass the "
                "directory gather wrote (or its {slide}.cells.parquet files)"
            )
        plan = read_plans(path.parent, [slide])[slide]
        origins[path] = (plan.origin_x, plan.origin_y)
    return origins


def qupath_classes(table: pa.Table, bundles: Sequence[dict]) -> pa.Array:
    """Each cell's QuPath class: ``rejected`` where its type's classifier said no, else its type.

    Cells of a type no classifier was trained for keep their type: nothing judged them.
    """
    classes = table["cell_type"].combine_chunks()
    for bundle in bundles:
        of_type = pc.equal(table["cell_type"], bundle["cell_type"])
        said_no = pc.invert(table[label_column(bundle["cell_type"])].fill_null(True))
        classes = pc.if_else(pc.and_(of_type, said_no), REJECTED_CLASS, classes)
    return classes.combine_chunks() if isinstance(classes, pa.ChunkedArray) else classes


def _tissue_frame(files: Sequence[Path], slides: list[str]) -> pd.DataFrame:
    """Per-slide tissue columns from gather's summary.csv beside the tables (NaN without it)."""
    for directory in dict.fromkeys(p.parent for p in files):
        summary_path = directory / SUMMARY_FILE
        if summary_path.is_file():
            summary = pd.read_csv(summary_path, dtype={"slide_id": str}).set_index("slide_id")
            kept = [c for c in TISSUE_COLUMNS if c in summary]
            return summary[kept].reindex(slides)
    log.warning("no %s beside the cell tables: densities are left empty", SUMMARY_FILE)
    return pd.DataFrame({"segmented_tissue_mm2": np.nan}, index=pd.Index(slides, name="slide_id"))


def labelled_uids(paths: Sequence[Path]) -> set[str]:
    """Every uid that has any label (unsure too) in the label files."""
    uids: set[str] = set()
    for index, path in enumerate(paths):
        uids.update(label.cell_uid for label in read_label_file(path, index))
    return uids


def uncertainty_ranking(cells: pd.DataFrame, exclude: set[str]) -> pa.Table:
    """Cells with a probability, most uncertain first (1 - |2p - 1|), labelled ones left out."""
    frame = cells[~cells["cell_uid"].isin(exclude)].dropna(subset=["probability"])
    frame = frame.assign(uncertainty=1.0 - np.abs(2.0 * frame["probability"] - 1.0))
    frame = frame.sort_values(["uncertainty", "cell_uid"], ascending=[False, True])
    return pa.table(
        {
            "cell_uid": frame["cell_uid"].to_numpy(),
            "cell_type": frame["cell_type"].to_numpy(),
            "probability": frame["probability"].to_numpy(np.float32),
            "uncertainty": frame["uncertainty"].to_numpy(np.float32),
        },
        schema=RANKING_SCHEMA,
    )


def classify(
    cells: Sequence[Path],
    classifiers: Path,
    out: Path,
    *,
    ranking: bool = False,
    keep_embedding: bool = False,
    labels: Sequence[Path] = (),
) -> Path:
    """``bmseg classify``: validate, stream every table through the models, rewrite summary.

    ``cells`` are gathered directories or their cell tables, ``classifiers`` the folder
    ``bmseg train`` wrote. ``out`` receives, as one output set, each table with its
    probability and label columns (without the embedding unless ``keep_embedding``), its
    QuPath GeoJSON, the summary with accepted counts, ``classify.json`` and, with ``ranking``,
    ``ranking.parquet`` of the cells no file in ``labels`` labels. Returns ``out``.
    """
    files = find_cell_tables(list(cells), EMBEDDED_COLUMNS)
    names = [p.name for p in files]
    if len(set(names)) != len(names):
        raise BmsegError("CELLS: two tables share a file name; pass each slide's table once")
    bundles = load_classifiers(classifiers)
    for path in files:
        check_features(path, bundles)
    origins = slide_origins(files)
    exclude = labelled_uids(labels)
    if not keep_embedding and any(p.parent.resolve() == out.resolve() for p in files):
        raise BmsegError(
            f"--out {out}: holds the input tables, whose embeddings classify leaves out; "
            "pass another --out or --keep-embedding"
        )
    with output_set(out) as staging:
        classified = _classify_tables(files, bundles, origins, staging, keep_embedding)
        # a slide without cells has an empty table, named {slide}.cells.parquet by gather
        empty = [table_slide(p) for p in files if not _rows(p)]
        slides = sorted(set(classified["slide_id"].unique()) | set(empty))
        summary = summarise(classified, _tissue_frame(files, slides))
        write_summary(summary, classified, staging)
        if ranking:
            ranked = uncertainty_ranking(classified, exclude)
            write_parquet(ranked, staging / RANKING_FILE)
            log.info(
                "ranked %d unlabelled cells by uncertainty -> %s",
                ranked.num_rows,
                out / RANKING_FILE,
            )
        write_json(_classify_record(files, bundles, classified), staging / CLASSIFY_RECORD)
    log.info("classified %d cells in %d tables -> %s", len(classified), len(files), out)
    return out


def _classify_tables(
    files: Sequence[Path],
    bundles: Sequence[dict],
    origins: dict[Path, tuple[float, float]],
    out: Path,
    keep_embedding: bool,
) -> pd.DataFrame:
    """Write each table classified and its GeoJSON into ``out``; return every cell's record."""
    frames = []
    with tqdm(total=sum(map(_rows, files)), unit="cells", desc="classify") as progress:
        for path in files:
            with reading(path, "pass the cell tables bmseg gather wrote"):
                tables = _classified_row_groups(pq.ParquetFile(path), bundles, keep_embedding)
                first = next(tables)
                for_geojson = []
                with parquet_writer(out / path.name, first.schema) as writer:
                    for table in itertools.chain([first], tables):
                        writer.write_table(table)
                        frames.append(_classified_frame(table, bundles))
                        for_geojson.append(table.select(meta_columns(table.schema)))
                        progress.update(table.num_rows)
            classified = pa.concat_tables(for_geojson)
            measurements = feature_columns(classified.schema)
            measurements += [probability_column(b["cell_type"]) for b in bundles]
            geojson = out / slide_file(table_slide(path), GEOJSON_SUFFIX)
            classes = qupath_classes(classified, bundles)
            write_geojson(classified, origins[path], measurements, geojson, classes)
    return pd.concat(frames, ignore_index=True)


def _classify_record(files: Sequence[Path], bundles: Sequence[dict], cells: pd.DataFrame) -> dict:
    """``classify.json``: the tables, the classifiers with their metrics, the counts."""
    return {
        "tables": [str(p) for p in files],
        "classifiers": {
            b["cell_type"]: {
                "model": b["path"].name,
                "algorithm": b["algorithm"],
                "threshold": b["threshold"],
                "cv_metrics": b["cv_metrics"],
                "trained_with": b["versions"],
            }
            for b in bundles
        },
        "cells": len(cells),
        "accepted": {
            b["cell_type"]: int(cells[label_column(b["cell_type"])].fillna(False).sum())
            for b in bundles
        },
        "versions": package_versions(),
    }


def table_slide(path: Path) -> str:
    """The slide of a gathered table: ``{slide}.cells.parquet`` → ``{slide}``."""
    return path.name.removesuffix(CELLS_SUFFIX)


def _rows(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


def _classified_row_groups(
    parquet: pq.ParquetFile, bundles: Sequence[dict], keep_embedding: bool
) -> Iterator[pa.Table]:
    """Each row group classified, one at a time; a table without rows gives one empty table."""
    if parquet.num_row_groups:
        tables = (parquet.read_row_group(g) for g in range(parquet.num_row_groups))
    else:
        tables = iter([parquet.schema_arrow.empty_table()])
    for table in tables:
        table = classify_table(table, bundles)
        yield table if keep_embedding else table.drop_columns(EMBEDDING_COLUMN)


def _classified_frame(table: pa.Table, bundles: Sequence[dict]) -> pd.DataFrame:
    """The small per-cell record summary and ranking need: ids, area, labels, probability."""
    frame = table.select(
        RECORD_COLUMNS + [label_column(b["cell_type"]) for b in bundles]
    ).to_pandas()
    probability = np.full(table.num_rows, np.nan, np.float64)
    for bundle in bundles:
        column = table[probability_column(bundle["cell_type"])].to_numpy(zero_copy_only=False)
        probability = np.where(np.isnan(probability), column.astype(np.float64), probability)
    frame["probability"] = probability
    return frame
