"""Label files → one yes/no per cell: schema, latest wins, conflicts, unsure, unknown uids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bmseg.errors import BmsegError
from bmseg.labels import merge_labels


def _write(path: Path, labels: list[dict], version: object = 1) -> Path:
    path.write_text(json.dumps({"version": version, "labels": labels}), encoding="utf-8")
    return path


def _label(uid: str, label: str, annotator: str = "ann", time: str = "2026-01-08T12:00:00Z"):
    return {"cell_uid": uid, "label": label, "annotator": annotator, "time": time}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"version": 1, "labels": [', "not valid JSON"),
        ('{"version": 2, "labels": []}', "schema version 2"),
        ('{"labels": []}', "schema version None"),
        ("[1, 2]", "not a label file"),
        ('{"version": 1, "labels": {}}', "'labels' must be a list"),
        (json.dumps({"version": 1, "labels": [_label("a", "maybe")]}), "label 'maybe'"),
        (json.dumps({"version": 1, "labels": [{"cell_uid": "a", "label": "yes"}]}), "missing"),
        (
            json.dumps({"version": 1, "labels": [_label("a", "yes", time="yesterday")]}),
            "not ISO-8601",
        ),
        (json.dumps({"version": 1, "labels": [_label("", "yes")]}), "'cell_uid' must be"),
    ],
)
def test_malformed_files_are_refused_naming_file_and_entry(tmp_path, content, message):
    path = tmp_path / "labels.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(BmsegError, match=message) as error:
        merge_labels([path])
    assert str(path) in str(error.value)
    assert "\n" not in str(error.value)


def test_latest_label_per_annotator_wins_across_files_whatever_their_order(tmp_path):
    newer = _write(tmp_path / "b.json", [_label("c1", "no", time="2026-01-09T08:00:00+01:00")])
    older = _write(
        tmp_path / "a.json",
        [_label("c1", "yes", time="2026-01-09T06:59:00Z"), _label("c2", "yes")],
    )
    for order in ([older, newer], [newer, older]):
        merged, report = merge_labels(order)
        assert merged == {"c1": False, "c2": True}
        assert report.entries == 3 and report.superseded == 1


def test_equal_times_the_later_file_wins(tmp_path):
    first = _write(tmp_path / "1.json", [_label("c1", "yes")])
    second = _write(tmp_path / "2.json", [_label("c1", "no")])
    assert merge_labels([first, second])[0] == {"c1": False}
    assert merge_labels([second, first])[0] == {"c1": True}


def test_unsure_left_out_disagreements_by_majority_ties_left_out_all_reported(tmp_path):
    path = _write(
        tmp_path / "labels.json",
        [
            _label("only-unsure", "unsure"),
            _label("majority", "yes", "ann1"),
            _label("majority", "yes", "ann2"),
            _label("majority", "no", "ann3"),
            _label("tie", "yes", "ann1"),
            _label("tie", "no", "ann2"),
            _label("yes-and-unsure", "yes", "ann1"),
            _label("yes-and-unsure", "unsure", "ann2"),
        ],
    )
    merged, report = merge_labels([path])
    assert merged == {"majority": True, "yes-and-unsure": True}
    assert report.unsure == 1
    assert report.disagreements == 3
    assert report.ties_left_out == 1
    assert {e["cell_uid"] for e in report.disagreement_examples} == {
        "majority",
        "tie",
        "yes-and-unsure",
    }


def test_uids_missing_from_the_tables_are_counted_not_silently_dropped(tmp_path, caplog):
    path = _write(
        tmp_path / "labels.json",
        [_label("known", "yes"), _label("gone-1", "no"), _label("gone-2", "unsure")],
    )
    merged, report = merge_labels([path], known_uids={"known", "other"})
    assert merged == {"known": True}
    assert report.not_found == 2
    assert report.not_found_examples == ["gone-1", "gone-2"]
    assert "2 labelled cells are not in the cell tables" in caplog.text
