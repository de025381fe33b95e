"""Hostile and careless inputs (issue 15): no code run from a file, no write outside --out,
no label given to the wrong cell, and one line (exit 2) for every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bmseg.classifiers import MODEL_TYPES, _candidates, load_model, model_file_types, save_model
from bmseg.errors import MAX_ID_LENGTH, BmsegError, check_id
from bmseg.versions import package_versions


def _bundle(pipeline) -> dict:
    """A bundle with the fields bmseg train writes (classifiers.train_cell_type)."""
    return {
        "format": 1,
        "cell_type": "HSPC",
        "algorithm": "x",
        "features": ["area_um2"],
        "embedding_dim": 7,
        "threshold": 0.5,
        "pca_components": 3,
        "cv_metrics": {"f1": 0.5, "confusion_matrix": [[1, 2], [3, 4]], "status": "PASS"},
        "versions": package_versions(),
        "pipeline": pipeline,
    }


@pytest.mark.parametrize("algorithm", ["random_forest", "hist_gradient_boosting"])
def test_every_model_bmseg_train_writes_loads(algorithm, tmp_path):
    rng = np.random.default_rng(0)
    matrix, truth = rng.normal(size=(60, 8)), rng.random(60) > 0.5
    model = _candidates(0, 3, 1)[algorithm](8).fit(matrix, truth)
    save_model(_bundle(model), tmp_path / "m.skops")
    assert model_file_types(tmp_path / "m.skops") <= MODEL_TYPES
    loaded = load_model(tmp_path / "m.skops")
    np.testing.assert_allclose(
        loaded["pipeline"].predict_proba(matrix), model.predict_proba(matrix), atol=1e-12
    )


def test_a_model_file_holding_a_numpy_function_is_refused(tmp_path):
    """numpy's runstring executes its argument: a name under ``numpy.`` is no proof of safety."""
    from numpy.testing._private.utils import runstring
    from sklearn.preprocessing import FunctionTransformer

    save_model(_bundle(FunctionTransformer(func=runstring)), tmp_path / "evil.skops")
    with pytest.raises(BmsegError, match=r"untrusted types .*runstring"):
        load_model(tmp_path / "evil.skops")
    save_model(_bundle(FunctionTransformer(func=np.save)), tmp_path / "save.skops")
    with pytest.raises(BmsegError, match="untrusted types"):
        load_model(tmp_path / "save.skops")


def test_a_damaged_or_odd_bundle_is_one_line(tmp_path):
    rng = np.random.default_rng(0)
    model = _candidates(0, 3, 1)["random_forest"](8).fit(rng.normal(size=(40, 8)), np.arange(40) % 2)
    bundle = _bundle(model)
    bundle["features"] = "area_um2"
    save_model(bundle, tmp_path / "odd.skops")
    with pytest.raises(BmsegError, match="'features' is missing or of the wrong type"):
        load_model(tmp_path / "odd.skops")
    bundle = _bundle(model)
    bundle["cell_type"] = "../../x"
    save_model(bundle, tmp_path / "up.skops")
    with pytest.raises(BmsegError, match="not a valid id"):
        load_model(tmp_path / "up.skops")
    data = (tmp_path / "odd.skops").read_bytes()
    (tmp_path / "cut.skops").write_bytes(data[: len(data) // 2])
    with pytest.raises(BmsegError, match="not a skops model file"):
        load_model(tmp_path / "cut.skops")


@pytest.mark.parametrize(
    "bad", ["..", ".hidden", "../x", "a/b", "", "a b", "x" * (MAX_ID_LENGTH + 1), 7, None]
)
def test_ids_that_would_leave_their_folder_or_hide_are_refused(bad):
    with pytest.raises(BmsegError, match="where"):
        check_id(bad, "where")


def test_good_ids_pass():
    for good in ("s1", "BM_2024-05.scan2", "r0000c0001", "x" * MAX_ID_LENGTH):
        assert check_id(good, "where") == good


def _shown_images_match_their_uids(site: Path, gathered: Path) -> int:
    """Every gallery card's image is the thumbnail of its own uid's crop; returns cards seen."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bmseg.pages import make_thumbnail
    from test_pages import all_cells

    crops = pa.concat_tables(pq.read_table(f) for f in gathered.glob("*.crops.parquet"))
    by_uid = {row["cell_uid"]: row for row in crops.to_pylist()}
    seen = 0
    for name, cells in all_cells(site).items():
        for cell in cells:
            crop = by_uid[cell["u"]]
            expected, _, _ = make_thumbnail(crop["image"], crop["width"], crop["height"], 160)
            assert (site / name.split("/")[0] / cell["i"]).read_bytes() == expected, cell["u"]
            seen += 1
    return seen


def test_an_interrupted_pages_rebuild_never_pairs_a_uid_with_another_cells_image(
    tmp_path, monkeypatch
):
    import bmseg.pages
    from pages_synth import make_gathered

    gathered = make_gathered(tmp_path / "g", {"S1": {"HSPC": 12, "MK": 5}})
    site = tmp_path / "site"
    bmseg.pages.build_site([gathered], site, per_page=4, seed=0)
    real = bmseg.pages.write_galleries

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as if stopped after the crops were rendered

    monkeypatch.setattr(bmseg.pages, "write_galleries", killed)
    with pytest.raises(KeyboardInterrupt):
        bmseg.pages.build_site([gathered], site, per_page=4, seed=1)
    assert _shown_images_match_their_uids(site, gathered) == 17
    monkeypatch.setattr(bmseg.pages, "write_galleries", real)
    bmseg.pages.build_site([gathered], site, per_page=6, seed=1)
    assert _shown_images_match_their_uids(site, gathered) == 17
    assert not list(site.glob(".bmseg-staging-*"))
