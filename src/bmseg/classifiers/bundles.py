"""Classifier bundles: what ``bmseg train`` saves per cell type, and reading one back safely.

A bundle is a dict (format, cell type, feature list, embedding size, threshold, versions, the
fitted scikit-learn pipeline) saved with skops, never pickle. :func:`load_model` lists the
file's types before skops constructs anything and refuses any type TRAIN never writes.
"""

from __future__ import annotations

import json
import logging
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import skops.io
from sklearn import __version__ as installed_sklearn

from bmseg.contract import EMBEDDING_COLUMN, MODEL_SUFFIX, check_id
from bmseg.errors import BmsegError
from bmseg.storage import atomic_path, check_complete, embeddings_to_numpy

log = logging.getLogger(__name__)

MODEL_FORMAT = 1

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


def feature_matrix(table: pa.Table, features: Sequence[str]) -> np.ndarray:
    """float32 matrix: the measurement columns, then the embedding's dimensions."""
    embedding = embeddings_to_numpy(table[EMBEDDING_COLUMN])
    matrix = np.empty((table.num_rows, len(features) + embedding.shape[1]), np.float32)
    for index, name in enumerate(features):
        matrix[:, index] = table[name].to_numpy(zero_copy_only=False)
    matrix[:, len(features) :] = embedding
    return matrix


def save_model(bundle: dict, path: Path) -> None:
    """Write a model bundle with skops (atomically)."""
    with atomic_path(path) as tmp:
        skops.io.dump(bundle, tmp)


def model_file_types(path: Path) -> set[str]:
    """``module.Class`` of every node in a skops file, or ``module.Class (as Loader)`` of a node
    whose kind is not one :data:`MODEL_LOADERS` lists; read without constructing anything.

    Walks the file's ``schema.json`` with a stack, so a deeply nested file cannot exhaust
    the recursion limit. ValueError if the file is not a skops archive.
    """
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
