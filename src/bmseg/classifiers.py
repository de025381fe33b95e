"""TRAIN and CLASSIFY: one classifier per cell type from gallery labels, applied to cell tables.

Training compares a random forest and histogram gradient boosting on the cells' measurements
plus a PCA of their 2048-d embedding (the PCA is fitted inside each cross-validation fold, so
the metrics are honest), with class weights for balance. The model with the better
cross-validated F1 is refitted on all labels and saved with skops (never pickle) together
with its feature list and package versions. Classification streams the cell tables row group
by row group and adds ``{type}_probability`` / ``{type}_label`` columns: no slide, no GPU.
The classified tables leave the 2048-d embedding out unless asked (it stays in the gathered
tables, joined by ``cell_uid``): re-encoding it would be most of the time to classify.
"""

from __future__ import annotations

import argparse
import html
import itertools
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bmseg.cell_tables import EMBEDDED_COLUMNS, find_cell_tables, meta_columns, table_uids
from bmseg.contract import (
    CELL_TYPES,
    EMBEDDING_COLUMN,
    REJECTED_CLASS,
    SUMMARY_FILE,
    check_id,
    feature_columns,
    label_column,
    probability_column,
)
from bmseg.errors import BmsegError, reading
from bmseg.html_page import CSP as REPORT_CSP
from bmseg.html_page import img_tag, png_bytes
from bmseg.labels import LabelReport, merge_labels, read_label_file
from bmseg.metrics_html import label_summary_html, metrics_tables
from bmseg.qupath import write_geojson
from bmseg.slide_records import read_plans
from bmseg.storage import (
    atomic_path,
    check_complete,
    embeddings_to_numpy,
    parquet_writer,
    write_bytes,
    write_json,
    write_parquet,
    writes_output_set,
)
from bmseg.summaries import summarise, write_summary
from bmseg.versions import package_versions

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

MODEL_FORMAT = 1
MODEL_SUFFIX = ".skops"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.html"
RANKING_FILE = "ranking.parquet"
CLASSIFY_RECORD = "classify.json"
ACCEPTANCE = {"accuracy": 0.75, "precision": 0.70, "recall": 0.70}
MODEL_TYPES = frozenset(
    {
        "builtins.dict",
        "builtins.list",
        "builtins.slice",
        "builtins.str",
        "builtins.int",
        "builtins.float",
        "builtins.bool",
        "builtins.tuple",
        "numpy.ndarray",
        "numpy.bool",
        "numpy.float16",
        "numpy.float32",
        "numpy.float64",
        "numpy.int8",
        "numpy.int16",
        "numpy.int32",
        "numpy.int64",
        "numpy.uint8",
        "numpy.uint16",
        "numpy.uint32",
        "numpy.uint64",
        "numpy.random._generator.Generator",
        "sklearn._loss._loss.CyHalfBinomialLoss",
        "sklearn._loss.link.Interval",
        "sklearn._loss.link.LogitLink",
        "sklearn._loss.loss.HalfBinomialLoss",
        "sklearn.compose._column_transformer.ColumnTransformer",
        "sklearn.decomposition._pca.PCA",
        "sklearn.ensemble._forest.RandomForestClassifier",
        "sklearn.ensemble._hist_gradient_boosting.binning._BinMapper",
        "sklearn.ensemble._hist_gradient_boosting.gradient_boosting.HistGradientBoostingClassifier",
        "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
        "sklearn.pipeline.Pipeline",
        "sklearn.preprocessing._function_transformer.FunctionTransformer",
        "sklearn.preprocessing._label.LabelEncoder",
        "sklearn.tree._classes.DecisionTreeClassifier",
        "sklearn.tree._tree.Tree",
    }
)
"""Every type a model bundle of ``bmseg train`` holds; :func:`load_model` loads nothing else."""
MODEL_LOADERS = frozenset(
    {
        "DictNode",
        "ListNode",
        "SliceNode",
        "JsonNode",
        "TypeNode",
        "TupleNode",
        "NdArrayNode",
        "RandomGeneratorNode",
        "LossNode",
        "ObjectNode",
        "TreeNode",
    }
)
"""skops node kinds of those types: no function, method or partial nodes, so no callable."""
MAX_SCHEMA_BYTES = 64 * 1024 * 1024
TISSUE_COLUMNS = (
    "pixel_size_um",
    "tissue_area_mm2",
    "tiles_segmented",
    "segmented_tissue_mm2",
    "duplicates_removed",
)


def feature_matrix(table: pa.Table, features: Sequence[str]) -> np.ndarray:
    """float32 matrix: the measurement columns, then the embedding's dimensions."""
    embedding = embeddings_to_numpy(table[EMBEDDING_COLUMN])
    matrix = np.empty((table.num_rows, len(features) + embedding.shape[1]), np.float32)
    for index, name in enumerate(features):
        matrix[:, index] = table[name].to_numpy(zero_copy_only=False)
    matrix[:, len(features) :] = embedding
    return matrix


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
    from sklearn.compose import ColumnTransformer
    from sklearn.decomposition import PCA
    from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
    from sklearn.pipeline import Pipeline

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


def cv_metrics(truth: np.ndarray, probability: np.ndarray, threshold: float = 0.5) -> dict:
    """Accuracy, precision, recall, F1, ROC-AUC and confusion matrix of out-of-fold scores."""
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        precision_score,
        recall_score,
        roc_auc_score,
    )

    predicted = probability >= threshold
    return {
        "accuracy": float(accuracy_score(truth, predicted)),
        "precision": float(precision_score(truth, predicted, zero_division=0)),
        "recall": float(recall_score(truth, predicted, zero_division=0)),
        "f1": float(f1_score(truth, predicted, zero_division=0)),
        "roc_auc": float(roc_auc_score(truth, probability)),
        "confusion_matrix": confusion_matrix(truth, predicted, labels=[False, True]).tolist(),
    }


def acceptance(metrics: dict) -> str:
    """PASS when every acceptance threshold is met, else FAIL."""
    passed = all(metrics[name] >= bound for name, bound in ACCEPTANCE.items())
    return "PASS" if passed else "FAIL"


@dataclass
class TrainedType:
    """Everything train produced for one cell type."""

    cell_type: str
    chosen: str
    status: str
    counts: dict[str, int]
    candidates: dict[str, dict]
    out_of_fold: dict[str, np.ndarray]
    truth: np.ndarray
    model_path: Path


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
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from threadpoolctl import threadpool_limits

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
        log.info("%s %s: %s", cell_type, name, _metric_text(candidates[name]))
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


def _metric_text(metrics: dict) -> str:
    return ", ".join(f"{k} {metrics[k]:.3f}" for k in ("accuracy", "precision", "recall", "f1"))


def save_model(bundle: dict, path: Path) -> None:
    """Write a model bundle with skops (atomically)."""
    import skops.io

    with atomic_path(path) as tmp:
        skops.io.dump(bundle, tmp)


def model_file_types(path: Path) -> set[str]:
    """``module.Class`` of every node in a skops file, or ``module.Class (as Loader)`` of a node
    whose kind is not one :data:`MODEL_LOADERS` lists; read without constructing anything.

    Walks the file's ``schema.json`` with a stack, so a deeply nested file cannot exhaust
    the recursion limit. ValueError if the file is not a skops archive.
    """
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo("schema.json")
            if info.file_size > MAX_SCHEMA_BYTES:
                raise ValueError(f"schema.json of {info.file_size} bytes")
            schema = json.loads(archive.read(info))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(str(error)) from error
    except RecursionError:
        raise ValueError("schema.json nested too deeply") from None
    found: set[str] = set()
    stack: list[Any] = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            if "__class__" in node or "__loader__" in node:
                name = f"{node.get('__module__')}.{node.get('__class__')}"
                loader = node.get("__loader__")
                found.add(name if loader in MODEL_LOADERS else f"{name} (as {loader})")
            stack.extend(node.values())
    return found


def load_model(path: Path) -> dict:
    """Load a bundle written by :func:`save_model`; refuse any type ``bmseg train`` never writes.

    The file's types are checked against :data:`MODEL_TYPES` before skops constructs anything,
    so a file naming a function (``numpy.testing...runstring``, which executes a string) is
    refused instead of run. A file of another bundle format or a scikit-learn of another minor
    version than the installed one is refused with the fix in the message.
    """
    import skops.io
    from sklearn import __version__ as installed_sklearn

    try:
        types = model_file_types(path)
    except (OSError, ValueError) as error:
        raise BmsegError(f"{path}: not a skops model file ({error}); re-run bmseg train") from error
    refused = sorted(types - MODEL_TYPES)
    if refused:
        raise BmsegError(
            f"{path}: holds untrusted types {', '.join(refused[:3])}; only bmseg train "
            "models are loaded"
        )
    try:
        bundle = skops.io.load(path, trusted=sorted(types))
    except Exception as error:  # a damaged archive fails anywhere inside skops
        raise BmsegError(f"{path}: damaged model file ({error}); re-run bmseg train") from error
    if not isinstance(bundle, dict) or bundle.get("format") != MODEL_FORMAT:
        raise BmsegError(f"{path}: not a bmseg model bundle (format {MODEL_FORMAT}); retrain")
    check_bundle(path, bundle)
    saved = bundle["versions"].get("scikit-learn", "?")
    if saved.split(".")[:2] != installed_sklearn.split(".")[:2]:
        raise BmsegError(
            f"{path}: trained with scikit-learn {saved}, installed {installed_sklearn}; "
            f"retrain with bmseg train or install scikit-learn=={saved}"
        )
    return bundle


def check_bundle(path: Path, bundle: dict) -> None:
    """The bundle's fields have the types :func:`train_cell_type` writes, or BmsegError."""
    expected = {
        "cell_type": str,
        "features": list,
        "embedding_dim": int,
        "threshold": float,
        "versions": dict,
    }
    wrong = [key for key, kind in expected.items() if not isinstance(bundle.get(key), kind)]
    if not wrong and not all(isinstance(f, str) for f in bundle["features"]):
        wrong = ["features"]
    if not wrong and not all(isinstance(v, str) for v in bundle["versions"].values()):
        wrong = ["versions"]
    if wrong or not hasattr(bundle.get("pipeline"), "predict_proba"):
        raise BmsegError(
            f"{path}: model bundle field {(wrong or ['pipeline'])[0]!r} is missing or of the "
            "wrong type; re-run bmseg train"
        )
    check_id(bundle["cell_type"], f"{path}: cell_type")


def check_train_out(out: Path, inputs: Sequence[Path]) -> None:
    """Refuse an ``--out`` that is a segmentation models folder or holds TRAIN's own inputs.

    ``bmseg models`` folders are called ``models`` too; classifiers written there would sit
    among the weights SEGMENT reads, and a rerun's cleanup would reach the inputs.
    """
    from bmseg.models.layout import MANIFEST_NAME

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


@writes_output_set
def run_train(args: argparse.Namespace) -> int:
    """``bmseg train``: validate labels and counts, then train and report per cell type."""
    if args.folds < 2:
        raise BmsegError(f"--folds {args.folds}: need at least 2")
    check_train_out(Path(args.final_out), [Path(args.cells), *map(Path, args.labels)])
    files = find_cell_tables([Path(args.cells)], EMBEDDED_COLUMNS)
    label_paths = [Path(p) for p in args.labels]
    merged, report = merge_labels(label_paths, table_uids(files))
    if not merged:
        raise BmsegError(
            f"{label_paths[0]}: no yes/no labels of cells in {args.cells}; label cells of "
            "these tables in the gallery"
        )
    table = read_labelled(files, merged)
    features = feature_columns(table.schema)
    min_per_class = max(args.min_per_class, args.folds)
    plans = []
    for cell_type in sorted(set(table["cell_type"].to_pylist())):
        check_id(cell_type, f"{args.cells}: cell_type")
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
    out = Path(args.out)
    trained = [
        train_cell_type(
            cell_type,
            rows,
            truth,
            features,
            folds=args.folds,
            seed=args.seed,
            pca_components=args.pca_components,
            out=out,
        )
        for cell_type, rows, truth in plans
    ]
    metrics = {
        "acceptance": ACCEPTANCE,
        "folds": args.folds,
        "seed": args.seed,
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
    write_json(metrics, out / METRICS_FILE)
    write_bytes(training_report(trained, report, features).encode("utf-8"), out / REPORT_FILE)
    for t in trained:
        log.info("%s: %s (%s) -> %s", t.cell_type, t.status, t.chosen, t.model_path)
    return 0


def _curves_png(trained: TrainedType) -> bytes:
    """ROC curves of both candidates and the chosen model's score histogram per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, (roc_axis, hist_axis) = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, probability in trained.out_of_fold.items():
        fpr, tpr, _ = roc_curve(trained.truth, probability)
        auc = trained.candidates[name]["roc_auc"]
        roc_axis.plot(fpr, tpr, label=f"{name} (AUC {auc:.2f})")
    roc_axis.plot([0, 1], [0, 1], color="grey", linestyle=":")
    roc_axis.set_xlabel("false positive rate")
    roc_axis.set_ylabel("true positive rate")
    roc_axis.legend(fontsize=8, loc="lower right")
    roc_axis.set_title("cross-validated ROC")
    chosen = trained.out_of_fold[trained.chosen]
    bins = np.linspace(0, 1, 21)
    hist_axis.hist(chosen[trained.truth], bins=bins, alpha=0.6, label="labelled yes")
    hist_axis.hist(chosen[~trained.truth], bins=bins, alpha=0.6, label="labelled no")
    hist_axis.axvline(0.5, color="black", linestyle="--")
    hist_axis.set_xlabel(f"{trained.chosen} probability (out of fold)")
    hist_axis.legend(fontsize=8)
    fig.tight_layout()
    return png_bytes(fig)


REPORT_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:4px 9px;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.PASS{color:#fff;background:#2e7d32;padding:2px 8px;border-radius:4px}
.FAIL{color:#fff;background:#c62828;padding:2px 8px;border-radius:4px}
img{max-width:100%}h2{border-bottom:1px solid #ddd;padding-bottom:.2em}.muted{color:#666}
"""


def training_report(trained: list[TrainedType], report: LabelReport, features: list[str]) -> str:
    """Self-contained HTML page: acceptance, metrics, curves, labels used."""
    esc = html.escape
    criteria = ", ".join(f"{k} ≥ {v:.2f}" for k, v in ACCEPTANCE.items())
    sections = []
    for t in trained:
        entry = {
            "status": t.status,
            "chosen": t.chosen,
            "model": t.model_path.name,
            "counts": t.counts,
            "candidates": t.candidates,
        }
        sections.append(metrics_tables(t.cell_type, entry) + img_tag(_curves_png(t), t.cell_type))
    return (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'>{REPORT_CSP}"
        f"<title>bmseg classifiers</title><style>{REPORT_STYLE}</style></head><body>"
        "<h1>bmseg classifiers</h1>"
        f"<p>Stratified cross-validation, out-of-fold predictions at threshold 0.5. Acceptance: "
        f"{esc(criteria)}.</p>{''.join(sections)}"
        f"<h2>Labels</h2>{label_summary_html(report.as_dict())}"
        f"<h2>Features</h2><p class='muted'>{esc(', '.join(features))}, embedding (PCA)</p>"
        "</body></html>"
    )


def load_classifiers(directory: Path) -> list[dict]:
    """Every model bundle in ``directory``, one per cell type."""
    if not directory.is_dir():
        raise BmsegError(f"--classifiers {directory}: no such directory; pass bmseg train's --out")
    check_complete(directory)
    paths = sorted(directory.glob(f"*{MODEL_SUFFIX}"))
    if not paths:
        raise BmsegError(f"--classifiers {directory}: no *{MODEL_SUFFIX} models; run bmseg train")
    bundles = []
    for path in paths:
        bundle = load_model(path)
        bundle["path"] = path
        bundles.append(bundle)
    return bundles


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
    from threadpoolctl import threadpool_limits

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
        slide = path.name.removesuffix(".cells.parquet")
        record = path.parent / f"{slide}.slide.json"
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
    import pandas as pd

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
            "cell_uid": pa.array(frame["cell_uid"].to_numpy(), pa.string()),
            "cell_type": pa.array(frame["cell_type"].to_numpy(), pa.string()),
            "probability": pa.array(frame["probability"].to_numpy(np.float32)),
            "uncertainty": pa.array(frame["uncertainty"].to_numpy(np.float32)),
        }
    )


@writes_output_set
def run_classify(args: argparse.Namespace) -> int:
    """``bmseg classify``: validate, stream every table through the models, rewrite summary."""
    import pandas as pd
    from tqdm import tqdm

    files = find_cell_tables([Path(p) for p in args.cells], EMBEDDED_COLUMNS)
    names = [p.name for p in files]
    if len(set(names)) != len(names):
        raise BmsegError("CELLS: two tables share a file name; pass each slide's table once")
    bundles = load_classifiers(Path(args.classifiers))
    for path in files:
        check_features(path, bundles)
    origins = slide_origins(files)
    label_paths = [Path(p) for p in args.labels or ()]
    exclude = labelled_uids(label_paths)
    out = Path(args.out)
    final = Path(args.final_out)
    if not args.keep_embedding and any(p.parent.resolve() == final.resolve() for p in files):
        raise BmsegError(
            f"--out {final}: holds the input tables, whose embeddings classify leaves out; "
            "pass another --out or --keep-embedding"
        )
    kept_columns = ["cell_uid", "slide_id", "cell_type", "area_um2"]
    frames = []
    total = sum(map(_rows, files))
    with tqdm(total=total, unit="cells", desc="classify") as progress:
        for path in files:
            with reading(path, "pass the cell tables bmseg gather wrote"):
                tables = _classified_row_groups(pq.ParquetFile(path), bundles, args.keep_embedding)
                first = next(tables)
                for_geojson = []
                with parquet_writer(out / path.name, first.schema) as writer:
                    for table in itertools.chain([first], tables):
                        writer.write_table(table)
                        frames.append(_classified_frame(table, kept_columns, bundles))
                        for_geojson.append(table.select(meta_columns(table.schema)))
                        progress.update(table.num_rows)
            classified = pa.concat_tables(for_geojson)
            measurements = feature_columns(classified.schema)
            measurements += [probability_column(b["cell_type"]) for b in bundles]
            geojson = out / path.name.replace(".cells.parquet", ".cells.geojson")
            classes = qupath_classes(classified, bundles)
            write_geojson(classified, origins[path], measurements, geojson, classes)
    cells = pd.concat(frames, ignore_index=True)
    # a slide without cells has an empty table, named {slide}.cells.parquet by gather
    empty = [p.name.removesuffix(".cells.parquet") for p in files if not _rows(p)]
    slides = sorted(set(cells["slide_id"].unique()) | set(empty))
    summary = summarise(cells, _tissue_frame(files, slides))
    write_summary(summary, cells, out)
    if args.ranking:
        ranking = uncertainty_ranking(cells, exclude)
        write_parquet(ranking, out / RANKING_FILE)
        log.info(
            "ranked %d unlabelled cells by uncertainty -> %s", ranking.num_rows, out / RANKING_FILE
        )
    write_json(
        {
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
        },
        out / CLASSIFY_RECORD,
    )
    log.info("classified %d cells in %d tables -> %s", len(cells), len(files), out)
    return 0


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


def _classified_frame(table: pa.Table, columns: list[str], bundles: Sequence[dict]):
    """The small per-cell record summary and ranking need: ids, area, labels, probability."""
    frame = table.select(columns + [label_column(b["cell_type"]) for b in bundles]).to_pandas()
    probability = np.full(table.num_rows, np.nan, np.float64)
    for bundle in bundles:
        column = table[probability_column(bundle["cell_type"])].to_numpy(zero_copy_only=False)
        probability = np.where(np.isnan(probability), column.astype(np.float64), probability)
    frame["probability"] = probability
    return frame


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bmseg train`` and ``bmseg classify``."""
    train = subparsers.add_parser(
        "train",
        help="one classifier per cell type from gallery labels, with cross-validated metrics",
    )
    train.add_argument("cells", metavar="CELLS", help="gathered directory or a cells parquet")
    train.add_argument("labels", nargs="+", metavar="LABELS", help="label JSON files")
    train.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="folder for the classifiers, metrics.json and report.html (not a segmentation "
        "models folder)",
    )
    train.add_argument("--folds", type=int, default=5, help="cross-validation folds (5)")
    train.add_argument("--seed", type=int, default=0, help="random seed (0)")
    train.add_argument(
        "--min-per-class", type=int, default=10, help="fewest yes and no labels per type (10)"
    )
    train.add_argument(
        "--pca-components", type=int, default=32, help="embedding PCA components (32)"
    )
    train.set_defaults(handler=run_train)

    classify = subparsers.add_parser(
        "classify",
        help="add classifier probability and label columns to gathered cell tables",
    )
    classify.add_argument(
        "cells", nargs="+", metavar="CELLS", help="gathered directory or cells parquet files"
    )
    classify.add_argument(
        "--classifiers", required=True, metavar="MODELS", help="directory bmseg train wrote"
    )
    classify.add_argument("--out", required=True, metavar="DIR", help="output directory")
    classify.add_argument(
        "--ranking",
        action="store_true",
        help=f"also write {RANKING_FILE}: unlabelled cells, most uncertain first",
    )
    classify.add_argument(
        "--keep-embedding",
        action="store_true",
        help="copy the embedding column too (it stays in the gathered tables either way)",
    )
    classify.add_argument(
        "--labels",
        nargs="*",
        metavar="LABELS",
        help="label files whose cells the ranking leaves out",
    )
    classify.set_defaults(handler=run_classify)
