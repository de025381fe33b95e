"""Cross-validated metrics of a classifier and the acceptance rule a lab signs off on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

ACCEPTANCE = {"accuracy": 0.75, "precision": 0.70, "recall": 0.70}


def cv_metrics(truth: np.ndarray, probability: np.ndarray, threshold: float = 0.5) -> dict:
    """Accuracy, precision, recall, F1, ROC-AUC and confusion matrix of out-of-fold scores."""
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


def metric_text(metrics: dict) -> str:
    return ", ".join(f"{k} {metrics[k]:.3f}" for k in ("accuracy", "precision", "recall", "f1"))


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
