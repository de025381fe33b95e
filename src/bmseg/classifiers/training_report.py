"""TRAIN's ``report.html``: acceptance, metrics, ROC curves and the labels used, in one file."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from bmseg.classifiers.metrics import ACCEPTANCE, TrainedType
from bmseg.html_page import CSP, esc, img_tag, png_bytes
from bmseg.labels import LabelReport
from bmseg.metrics_html import label_summary_html, metrics_tables


def _curves_png(trained: TrainedType) -> bytes:
    """ROC curves of both candidates and the chosen model's score histogram per class."""
    fig = Figure(figsize=(9, 3.4))
    roc_axis, hist_axis = fig.subplots(1, 2)
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
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'>{CSP}"
        f"<title>bmseg classifiers</title><style>{REPORT_STYLE}</style></head><body>"
        "<h1>bmseg classifiers</h1>"
        f"<p>Stratified cross-validation, out-of-fold predictions at threshold 0.5. Acceptance: "
        f"{esc(criteria)}.</p>{''.join(sections)}"
        f"<h2>Labels</h2>{label_summary_html(report.as_dict())}"
        f"<h2>Features</h2><p class='muted'>{esc(', '.join(features))}, embedding (PCA)</p>"
        "</body></html>"
    )
