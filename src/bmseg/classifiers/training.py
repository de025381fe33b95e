"""TRAIN: one classifier per cell type from gallery labels, with honest cross-validated metrics.

A random forest and histogram gradient boosting are compared on the cells' measurements plus a
PCA of their 2048-d embedding (the PCA is fitted inside each cross-validation fold, so the
metrics are honest), with class weights for balance. The model with the better
cross-validated F1 is refitted on all labels and saved as a bundle (:mod:`.bundles`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from sklearn.compose import ColumnTransformer
from sklearn.decomposition import PCA
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import Pipeline
from threadpoolctl import threadpool_limits

from bmseg.cell_tables import EMBEDDED_COLUMNS, find_cell_tables, table_uids
from bmseg.classifiers.bundles import MODEL_FORMAT, feature_matrix, save_model
from bmseg.classifiers.metrics import ACCEPTANCE, TrainedType, acceptance, cv_metrics, metric_text
from bmseg.classifiers.training_report import training_report
from bmseg.contract import (
    CELL_TYPES,
    METRICS_FILE,
    MODEL_SUFFIX,
    TRAINING_REPORT_FILE,
    check_id,
    feature_columns,
)
from bmseg.errors import BmsegError
from bmseg.labels import merge_labels
from bmseg.models.layout import MANIFEST_NAME
from bmseg.storage import output_set, write_bytes, write_json
from bmseg.versions import package_versions

log = logging.getLogger(__name__)


def read_labelled(files: Sequence[Path], labelled: dict[str, bool]) -> pa.Table:
    """All columns of the labelled cells' rows, read row group by row group."""
    wanted = pa.array(sorted(labelled), pa.string())
    parts = []
    for path in files:
        parquet = pq.ParquetFile(path)
        for group in range(parquet.num_row_groups):
            uids = parquet.read_row_group(group, columns=["cell_uid"])["cell_uid"]
            hit = pc.is_in(uids, value_set=wanted)
            if pc.any(hit).as_py():
                parts.append(parquet.read_row_group(group).filter(hit))
    return pa.concat_tables(parts, promote_options="default")


def _candidates(seed: int, pca_components: int, n_features: int) -> dict[str, Any]:
    """The compared pipelines: measurements as they are, the embedding reduced by PCA."""

    def pipeline(classifier: Any, total_columns: int) -> Pipeline:
        columns = ColumnTransformer(
            [
                ("measurements", "passthrough", slice(0, n_features)),
                (
                    "embedding",
                    PCA(n_components=pca_components, random_state=seed),
                    slice(n_features, total_columns),
                ),
            ]
        )
        return Pipeline([("features", columns), ("classifier", classifier)])

    return {
        "random_forest": lambda total: pipeline(
            RandomForestClassifier(
                n_estimators=200,
                min_samples_leaf=2,
                class_weight="balanced",
                n_jobs=-1,
                random_state=seed,
            ),
            total,
        ),
        "hist_gradient_boosting": lambda total: pipeline(
            HistGradientBoostingClassifier(
                max_iter=100, class_weight="balanced", early_stopping=False, random_state=seed
            ),
            total,
        ),
    }


def train_cell_type(
    cell_type: str,
    table: pa.Table,
    truth: np.ndarray,
    features: list[str],
    *,
    folds: int,
    seed: int,
    pca_components: int,
    out: Path,
) -> TrainedType:
    """Cross-validate both candidates, refit the better one on all labels and save it.

    OpenMP is held to one thread while fitting: the label sets are small, and gradient
    boosting's threads spin badly on a loaded machine (20 s instead of 0.4 s for 250 cells).
    """
    matrix = feature_matrix(table, features)
    n_train = len(truth) - int(np.ceil(len(truth) / folds))
    components = int(min(pca_components, n_train - 1, matrix.shape[1] - len(features)))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    candidates, out_of_fold = {}, {}
    for name, make in _candidates(seed, components, len(features)).items():
        with threadpool_limits(limits=1, user_api="openmp"):
            probability = cross_val_predict(
                make(matrix.shape[1]), matrix, truth, cv=splitter, method="predict_proba"
            )[:, 1]
        candidates[name] = cv_metrics(truth, probability)
        candidates[name]["status"] = acceptance(candidates[name])
        out_of_fold[name] = probability
        log.info("%s %s: %s", cell_type, name, metric_text(candidates[name]))
    chosen = max(candidates, key=lambda n: (candidates[n]["f1"], candidates[n]["roc_auc"]))
    model = _candidates(seed, components, len(features))[chosen](matrix.shape[1])
    with threadpool_limits(limits=1, user_api="openmp"):
        model.fit(matrix, truth)
    model_path = out / f"{cell_type}{MODEL_SUFFIX}"
    save_model(
        {
            "format": MODEL_FORMAT,
            "cell_type": cell_type,
            "algorithm": chosen,
            "features": list(features),
            "embedding_dim": int(matrix.shape[1] - len(features)),
            "threshold": 0.5,
            "pca_components": components,
            "cv_metrics": candidates[chosen],
            "versions": package_versions(),
            "pipeline": model,
        },
        model_path,
    )
    return TrainedType(
        cell_type=cell_type,
        chosen=chosen,
        status=candidates[chosen]["status"],
        counts={"yes": int(truth.sum()), "no": int((~truth).sum())},
        candidates=candidates,
        out_of_fold=out_of_fold,
        truth=truth,
        model_path=model_path,
    )


def check_train_out(out: Path, inputs: Sequence[Path]) -> None:
    """Refuse an ``--out`` that is a segmentation models folder or holds TRAIN's own inputs.

    ``bmseg models`` folders are called ``models`` too; classifiers written there would sit
    among the weights SEGMENT reads, and a rerun's cleanup would reach the inputs.
    """
    if (out / MANIFEST_NAME).is_file():
        raise BmsegError(
            f"--out {out}: a segmentation models folder ({MANIFEST_NAME}); write the "
            "classifiers to a folder of their own, e.g. --out classifiers"
        )
    resolved = out.resolve()
    for path in inputs:
        path = path.resolve()
        if resolved == path or (path.is_file() and resolved == path.parent):
            raise BmsegError(
                f"--out {out}: holds the input {path.name}; write the classifiers to a folder "
                "of their own, e.g. --out classifiers"
            )


def train(
    cells: Path,
    labels: Sequence[Path],
    out: Path,
    *,
    folds: int = 5,
    seed: int = 0,
    min_per_class: int = 10,
    pca_components: int = 32,
) -> list[TrainedType]:
    """``bmseg train``: validate labels and counts, then train and report per cell type.

    ``cells`` is a gathered directory or one cell table, ``labels`` the galleries' label
    files; ``out`` receives ``{type}.skops`` per cell type with enough labels (at least
    ``min_per_class`` yes and no, and ``folds``), ``metrics.json`` and ``report.html``, as one
    output set. Returns what was trained per cell type.
    """
    if folds < 2:
        raise BmsegError(f"--folds {folds}: need at least 2")
    check_train_out(out, [cells, *labels])
    files = find_cell_tables([cells], EMBEDDED_COLUMNS)
    merged, report = merge_labels(list(labels), table_uids(files))
    if not merged:
        raise BmsegError(
            f"{labels[0]}: no yes/no labels of cells in {cells}; label cells of "
            "these tables in the gallery"
        )
    table = read_labelled(files, merged)
    features = feature_columns(table.schema)
    min_per_class = max(min_per_class, folds)
    plans = []
    for cell_type in sorted(set(table["cell_type"].to_pylist())):
        check_id(cell_type, f"{cells}: cell_type")
        rows = table.filter(pc.equal(table["cell_type"], cell_type))
        truth = np.array([merged[u] for u in rows["cell_uid"].to_pylist()], bool)
        found = {"yes": int(truth.sum()), "no": int((~truth).sum())}
        short = {k: v for k, v in found.items() if v < min_per_class}
        if short:
            raise BmsegError(
                f"{cell_type}: {found['yes']} yes and {found['no']} no labels found, at least "
                f"{min_per_class} of each needed; label more {cell_type} cells in the gallery"
            )
        plans.append((cell_type, rows, truth))
    for cell_type in sorted(set(CELL_TYPES) - {plan[0] for plan in plans}):
        log.warning("no %s labels: no %s classifier is trained", cell_type, cell_type)
    with output_set(out) as staging:
        trained = [
            train_cell_type(
                cell_type,
                rows,
                truth,
                features,
                folds=folds,
                seed=seed,
                pca_components=pca_components,
                out=staging,
            )
            for cell_type, rows, truth in plans
        ]
        metrics = {
            "acceptance": ACCEPTANCE,
            "folds": folds,
            "seed": seed,
            "features": features,
            "labels": report.as_dict(),
            "cell_types": {
                t.cell_type: {
                    "status": t.status,
                    "chosen": t.chosen,
                    "model": t.model_path.name,
                    "counts": t.counts,
                    "candidates": t.candidates,
                }
                for t in trained
            },
            "versions": package_versions(),
        }
        write_json(metrics, staging / METRICS_FILE)
        page = training_report(trained, report, features)
        write_bytes(page.encode("utf-8"), staging / TRAINING_REPORT_FILE)
    trained = [dataclasses.replace(t, model_path=out / t.model_path.name) for t in trained]
    for t in trained:
        log.info("%s: %s (%s) -> %s", t.cell_type, t.status, t.chosen, t.model_path)
    return trained
