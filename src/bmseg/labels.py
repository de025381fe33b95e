"""Label files from the galleries, merged into one yes/no per cell for training.

Rules: every file must match the schema exactly (``"version": 1``; each label has ``cell_uid``,
``label`` in yes/no/unsure, ``annotator`` and an ISO-8601 ``time``), or the whole run stops
with the file and entry named. Per annotator and cell the latest label wins (ties: the later
file, then the later entry). ``unsure`` is left out. Where annotators disagree the majority
decides; a tie leaves the cell out. Every disagreement and every uid missing from the cell
tables is counted and reported, never dropped silently. ``validate_labels`` is the one schema
check, shared with ``bmseg annotate serve`` so the server saves only what TRAIN reads.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bmseg.errors import BmsegError

log = logging.getLogger(__name__)

LABEL_VERSION = 1
LABEL_VALUES = ("yes", "no", "unsure")
LABEL_KEYS = ("cell_uid", "label", "annotator", "time")


@dataclass(frozen=True)
class Label:
    """One label as written by an annotator."""

    cell_uid: str
    label: str
    annotator: str
    time: datetime
    order: tuple[int, int]
    """(file index, entry index): breaks ties between equal times."""


@dataclass
class LabelReport:
    """What merging did, for logs, ``metrics.json`` and the training report."""

    files: list[str] = field(default_factory=list)
    entries: int = 0
    superseded: int = 0
    cells_labelled: int = 0
    unsure: int = 0
    disagreements: int = 0
    ties_left_out: int = 0
    not_found: int = 0
    not_found_examples: list[str] = field(default_factory=list)
    disagreement_examples: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        """JSON-ready copy."""
        return dict(self.__dict__)


class LabelFormatError(ValueError):
    """A labels document that breaks the schema; the message names the entry and the problem."""


def parse_time(text: str) -> datetime:
    """An ISO-8601 time as an aware datetime; naive times are taken as UTC so all times compare.

    ValueError if ``text`` is not ISO-8601.
    """
    moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def label_entries(document: Any) -> list[Any]:
    """The ``labels`` list of a parsed labels document, its envelope checked (no record yet)."""
    if not isinstance(document, dict) or "labels" not in document:
        raise LabelFormatError(
            f'expected {{"version": {LABEL_VERSION}, "labels": [...]}}; not a label file'
        )
    version = document.get("version")
    if isinstance(version, bool) or version != LABEL_VERSION:  # True == 1 in Python
        raise LabelFormatError(
            f"label schema version {version!r}, this bmseg reads version {LABEL_VERSION}"
        )
    entries = document["labels"]
    if not isinstance(entries, list):
        raise LabelFormatError("'labels' must be a list of label records")
    return entries


def validate_record(entry: Any, where: str, max_text: int | None = None) -> dict[str, str]:
    """One label record checked against the schema, with only its keys, the annotator stripped.

    Raises LabelFormatError naming ``where`` and the first problem (one line).
    """
    if not isinstance(entry, dict):
        raise LabelFormatError(f"{where}: must be an object")
    missing = [key for key in LABEL_KEYS if key not in entry]
    if missing:
        raise LabelFormatError(f"{where}: missing {', '.join(missing)}")
    for key in LABEL_KEYS:
        value = entry[key]
        if not isinstance(value, str) or not value.strip():
            raise LabelFormatError(f"{where}: {key!r} must be a non-empty string")
        if max_text is not None and len(value) > max_text:
            raise LabelFormatError(f"{where}: {key!r} is longer than {max_text} characters")
    if entry["label"] not in LABEL_VALUES:
        raise LabelFormatError(
            f"{where}: label {entry['label']!r} is not one of {', '.join(LABEL_VALUES)}"
        )
    try:
        parse_time(entry["time"])
    except ValueError:
        raise LabelFormatError(f"{where}: time {entry['time']!r} is not ISO-8601") from None
    return {
        "cell_uid": entry["cell_uid"],
        "label": entry["label"],
        "annotator": entry["annotator"].strip(),
        "time": entry["time"],
    }


def validate_labels(document: Any, max_text: int | None = None) -> list[dict[str, str]]:
    """The records of a parsed labels document, checked against the schema of docs/data.md.

    The one schema check for every reader and writer of labels (TRAIN's files, the annotation
    server's posts): ``{"version": 1, "labels": [record...]}`` where each record has a
    non-empty ``cell_uid`` and ``annotator``, a ``label`` of yes/no/unsure and an ISO-8601
    ``time`` (:func:`validate_record`). ``max_text`` caps the length of each of these strings.
    Raises LabelFormatError naming the first problem (one line).
    """
    return [
        validate_record(entry, f"labels[{index}]", max_text)
        for index, entry in enumerate(label_entries(document))
    ]


def read_label_file(path: Path, file_index: int = 0) -> list[Label]:
    """Parse and validate one label file; any deviation from the schema is a BmsegError."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise BmsegError(f"{path}: no such label file; check the LABELS arguments") from error
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise BmsegError(
            f"{path}: not valid JSON ({error}); re-export the labels from the gallery"
        ) from error
    try:
        records = validate_labels(document)
    except LabelFormatError as error:
        raise BmsegError(f"{path}: {error}; fix the file or re-export it with this bmseg") from None
    return [
        Label(
            record["cell_uid"],
            record["label"],
            record["annotator"],
            parse_time(record["time"]),
            (file_index, index),
        )
        for index, record in enumerate(records)
    ]


def merge_labels(
    paths: Sequence[Path], known_uids: set[str] | None = None
) -> tuple[dict[str, bool], LabelReport]:
    """Merge label files into ``{cell_uid: is_yes}`` and a report of what was merged.

    ``known_uids``: the cells of the tables; labels of other uids are counted as not found.
    """
    report = LabelReport(files=[str(p) for p in paths])
    latest: dict[tuple[str, str], Label] = {}
    for file_index, path in enumerate(paths):
        for label in read_label_file(Path(path), file_index):
            report.entries += 1
            key = (label.cell_uid, label.annotator)
            previous = latest.get(key)
            if previous is None or (label.time, label.order) >= (previous.time, previous.order):
                latest[key] = label
            report.superseded += previous is not None
    votes: dict[str, dict[str, str]] = {}
    for (uid, annotator), label in latest.items():
        votes.setdefault(uid, {})[annotator] = label.label
    report.cells_labelled = len(votes)
    merged: dict[str, bool] = {}
    for uid in sorted(votes):
        by_annotator = votes[uid]
        decided = [v for v in by_annotator.values() if v != "unsure"]
        if len(set(by_annotator.values())) > 1:
            report.disagreements += 1
            if len(report.disagreement_examples) < 20:
                report.disagreement_examples.append({"cell_uid": uid, "labels": by_annotator})
        yes, no = decided.count("yes"), decided.count("no")
        if not decided:
            report.unsure += 1
        elif yes == no:
            report.ties_left_out += 1
        else:
            merged[uid] = yes > no
    if known_uids is not None:
        missing = sorted(uid for uid in votes if uid not in known_uids)
        report.not_found = len(missing)
        report.not_found_examples = missing[:10]
        for uid in missing:
            merged.pop(uid, None)
        if missing:
            log.warning(
                "%d labelled cells are not in the cell tables (e.g. %s); they are left out",
                len(missing),
                ", ".join(missing[:3]),
            )
    if report.disagreements:
        log.warning(
            "annotators disagree on %d cells (%d ties left out, the rest by majority)",
            report.disagreements,
            report.ties_left_out,
        )
    log.info(
        "read %d labels from %d files: %d cells labelled, %d usable, %d unsure",
        report.entries,
        len(paths),
        report.cells_labelled,
        len(merged),
        report.unsure,
    )
    return merged, report
