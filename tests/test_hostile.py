"""Hostile and careless inputs (issue 15): no code run from a file, no write outside --out,
no label given to the wrong cell, and one line (exit 2) for every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bmseg.classifiers.bundles import MODEL_TYPES, load_model, model_file_types, save_model
from bmseg.classifiers.training import _candidates
from bmseg.contract import MAX_ID_LENGTH, check_id
from bmseg.errors import BmsegError
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
    model = _candidates(0, 3, 1)["random_forest"](8).fit(
        rng.normal(size=(40, 8)), np.arange(40) % 2
    )
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
    "bad", ["..", ".hidden", "-x", "../x", "a/b", "", "a b", "x" * (MAX_ID_LENGTH + 1), 7, None]
)
def test_ids_that_would_leave_their_folder_or_hide_are_refused(bad):
    with pytest.raises(BmsegError, match="where"):
        check_id(bad, "where")


def test_good_ids_pass():
    for good in ("s1", "BM_2024-05.scan2", "r0000c0001", "_", "x" * MAX_ID_LENGTH):
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
    from bmseg.testing.gathered import make_gathered

    gathered = make_gathered(tmp_path / "g", {"S1": {"HSPC": 12, "MK": 5}})
    site = tmp_path / "site"
    bmseg.pages.build_pages([gathered], site, per_page=4, seed=0)
    real = bmseg.pages.write_galleries

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as if stopped after the crops were rendered

    monkeypatch.setattr(bmseg.pages, "write_galleries", killed)
    with pytest.raises(KeyboardInterrupt):
        bmseg.pages.build_pages([gathered], site, per_page=4, seed=1)
    assert _shown_images_match_their_uids(site, gathered) == 17
    monkeypatch.setattr(bmseg.pages, "write_galleries", real)
    bmseg.pages.build_pages([gathered], site, per_page=6, seed=1)
    assert _shown_images_match_their_uids(site, gathered) == 17
    assert not list(site.glob(".bmseg-staging-*"))


# ---- the label server -------------------------------------------------------------------------
def _label(uid: str, label: str = "yes", time: str = "2026-11-21T10:00:00Z") -> dict:
    return {"cell_uid": uid, "label": label, "annotator": "ada", "time": time}


@pytest.fixture()
def label_server(tmp_path):
    import threading

    from bmseg.annotate import make_server

    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<!doctype html><title>i</title>")
    (site / ".secret").write_text("hidden")
    httpd = make_server(site, tmp_path / "labels.json", "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[:2], tmp_path / "labels.json"
    httpd.shutdown()
    httpd.server_close()


def _post(address, body: bytes) -> tuple[int, dict]:
    import http.client

    connection = http.client.HTTPConnection(*address, timeout=10)
    connection.request("POST", "/api/labels", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    reply = json.loads(response.read())
    connection.close()
    return response.status, reply


def test_one_overlong_uid_refuses_that_record_only_and_says_so(label_server):
    from bmseg.annotate import load_labels

    address, labels = label_server
    post = [_label("S:MK:1:1"), _label("S" * 5000 + ":MK:2:2"), _label("S:MK:3:3", "maybe")]
    status, reply = _post(address, json.dumps({"version": 1, "labels": post}).encode())
    assert status == 200 and reply["saved"] == 1
    assert [r["status"] for r in reply["results"]] == ["saved", "refused", "refused"]
    assert "longer than" in reply["results"][1]["error"]
    assert [r["cell_uid"] for r in load_labels(labels)] == ["S:MK:1:1"]


def test_an_older_label_is_answered_superseded_not_saved(label_server):
    from bmseg.annotate import load_labels

    address, labels = label_server
    newer = _label("S:MK:1:1", "no", time="2026-11-21T10:00:09Z")
    _post(address, json.dumps({"version": 1, "labels": [newer]}).encode())
    status, reply = _post(
        address, json.dumps({"version": 1, "labels": [_label("S:MK:1:1", "yes")]}).encode()
    )
    assert status == 200 and reply["saved"] == 0
    assert reply["results"] == [{"status": "superseded", "by": newer}]
    assert load_labels(labels) == [newer]


def test_a_second_server_on_the_same_labels_file_is_refused(label_server, tmp_path, capsys):
    from bmseg.cli import main

    _, labels = label_server
    code = main(
        ["annotate", "serve", str(tmp_path / "site"), "--labels", str(labels), "--port", "0"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "another bmseg annotate serve" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("path", ["/%2esecret", "/%2Esecret", "/.%73ecret", "/x/..%2f.secret"])
def test_percent_encoded_hidden_files_are_not_served(label_server, path):
    import http.client

    connection = http.client.HTTPConnection(*label_server[0], timeout=10)
    connection.request("GET", path)
    response = connection.getresponse()
    assert response.status == 404 and b"hidden" not in response.read()
    connection.close()


def test_deeply_nested_json_and_version_true_are_a_400_not_a_dropped_connection(label_server):
    address, labels = label_server
    status, reply = _post(
        address, b'{"version": 1, "labels": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    )
    assert status == 400 and "malformed" in reply["error"]
    status, reply = _post(address, json.dumps({"version": True, "labels": [_label("u")]}).encode())
    assert status == 400 and "version" in reply["error"]
    assert not labels.exists()


def test_a_body_shorter_than_its_content_length_frees_the_thread(label_server, monkeypatch):
    import socket
    import time

    from bmseg.annotate import SiteHandler

    monkeypatch.setattr(SiteHandler, "timeout", 1.0)
    sock = socket.create_connection(label_server[0], timeout=10)
    sock.sendall(
        b"POST /api/labels HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b'Content-Length: 1000\r\n\r\n{"version": 1'
    )
    start = time.monotonic()
    assert sock.recv(100) == b""  # the server gave up on the body and closed the connection
    assert time.monotonic() - start < 8
    sock.close()


# ---- ids read from files, and outputs as one set ----------------------------------------------
def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def _labels_file(path: Path, uids: list[str], truth) -> Path:
    labels = [
        {
            "cell_uid": u,
            "label": "yes" if t else "no",
            "annotator": "a",
            "time": "2026-01-01T00:00Z",
        }
        for u, t in zip(uids, truth, strict=True)
    ]
    path.write_text(json.dumps({"version": 1, "labels": labels}), encoding="utf-8")
    return path


def _train_inputs(root: Path, cell_types: list[str]):
    """A cell table with 40 labelled cells of each of ``cell_types`` (separable) and labels."""
    from bmseg.storage import write_parquet
    from bmseg.testing.cells import cells_table

    n = 40 * len(cell_types)
    truth = np.arange(n) % 2 == 0
    table = cells_table(
        np.arange(n) * 200.0 + 100,
        np.full(n, 500.0),
        np.full(n, 20.0),
        slide_id="s1",
        tile_id="r0000c0000",
        cell_type=[t for t in cell_types for _ in range(40)],
        signal=truth.astype(float),
        embedding_dim=16,
        seed=1,
    )
    cells = write_parquet(table, root / "s1.cells.parquet")
    labels = _labels_file(root / "labels.json", table["cell_uid"].to_pylist(), truth)
    return cells, labels


def test_a_cell_type_that_climbs_out_of_out_is_refused_and_nothing_is_written(tmp_path, capsys):
    from bmseg.cli import main

    cells, labels = _train_inputs(tmp_path, ["HSPC", "../../x"])
    out = tmp_path / "deep" / "er" / "models"
    code = main(["train", str(cells), str(labels), "--out", str(out), "--folds", "2"])
    assert code == 2
    assert "not a valid id" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.skops")) and not out.exists()


def test_a_train_crash_on_the_second_cell_type_leaves_no_model(tmp_path, monkeypatch):
    """classify must never find the first type's model of a run that failed."""
    import bmseg.classifiers.training
    from bmseg.cli import main

    cells, labels = _train_inputs(tmp_path, ["HSPC", "MK"])
    real = bmseg.classifiers.training.train_cell_type

    def crash_on_mk(cell_type, *args, **kwargs):
        if cell_type == "MK":
            raise MemoryError("killed while training MK")
        return real(cell_type, *args, **kwargs)

    monkeypatch.setattr(bmseg.classifiers.training, "train_cell_type", crash_on_mk)
    out = tmp_path / "models"
    flags = ["--folds", "2", "--pca-components", "2"]
    with pytest.raises(MemoryError):
        main(["train", str(cells), str(labels), "--out", str(out), *flags])
    assert not out.exists() or not list(out.glob("*.skops"))


def test_a_rerun_into_a_used_folder_leaves_only_its_own_files(tmp_path):
    from bmseg.cli import main
    from bmseg.testing.cells import cells_table, write_batch, write_plan

    def gathered(slides: list[str]) -> set[str]:
        tables = [
            cells_table([100.0], [100.0], [10.0], slide_id=s, tile_id="r0000c0000",
                        cell_type="HSPC", embedding_dim=8)
            for s in slides
        ]  # fmt: skip
        batch = tmp_path / f"batch-{len(slides)}"
        write_batch(batch, tables)
        for slide in slides:
            write_plan(tmp_path / "plans", slide, tissue_area_mm2=1.0)
        args = ["gather", str(batch), "--plans", str(tmp_path / "plans")]
        assert main([*args, "--out", str(tmp_path / "g")]) == 0
        return {n for n in _files(tmp_path / "g") if n.endswith((".parquet", ".geojson"))}

    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "notes.txt").write_text("the user's")
    first = gathered(["a", "b"])
    assert {n.split(".")[0] for n in first} == {"a", "b"} and len(first) == 6
    assert gathered(["a"]) == {"a.cells.parquet", "a.crops.parquet", "a.cells.geojson"}
    assert (tmp_path / "g" / "notes.txt").read_text() == "the user's"


def test_a_slide_id_that_climbs_out_in_a_batch_record_is_refused(tmp_path, capsys):
    from bmseg.cli import main
    from bmseg.testing.cells import cells_table, write_batch, write_plan

    table = cells_table([100.0], [100.0], [10.0], slide_id="s1", tile_id="r0000c0000",
                        cell_type="HSPC", embedding_dim=8)  # fmt: skip
    batch = write_batch(tmp_path / "b", [table])
    write_plan(tmp_path / "plans", "s1", tissue_area_mm2=1.0)
    record_path = tmp_path / "b" / "batch.json"
    record = json.loads(record_path.read_text())
    record["tiles"][0]["slide_id"] = "../x"
    record_path.write_text(json.dumps(record))
    args = ["gather", str(batch), "--plans", str(tmp_path / "plans"), "--out", str(tmp_path / "g")]
    assert main(args) == 2
    assert "batch.json: slide_id '../x': not a valid id" in capsys.readouterr().err
    assert not (tmp_path / "x.cells.parquet").exists() and not (tmp_path / "g").exists()


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory) -> Path:
    """A small synthetic CZI (the pixel size comes from its metadata)."""
    from bmseg.synth import write_synthetic_slide

    path = tmp_path_factory.mktemp("slide") / "small.czi"
    write_synthetic_slide(path, 1200, 1200, seed=3)
    return path


def test_two_slide_files_mapping_to_one_id_are_refused_naming_both(small_slide, tmp_path, capsys):
    import shutil

    from bmseg.cli import main

    for name in ("a b.czi", "a_b.czi", "é.czi", "ü.czi"):
        shutil.copy(small_slide, tmp_path / name)
    plans = tmp_path / "plans"
    assert main(["plan", str(tmp_path / "a b.czi"), "--out", str(plans)]) == 0
    before = (plans / "a_b.slide.json").read_bytes()
    assert main(["plan", str(tmp_path / "a_b.czi"), "--out", str(plans)]) == 2
    err = capsys.readouterr().err
    assert "a_b.czi" in err and "a b.czi" in err and "--slide-id" in err
    assert (plans / "a_b.slide.json").read_bytes() == before
    assert main(["plan", str(tmp_path / "a b.czi"), "--out", str(plans)]) == 0  # a rerun may
    assert main(["plan", str(tmp_path / "é.czi"), "--out", str(plans)]) == 0
    assert main(["plan", str(tmp_path / "ü.czi"), "--out", str(plans)]) == 2
    assert "é.czi" in capsys.readouterr().err


def test_file_names_that_make_hidden_or_overlong_ids(small_slide, tmp_path, capsys):
    import shutil

    from bmseg.cli import main

    shutil.copy(small_slide, tmp_path / ".hidden.czi")
    assert main(["plan", str(tmp_path / ".hidden.czi"), "--out", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "_hidden.slide.json").is_file()  # no dot-file the next step skips
    long_name = tmp_path / ("x" * 200 + ".czi")
    shutil.copy(small_slide, long_name)
    assert main(["plan", str(long_name), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "--slide-id" in err and len(err.strip().splitlines()) == 1


# ---- one line, exit 2, for what escaped a step's own checks -----------------------------------
def _one_line(capsys, *words: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


def test_an_out_that_is_a_file_is_one_line(tmp_path, capsys):
    from bmseg.cli import main
    from bmseg.testing.cells import cells_table, write_batch, write_plan

    table = cells_table([100.0], [100.0], [10.0], slide_id="s1", tile_id="r0000c0000",
                        cell_type="HSPC", embedding_dim=8)  # fmt: skip
    write_batch(tmp_path / "b", [table])
    write_plan(tmp_path / "plans", "s1", tissue_area_mm2=1.0)
    (tmp_path / "file").write_text("x")
    args = ["gather", str(tmp_path / "b"), "--plans", str(tmp_path / "plans")]
    assert main([*args, "--out", str(tmp_path / "file")]) == 2
    _one_line(capsys, "is a file")
    assert main([*args, "--out", str(tmp_path / "file" / "under")]) == 2
    _one_line(capsys, str(tmp_path / "file"))


def test_a_damaged_cell_table_given_to_classify_is_one_line_naming_it(tmp_path, capsys):
    from bmseg.cli import main

    cells, labels = _train_inputs(tmp_path, ["HSPC"])
    models = tmp_path / "models"
    flags = ["--folds", "2", "--pca-components", "2"]
    assert main(["train", str(cells), str(labels), "--out", str(models), *flags]) == 0
    data = cells.read_bytes()
    damaged = tmp_path / "in" / "s1.cells.parquet"
    damaged.parent.mkdir()
    damaged.write_bytes(data[:100] + data[-2000:])
    code = main(
        ["classify", str(damaged), "--classifiers", str(models), "--out", str(tmp_path / "c")]
    )
    assert code == 2
    _one_line(capsys, "s1.cells.parquet")
    assert not (tmp_path / "c").exists()


def test_nulls_in_a_tile_table_are_one_line(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bmseg.cli import main
    from bmseg.contract import TILE_SCHEMA

    rows = {name: [None] for name in TILE_SCHEMA.names}
    table = pa.table(rows, schema=TILE_SCHEMA)
    pq.write_table(table, tmp_path / "s1.tiles.parquet")
    assert main(["batch", str(tmp_path / "s1.tiles.parquet"), "--out", str(tmp_path / "b")]) == 2
    _one_line(capsys, "s1.tiles.parquet")


# ---- pixel sizes ------------------------------------------------------------------------------
def _ome_tiff(path: Path, physical_size_x: str) -> Path:
    import tifffile

    xml = (
        '<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/'
        'OME/2016-06"><Image ID="Image:0"><Pixels ID="Pixels:0" DimensionOrder="XYCZT" '
        'Type="uint8" SizeX="256" SizeY="256" SizeC="3" SizeZ="1" SizeT="1" '
        f'PhysicalSizeX="{physical_size_x}"><Channel ID="Channel:0" SamplesPerPixel="3"/>'
        "<TiffData/></Pixels></Image></OME>"
    )
    data = np.full((256, 256, 3), 200, np.uint8)
    tifffile.imwrite(path, data, description=xml, photometric="rgb", metadata=None)
    return path


@pytest.mark.parametrize("value", ["abc", "NaN", "0", "-0.5", "inf", "1e-310", "5e6"])
def test_a_bad_pixel_size_in_ome_metadata_is_one_line_blaming_the_metadata(value, tmp_path, capsys):
    from bmseg.cli import main

    slide = _ome_tiff(tmp_path / "s.ome.tif", value)
    assert main(["plan", str(slide), "--out", str(tmp_path / "p")]) == 2
    err = _one_line(capsys, "s.ome.tif", "metadata", "--pixel-size-um")
    assert "--margin" not in err
    assert not (tmp_path / "p" / "s.slide.json").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-1", "1e-310", "1e9"])
def test_a_bad_pixel_size_flag_is_one_line_blaming_the_flag(value, tmp_path, capsys):
    from bmseg.cli import main

    slide = _ome_tiff(tmp_path / "s.ome.tif", "0.5")
    code = main(["plan", str(slide), f"--pixel-size-um={value}", "--out", str(tmp_path / "p")])
    assert code == 2
    _one_line(capsys, "--pixel-size-um", "not a usable pixel size")
    assert not (tmp_path / "p").exists() or not list((tmp_path / "p").iterdir())


def test_json_outputs_never_hold_infinity(tmp_path):
    from bmseg.storage import write_json

    with pytest.raises(ValueError):
        write_json({"pixel_size_um": float("inf")}, tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def test_a_tile_table_with_a_tile_twice_is_refused(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bmseg.cli import main
    from bmseg.contract import TILE_SCHEMA

    row = {name: [0] for name in TILE_SCHEMA.names}
    row.update(slide_id=["s1"], tile_id=["r0000c0000"], pixel_size_um=[0.5])
    row.update({name: [0.5] for name in TILE_SCHEMA.names if name == "tissue_fraction"})
    one = pa.table(row).cast(TILE_SCHEMA)
    pq.write_table(pa.concat_tables([one, one]), tmp_path / "s1.tiles.parquet")
    assert main(["batch", str(tmp_path / "s1.tiles.parquet"), "--out", str(tmp_path / "b")]) == 2
    _one_line(capsys, "s1.tiles.parquet", "s1/r0000c0000", "more than once")


def test_deeply_nested_labels_given_to_train_are_one_line(tmp_path, capsys):
    from bmseg.cli import main

    cells, _ = _train_inputs(tmp_path, ["HSPC"])
    (tmp_path / "deep.json").write_text("[" * 100000 + "]" * 100000)
    out = tmp_path / "m"
    assert main(["train", str(cells), str(tmp_path / "deep.json"), "--out", str(out)]) == 2
    _one_line(capsys, "deep.json")


def test_a_slide_id_too_long_for_a_file_name_is_refused_where_it_is_given(
    small_slide, tmp_path, capsys
):
    from bmseg.cli import main

    args = ["plan", str(small_slide), "--slide-id", "s" * 300, "--out", str(tmp_path / "p")]
    assert main(args) == 2
    _one_line(capsys, "--slide-id", "at most")


def test_nulls_in_a_batch_table_and_a_cell_table_are_one_line(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from bmseg.cli import main
    from bmseg.contract import BATCH_COLUMNS
    from bmseg.testing.cells import cells_table, write_batch, write_plan

    batch = pa.table({name: pa.array([None], pa.int64()) for name in BATCH_COLUMNS})
    batch = batch.append_column("batch", pa.array([0])).append_column("order", pa.array([0]))
    pq.write_table(batch, tmp_path / "batch_0000.parquet")
    args = ["segment", str(tmp_path / "batch_0000.parquet"), "--slides", "x.czi"]
    assert main([*args, "--models", str(tmp_path), "--out", str(tmp_path / "seg")]) == 2
    _one_line(capsys, "batch_0000.parquet", "nulls")

    table = cells_table([100.0], [100.0], [10.0], slide_id="s1", tile_id="r0000c0000",
                        cell_type="HSPC", embedding_dim=8)  # fmt: skip
    index = table.schema.get_field_index("area_um2")
    table = table.set_column(index, "area_um2", pc.if_else(True, None, table["area_um2"]))
    write_batch(tmp_path / "b", [table])
    write_plan(tmp_path / "plans", "s1", tissue_area_mm2=1.0)
    args = ["gather", str(tmp_path / "b"), "--plans", str(tmp_path / "plans")]
    assert main([*args, "--out", str(tmp_path / "g")]) == 2
    _one_line(capsys, "cells.parquet", "area_um2")


def test_a_bit_flipped_checkpoint_is_refused_not_loaded_silently(test_models_dir, tmp_path):
    import shutil

    from bmseg.models import load_models
    from bmseg.models.layout import read_manifest

    flipped = tmp_path / "models"
    shutil.copytree(test_models_dir, flipped)
    manifest = read_manifest(flipped)
    assert manifest.sha256 and set(manifest.sha256) == set(manifest.files().values())
    victim = flipped / manifest.resnet50_weights
    data = bytearray(victim.read_bytes())
    data[len(data) - 100] ^= 0x01  # inside the last tensor's bytes: still loads
    victim.write_bytes(bytes(data))
    with pytest.raises(BmsegError, match=r"resnet50.*sha256"):
        load_models(flipped, "cpu")
