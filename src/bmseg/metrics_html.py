"""HTML of TRAIN's metrics, shown by the training report and by the run report.

``metrics.json`` is read back from disk by REPORT, so every value is converted (``float``,
``int``, PASS/FAIL) or escaped before it reaches the page.
"""

from __future__ import annotations

from typing import Any

from bmseg.html_page import esc


def _status(value: Any) -> str:
    """PASS or FAIL, whatever a metrics file says: the value becomes a CSS class."""
    return "PASS" if value == "PASS" else "FAIL"


def metrics_tables(cell_type: str, entry: dict) -> str:
    """HTML for one cell type's candidates and confusion matrix (shared with bmseg report).

    Every value is converted (``float``, ``int``, PASS/FAIL) or escaped: ``entry`` may come from
    a metrics.json on disk. A value of the wrong type raises ValueError, TypeError or KeyError.
    """
    chosen = str(entry["chosen"])
    rows = "".join(
        f"<tr><td>{esc(name)}{' (chosen)' if name == chosen else ''}</td>"
        + "".join(f"<td>{float(m[k]):.3f}</td>" for k in ("accuracy", "precision", "recall", "f1"))
        + f"<td>{float(m['roc_auc']):.3f}</td>"
        f"<td><span class='{_status(m['status'])}'>{_status(m['status'])}</span></td></tr>"
        for name, m in entry["candidates"].items()
    )
    (tn, fp), (fn, tp) = (map(int, row) for row in entry["candidates"][chosen]["confusion_matrix"])
    status = _status(entry["status"])
    return (
        f"<h3>{esc(cell_type)} <span class='{status}'>{status}</span></h3>"
        f"<p>{int(entry['counts']['yes'])} yes, {int(entry['counts']['no'])} no labels; model "
        f"<code>{esc(entry['model'])}</code></p>"
        "<table><tr><th>model</th><th>accuracy</th><th>precision</th><th>recall</th><th>F1</th>"
        f"<th>ROC-AUC</th><th>acceptance</th></tr>{rows}</table>"
        "<table><tr><th>chosen model</th><th>predicted no</th><th>predicted yes</th></tr>"
        f"<tr><td>labelled no</td><td>{tn}</td><td>{fp}</td></tr>"
        f"<tr><td>labelled yes</td><td>{fn}</td><td>{tp}</td></tr></table>"
    )


def label_summary_html(labels: dict) -> str:
    """HTML list of what label merging did (shared with bmseg report); counts are ``int``-ed and
    text escaped, as ``labels`` may come from a metrics.json on disk."""
    count = {key: int(labels[key]) for key in (
        "entries", "superseded", "cells_labelled", "unsure", "disagreements", "ties_left_out",
        "not_found",
    )}  # fmt: skip
    examples = [str(uid) for uid in labels["not_found_examples"][:3]]
    items = [
        f"{len(labels['files'])} file(s), {count['entries']} entries, "
        f"{count['superseded']} superseded by a later label of the same annotator",
        f"{count['cells_labelled']} cells labelled, {count['unsure']} only unsure (left out)",
        f"{count['disagreements']} cells with disagreeing annotators "
        f"({count['ties_left_out']} ties left out, the rest decided by majority)",
        f"{count['not_found']} labelled cells not in the cell tables (left out)"
        + (f": e.g. {esc(', '.join(examples))}" if count["not_found"] else ""),
    ]
    files = "".join(f"<li><code>{esc(f)}</code></li>" for f in labels["files"])
    return "<ul>" + "".join(f"<li>{i}</li>" for i in items) + f"</ul><ul>{files}</ul>"
