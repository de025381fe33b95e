"""TRAIN and CLASSIFY on synthetic cells whose classes are (or are not) separable."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bmseg.classifiers.bundles import load_model, save_model
from bmseg.cli import main
from bmseg.errors import BmsegError
from bmseg.storage import embedding_array, embeddings_to_numpy
from bmseg.testing.cells import cells_table, write_batch, write_plan
from qupath_geojson import read_like_qupath

N_HSPC, N_MK = 160, 40
LABELLED = 120
TRAIN_FLAGS = ["--pca-components", "4", "--folds", "4"]


@pytest.fixture(scope="module")
def gathered(tmp_path_factory) -> tuple[Path, np.ndarray, list[str]]:
    """A gathered slide of 160 HSPCs (half shifted by a 'yes' signal) and 40 MKs."""
    root = tmp_path_factory.mktemp("classify")
    rng = np.random.default_rng(11)
    truth = rng.random(N_HSPC) < 0.5
    positions = np.arange(N_HSPC + N_MK) * 200.0 + 100
    table = cells_table(
        positions,
        np.full(N_HSPC + N_MK, 500.0),
        np.concatenate([rng.uniform(10, 25, N_HSPC), rng.uniform(40, 80, N_MK)]),
        slide_id="s1",
        tile_id="r0000c0000",
        cell_type=["HSPC"] * N_HSPC + ["MK"] * N_MK,
        signal=np.concatenate([truth, np.zeros(N_MK)]).astype(float),
        embedding_dim=64,
        seed=4,
    )
    write_batch(root / "batch", [table])
    write_plan(root / "plans", "s1", tissue_area_mm2=2.0)
    out = root / "gathered"
    assert (
        main(["gather", str(root / "batch"), "--plans", str(root / "plans"), "--out", str(out)])
        == 0
    )
    return out, truth, table["cell_uid"].to_pylist()[:N_HSPC]


def _labels(path: Path, uids: list[str], truth: np.ndarray) -> Path:
    labels = [
        {
            "cell_uid": u,
            "label": "yes" if t else "no",
            "annotator": "a",
            "time": "2026-01-01T00:00:00Z",
        }
        for u, t in zip(uids, truth, strict=True)
    ]
    path.write_text(json.dumps({"version": 1, "labels": labels}), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(gathered, tmp_path_factory) -> tuple[Path, Path]:
    """Models trained on the first 120 HSPCs' true labels, and the label file."""
    cells, truth, uids = gathered
    root = tmp_path_factory.mktemp("models")
    labels = _labels(root / "labels.json", uids[:LABELLED], truth[:LABELLED])
    assert (
        main(["train", str(cells), str(labels), "--out", str(root / "models"), *TRAIN_FLAGS]) == 0
    )
    return root / "models", labels


def test_separable_classes_pass_acceptance_with_report(trained):
    models, _ = trained
    metrics = json.loads((models / "metrics.json").read_text())
    entry = metrics["cell_types"]["HSPC"]
    assert set(metrics["cell_types"]) == {"HSPC"}  # no MK labels, no MK model
    assert entry["status"] == "PASS"
    assert set(entry["candidates"]) == {"random_forest", "hist_gradient_boosting"}
    chosen = entry["candidates"][entry["chosen"]]
    assert chosen["f1"] == max(c["f1"] for c in entry["candidates"].values())
    (tn, fp), (fn, tp) = chosen["confusion_matrix"]
    assert tn + fp + fn + tp == LABELLED
    assert chosen["accuracy"] == pytest.approx((tn + tp) / LABELLED)
    assert entry["counts"]["yes"] == tp + fn
    page = (models / "report.html").read_text()
    assert "PASS" in page and "data:image/png;base64," in page
    bundle = load_model(models / "HSPC.skops")
    assert bundle["features"][0] == "area_um2" and "embedding" not in bundle["features"]


def test_inseparable_classes_fail_acceptance(gathered, tmp_path):
    cells, _, uids = gathered
    random_truth = np.random.default_rng(3).random(LABELLED) < 0.5
    labels = _labels(tmp_path / "labels.json", uids[:LABELLED], random_truth)
    assert main(["train", str(cells), str(labels), "--out", str(tmp_path / "m"), *TRAIN_FLAGS]) == 0
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert metrics["cell_types"]["HSPC"]["status"] == "FAIL"


def test_same_inputs_give_the_same_model_and_outputs(gathered, trained, tmp_path):
    cells, _, _ = gathered
    models, labels = trained
    assert main(["train", str(cells), str(labels), "--out", str(tmp_path / "m"), *TRAIN_FLAGS]) == 0
    assert (tmp_path / "m" / "metrics.json").read_text() == (models / "metrics.json").read_text()
    outputs = []
    for index, model_dir in enumerate((models, tmp_path / "m")):
        out = tmp_path / f"c{index}"
        args = ["classify", str(cells), "--classifiers", str(model_dir), "--out", str(out)]
        assert main([*args, *(["--keep-embedding"] if index else [])]) == 0
        outputs.append(pq.read_table(out / "s1.cells.parquet"))
    column = "hspc_probability"
    assert outputs[0][column].equals(outputs[1][column])
    gathered_embedding = pq.read_table(cells / "s1.cells.parquet", columns=["embedding"])
    assert outputs[1]["embedding"].equals(gathered_embedding["embedding"])


def test_classify_in_place_would_drop_embeddings_so_it_is_refused(gathered, trained, capsys):
    cells, _, _ = gathered
    models, _ = trained
    code = main(["classify", str(cells), "--classifiers", str(models), "--out", str(cells)])
    assert code == 2 and "--keep-embedding" in capsys.readouterr().err
    assert "hspc_probability" not in pq.read_schema(cells / "s1.cells.parquet").names


def test_too_few_labels_of_a_class_names_counts_needed_and_found(gathered, tmp_path, capsys):
    cells, truth, uids = gathered
    yes = [u for u, t in zip(uids, truth, strict=True) if t][:30]
    no = [u for u, t in zip(uids, truth, strict=True) if not t][:3]
    labels = _labels(tmp_path / "l.json", yes + no, np.array([True] * 30 + [False] * 3))
    assert main(["train", str(cells), str(labels), "--out", str(tmp_path / "m")]) == 2
    error = capsys.readouterr().err
    assert "HSPC: 30 yes and 3 no labels found, at least 10 of each needed" in error
    assert not (tmp_path / "m").exists()


def test_classify_adds_columns_summary_counts_and_uncertainty_ranking(gathered, trained, tmp_path):
    cells, _, uids = gathered
    models, labels = trained
    out = tmp_path / "classified"
    args = ["classify", str(cells), "--classifiers", str(models), "--out", str(out)]
    assert main([*args, "--ranking", "--labels", str(labels)]) == 0
    table = pq.read_table(out / "s1.cells.parquet")
    original = pq.read_table(cells / "s1.cells.parquet").drop_columns(["embedding"])
    assert "embedding" not in table.column_names  # stays in the gathered table
    assert table.select(original.column_names).equals(original)
    types = np.array(table["cell_type"].to_pylist())
    probability = table["hspc_probability"].to_numpy(zero_copy_only=False)
    label = np.array(table["hspc_label"].to_pylist(), dtype=object)
    assert np.isnan(probability[types == "MK"]).all() and (label[types == "MK"] == None).all()  # noqa: E711
    hspc = types == "HSPC"
    assert ((probability[hspc] >= 0) & (probability[hspc] <= 1)).all()
    assert (label[hspc].astype(bool) == (probability[hspc] >= 0.5)).all()

    import pandas as pd

    summary = pd.read_csv(out / "summary.csv").set_index("slide_id")
    accepted = int(label[hspc].astype(bool).sum())
    assert summary.loc["s1", "HSPC_accepted"] == accepted
    assert summary.loc["s1", "HSPC_accepted_per_mm2"] == pytest.approx(accepted / 2.0)
    assert summary.loc["s1", "HSPC_count"] == N_HSPC

    ranking = pq.read_table(out / "ranking.parquet")
    assert ranking.column_names[:2] == ["cell_uid", "cell_type"]
    assert "uncertainty" in ranking.column_names
    ranked = ranking["cell_uid"].to_pylist()
    assert set(ranked) == set(uids[LABELLED:])  # only unlabelled cells with a probability
    uncertainty = ranking["uncertainty"].to_numpy()
    assert (np.diff(uncertainty) <= 0).all()
    by_uid = dict(zip(table["cell_uid"].to_pylist(), probability, strict=True))
    expected = 1 - np.abs(2 * np.array([by_uid[u] for u in ranked]) - 1)
    np.testing.assert_allclose(uncertainty, expected, atol=1e-6)


def test_classified_geojson_carries_classes_and_probabilities_for_qupath(
    gathered, trained, tmp_path
):
    cells, _, _ = gathered
    models, _ = trained
    out = tmp_path / "classified"
    assert main(["classify", str(cells), "--classifiers", str(models), "--out", str(out)]) == 0
    table = pq.read_table(out / "s1.cells.parquet")
    objects = read_like_qupath(out / "s1.cells.geojson")
    gathered_objects = read_like_qupath(cells / "s1.cells.geojson")
    assert [o.uuid for o in objects] == [o.uuid for o in gathered_objects]  # same cells
    assert [o.name for o in objects] == table["cell_uid"].to_pylist()
    rejected_colour = None
    for found, row in zip(objects, table.to_pylist(), strict=True):
        assert found.object_type == "detection" and found.metadata["cell_uid"] == row["cell_uid"]
        assert found.metadata["cell_type"] == row["cell_type"]
        probability = found.measurements["hspc_probability"]
        if row["cell_type"] == "MK":  # no MK classifier: nothing judged it
            assert found.class_name == "MK" and np.isnan(probability)
        else:
            assert found.class_name == ("HSPC" if row["hspc_label"] else "rejected")
            assert probability == pytest.approx(row["hspc_probability"], abs=1e-4)
            if not row["hspc_label"]:
                rejected_colour = found.class_color
        assert found.measurements["area_um2"] == pytest.approx(row["area_um2"], abs=1e-4)
    assert rejected_colour is not None and rejected_colour != (38, 139, 210)
    assert {o.class_name for o in objects} == {"MK", "HSPC", "rejected"}


def test_classify_without_the_slide_record_is_refused(gathered, trained, tmp_path, capsys):
    cells, _, _ = gathered
    models, _ = trained
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "s1.cells.parquet").write_bytes((cells / "s1.cells.parquet").read_bytes())
    out = tmp_path / "out"
    args = ["classify", str(tmp_path / "in"), "--classifiers", str(models), "--out", str(out)]
    assert main(args) == 2
    assert "s1.slide.json: missing" in capsys.readouterr().err
    assert not out.exists()


def test_classify_refuses_tables_without_the_model_features(gathered, trained, tmp_path, capsys):
    cells, _, _ = gathered
    models, _ = trained
    table = pq.read_table(cells / "s1.cells.parquet").drop_columns(["solidity"])
    pq.write_table(table, tmp_path / "s1.cells.parquet")
    out = tmp_path / "out"
    code = main(
        [
            "classify",
            str(tmp_path / "s1.cells.parquet"),
            "--classifiers",
            str(models),
            "--out",
            str(out),
        ]
    )
    assert code == 2
    assert "columns solidity that HSPC.skops needs are missing" in capsys.readouterr().err
    assert not out.exists()


def test_loading_refuses_other_versions_and_untrusted_types(trained, tmp_path):
    models, _ = trained
    bundle = load_model(models / "HSPC.skops")
    bundle.pop("path", None)
    bundle["versions"] = dict(bundle["versions"], **{"scikit-learn": "0.24.2"})
    save_model(bundle, tmp_path / "old.skops")
    with pytest.raises(BmsegError, match=r"trained with scikit-learn 0\.24\.2"):
        load_model(tmp_path / "old.skops")
    save_model({"format": 1, "payload": Fraction(1, 3)}, tmp_path / "odd.skops")
    with pytest.raises(BmsegError, match=r"untrusted types fractions\.Fraction"):
        load_model(tmp_path / "odd.skops")
    (tmp_path / "junk.skops").write_bytes(b"not a zip")
    with pytest.raises(BmsegError, match="not a skops model file"):
        load_model(tmp_path / "junk.skops")


def test_a_slide_without_cells_is_gathered_and_classified_empty(trained, tmp_path):
    models, _ = trained
    cells = cells_table(
        [100.0], [100.0], [10.0], slide_id="s1", tile_id="r0000c0000", cell_type="HSPC",
        embedding_dim=64,
    )  # fmt: skip
    write_batch(tmp_path / "batch", [cells], tiles=[("empty", "r0000c0000")])
    for slide in ("s1", "empty"):
        write_plan(tmp_path / "plans", slide, tissue_area_mm2=1.0)
    gathered, classified = tmp_path / "gathered", tmp_path / "classified"
    gather = ["gather", str(tmp_path / "batch"), "--plans", str(tmp_path / "plans")]
    assert main([*gather, "--out", str(gathered)]) == 0
    classify = ["classify", str(gathered), "--classifiers", str(models)]
    assert main([*classify, "--out", str(classified)]) == 0
    empty = pq.read_table(classified / "empty.cells.parquet")
    assert empty.num_rows == 0 and "hspc_probability" in empty.column_names

    import pandas as pd

    summary = pd.read_csv(classified / "summary.csv").set_index("slide_id")
    assert summary.loc["empty", "HSPC_count"] == 0 and summary.loc["s1", "HSPC_count"] == 1


def test_embeddings_round_trip_through_parquet_as_float16_bytes(tmp_path):
    values = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float16)
    column = embedding_array(values)
    assert column.type == pa.binary(16)
    pq.write_table(pa.table({"embedding": column}), tmp_path / "e.parquet", row_group_size=2)
    read = pq.read_table(tmp_path / "e.parquet")["embedding"]  # three chunks
    np.testing.assert_array_equal(embeddings_to_numpy(read), values)
    np.testing.assert_array_equal(embeddings_to_numpy(column.slice(3)), values[3:])
    # the documented one-liner for a single value
    np.testing.assert_array_equal(np.frombuffer(read[4].as_py(), "<f2"), values[4])
    as_list = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), 8)
    with pytest.raises(ValueError, match="float16"):
        embeddings_to_numpy(as_list)
