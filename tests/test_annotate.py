"""``bmseg annotate serve``: durable label saving, merging, validation and no path traversal."""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from annotate_server import start_server
from bmseg.annotate import load_labels, make_server
from bmseg.cli import main
from bmseg.errors import BmsegError
from bmseg.labels import validate_labels


def record(
    uid: str, label: str = "yes", annotator: str = "ada", time: str = "2026-11-21T10:00:00Z"
):
    return {"cell_uid": uid, "label": label, "annotator": annotator, "time": time}


@pytest.fixture()
def site(tmp_path: Path) -> Path:
    folder = tmp_path / "site"
    (folder / "MK").mkdir(parents=True)
    (folder / "index.html").write_text("<!doctype html><title>index</title>")
    (folder / "MK" / "page-0001.html").write_text("<!doctype html><title>MK</title>")
    (folder / ".hidden").write_text("secret")
    (tmp_path / "outside.txt").write_text("outside the site")
    (folder / "escape.txt").symlink_to(tmp_path / "outside.txt")
    return folder


@pytest.fixture()
def server(site: Path, tmp_path: Path) -> Iterator[tuple[str, int, Path]]:
    labels = tmp_path / "labels.json"
    httpd = make_server(site, labels, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[0], httpd.server_address[1], labels
    httpd.shutdown()
    httpd.server_close()


def request(
    address, method: str, path: str, body: bytes | None = None, headers: dict | None = None
) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(address[0], address[1], timeout=10)
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, data


def post(address, document) -> tuple[int, dict]:
    status, data = request(
        address,
        "POST",
        "/api/labels",
        json.dumps(document).encode(),
        {"Content-Type": "application/json"},
    )
    return status, json.loads(data)


def test_post_is_on_disk_when_acknowledged_and_two_annotators_coexist(server):
    address, labels = server[:2], server[2]
    status, reply = post(address, {"version": 1, "labels": [record("S:MK:1:1")]})
    assert status == 200 and reply["total"] == 1
    assert load_labels(labels) == [record("S:MK:1:1")]  # on disk at acknowledgement
    post(address, {"version": 1, "labels": [record("S:MK:1:1", "no", annotator="bob")]})
    post(address, {"version": 1, "labels": [record("S:MK:2:2", "unsure")]})
    on_disk = {(r["cell_uid"], r["annotator"]): r["label"] for r in load_labels(labels)}
    assert on_disk == {
        ("S:MK:1:1", "ada"): "yes",
        ("S:MK:1:1", "bob"): "no",
        ("S:MK:2:2", "ada"): "unsure",
    }
    status, data = request(address, "GET", "/api/labels")
    assert status == 200
    served = json.loads(data)
    assert served["version"] == 1
    assert {(r["cell_uid"], r["annotator"]): r["label"] for r in served["labels"]} == on_disk


def test_newest_time_wins_per_cell_and_annotator(server):
    address, labels = server[:2], server[2]
    post(
        address, {"version": 1, "labels": [record("S:MK:1:1", "yes", time="2026-11-21T10:00:05Z")]}
    )
    post(address, {"version": 1, "labels": [record("S:MK:1:1", "no", time="2026-11-21T10:00:01Z")]})
    assert [r["label"] for r in load_labels(labels)] == ["yes"]  # a late, older replay loses
    post(
        address,
        {"version": 1, "labels": [record("S:MK:1:1", "no", time="2026-11-21T10:00:09+00:00")]},
    )
    assert [r["label"] for r in load_labels(labels)] == ["no"]


@pytest.mark.parametrize(
    "body, status, words",
    [
        (b"{not json", 400, "malformed"),
        (b'{"version": 2, "labels": []}', 400, "version"),
        (b'{"version": 1, "labels": {}}', 400, "list"),
        (json.dumps({"version": 1, "labels": [record("u", "maybe")]}).encode(), 400, "label"),
        (
            json.dumps({"version": 1, "labels": [record("u", annotator=" ")]}).encode(),
            400,
            "annotator",
        ),
        (
            json.dumps({"version": 1, "labels": [record("u", time="yesterday")]}).encode(),
            400,
            "time",
        ),
        (json.dumps({"version": 1, "labels": [{"cell_uid": "u"}]}).encode(), 400, "label"),
        (b"\xff\xfe", 400, "malformed"),
    ],
)
def test_malformed_posts_get_a_4xx_with_a_json_reason_and_change_nothing(
    server, body, status, words
):
    address, labels = server[:2], server[2]
    code, data = request(address, "POST", "/api/labels", body, {"Content-Type": "application/json"})
    assert code == status
    assert words in json.loads(data)["error"]
    assert not labels.exists()


def test_wrong_type_size_origin_or_path_are_refused(server):
    address = server[:2]
    body = json.dumps({"version": 1, "labels": [record("u")]}).encode()
    assert request(address, "POST", "/api/labels", body, {"Content-Type": "text/plain"})[0] == 415
    connection = http.client.HTTPConnection(*address, timeout=10)  # announces 3 MB, sends none
    connection.putrequest("POST", "/api/labels")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(3 * 1024 * 1024))
    connection.endheaders()
    assert connection.getresponse().status == 413
    connection.close()
    evil = {"Content-Type": "application/json", "Origin": "http://evil.example"}
    assert request(address, "POST", "/api/labels", body, evil)[0] == 403
    assert (
        request(address, "POST", "/api/other", body, {"Content-Type": "application/json"})[0] == 404
    )


def test_a_foreign_host_name_is_refused_on_loopback(server):
    address = server[:2]
    for method, body in (("GET", None), ("POST", b"{}")):
        status, data = request(
            address, method, "/api/labels", body, {"Host": f"evil.example:{address[1]}"}
        )
        assert status == 403 and "127.0.0.1" in json.loads(data)["error"]
    assert request(address, "GET", "/", None, {"Host": f"localhost:{address[1]}"})[0] == 200


def test_serves_the_site_and_nothing_outside_it(server):
    address = server[:2]
    assert request(address, "GET", "/")[0] == 200
    status, data = request(address, "GET", "/MK/page-0001.html")
    assert status == 200 and b"<title>MK</title>" in data
    for path in (
        "/../outside.txt",
        "/%2e%2e/outside.txt",
        "/MK/..%2f..%2foutside.txt",
        "/escape.txt",  # a symlink leading out of the site
        "/.hidden",
        "/MK/",  # no directory listings
        "//etc/passwd",
    ):
        status, data = request(address, "GET", path)
        assert status == 404, path
        assert b"outside the site" not in data and b"secret" not in data


def test_serve_refuses_a_folder_without_a_site_or_a_corrupt_labels_file(tmp_path, site, capsys):
    assert main(["annotate", "serve", str(tmp_path / "nowhere"), "--port", "0"]) == 2
    assert "bmseg pages" in capsys.readouterr().err
    bad = tmp_path / "labels.json"
    bad.write_text('{"version": 1, "labels": [{"cell_uid": 3}]}')
    assert main(["annotate", "serve", str(site), "--labels", str(bad), "--port", "0"]) == 2
    error = capsys.readouterr().err
    assert str(bad) in error and len(error.strip().splitlines()) == 1


def test_validate_accepts_exactly_the_documented_schema():
    document = {"version": 1, "labels": [record("S:MK:1:1"), record("S:HSPC:2:2", "unsure")]}
    assert validate_labels(document) == document["labels"]
    with pytest.raises(ValueError):
        validate_labels({"labels": []})


def test_kill_9_loses_no_acknowledged_label(site, tmp_path):
    labels = tmp_path / "labels.json"
    process, port = start_server(site, labels, 0)
    acknowledged = []
    try:
        for i in range(25):
            rec = record(
                f"S:MK:{i}:{i}", ("yes", "no", "unsure")[i % 3], time=f"2026-11-21T10:00:{i:02d}Z"
            )
            status, _ = post(("127.0.0.1", port), {"version": 1, "labels": [rec]})
            assert status == 200
            acknowledged.append(rec)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    assert process.returncode == -signal.SIGKILL
    process, port = start_server(site, labels, port)  # same address, as the browser knows it
    try:
        status, data = request(("127.0.0.1", port), "GET", "/api/labels")
        assert status == 200
        assert sorted(json.loads(data)["labels"], key=lambda r: r["cell_uid"]) == sorted(
            acknowledged, key=lambda r: r["cell_uid"]
        )
    finally:
        process.terminate()
        process.wait(timeout=10)
    temporary = [p for p in labels.parent.iterdir() if ".tmp" in p.name]
    assert not temporary  # the lock file beside the labels stays; no temporary file does


def test_load_labels_names_the_file_on_garbage(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("[1, 2")
    with pytest.raises(BmsegError, match=r"x\.json"):
        load_labels(bad)
