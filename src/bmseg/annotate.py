"""``bmseg annotate serve``: serve an annotation site and keep every label on disk as it is made.

The pages work as a static site (labels in the browser's localStorage); served by this command
they also POST each label to ``/api/labels``. The server merges it into one labels file in the
schema TRAIN reads (docs/data.md), written atomically and fsynced before the browser is told
"saved", so a crash or ``kill -9`` never loses an acknowledged label. Labels are keyed by
(cell_uid, annotator): two people on one server keep each other's labels; for one key the
newest ``time`` wins. Every record of a post gets its own answer: ``saved`` (kept, on disk),
``superseded`` (the file holds a newer label for that cell and annotator, returned with it) or
``refused`` (off the schema, with the reason), so the page never takes a dropped label for a
kept one. One server per labels file: a lock beside it refuses a second. Standard library only
(``http.server``).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from bmseg.contract import LABELS_FILE, SITE_INDEX
from bmseg.errors import BmsegError
from bmseg.labels import (
    LABEL_VERSION,
    LabelFormatError,
    label_entries,
    parse_time,
    read_label_file,
    validate_record,
)
from bmseg.storage import atomic_path

log = logging.getLogger(__name__)

API_PATH = "/api/labels"
MAX_POST_BYTES = 2 * 1024 * 1024
MAX_TEXT = 200
"""Longest cell_uid, annotator, label or time a post may hold."""
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
REQUEST_TIMEOUT_S = 30.0
"""A client that stops sending (a body shorter than its Content-Length) frees its thread then."""


def load_labels(path: Path) -> list[dict[str, str]]:
    """Read a labels file with TRAIN's reader, so the server only extends files TRAIN accepts."""
    return [
        {
            "cell_uid": label.cell_uid,
            "label": label.label,
            "annotator": label.annotator,
            "time": label.time.isoformat().replace("+00:00", "Z"),
        }
        for label in read_label_file(path)
    ]


class LabelBook:
    """The labels file and its in-memory copy; every change is on disk before it is reported.

    Holds an exclusive lock on ``.{name}.lock`` beside the file for its lifetime: a second
    server on the same file would overwrite the first one's labels with its own copy.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self._lock_file = self._take_file_lock(path)
        self.records: dict[tuple[str, str], dict[str, str]] = {}
        if path.exists():
            self.records = self._merged({}, load_labels(path))[0]
        log.info("labels file %s: %d labels", path, len(self.records))

    @staticmethod
    def _take_file_lock(path: Path) -> Any:
        lock_path = path.with_name(f".{path.name}.lock")
        handle = lock_path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise BmsegError(
                f"{path}: another bmseg annotate serve is saving labels to this file; use that "
                "server or pass another --labels"
            ) from None
        return handle

    def close(self) -> None:
        """Release the file lock."""
        self._lock_file.close()

    @staticmethod
    def _merged(
        current: dict[tuple[str, str], dict[str, str]], records: list[dict[str, str]]
    ) -> tuple[dict[tuple[str, str], dict[str, str]], list[dict[str, str] | None]]:
        """``current`` with ``records`` merged (newest time wins), and per record ``None`` if
        it was kept or the newer stored record that supersedes it."""
        merged = dict(current)
        newer: list[dict[str, str] | None] = []
        for record in records:
            key = (record["cell_uid"], record["annotator"])
            old = merged.get(key)
            if old is None or parse_time(record["time"]) >= parse_time(old["time"]):
                merged[key] = record
                newer.append(None)
            else:
                newer.append(old)
        return merged, newer

    def document(self) -> dict[str, Any]:
        """The labels as the schema's JSON document."""
        with self.lock:
            return {"version": LABEL_VERSION, "labels": list(self.records.values())}

    def add(self, records: list[dict[str, str]]) -> tuple[list[dict[str, str] | None], int]:
        """Merge ``records`` and write the file durably; return, per record, ``None`` if it
        was kept or the stored record that supersedes it, and how many labels the file holds."""
        with self.lock:
            merged, newer = self._merged(self.records, records)
            if merged != self.records or not self.path.exists():
                self._write(merged)
                self.records = merged
            return newer, len(self.records)

    def _write(self, records: dict[tuple[str, str], dict[str, str]]) -> None:
        lines = ",\n".join(json.dumps(record, ensure_ascii=False) for record in records.values())
        # one label a line: diff-friendly
        text = f'{{"version": {LABEL_VERSION}, "labels": [\n{lines}\n]}}\n'
        with atomic_path(self.path) as tmp, tmp.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if os.name == "posix":  # make the rename itself durable
            directory = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)


class SiteHandler(SimpleHTTPRequestHandler):
    """Static files from the site folder (nothing outside it) plus the labels API."""

    server_version = "bmseg-annotate"
    timeout = REQUEST_TIMEOUT_S

    def __init__(
        self, *args: Any, book: LabelBook, site: Path, loopback: bool, **kwargs: Any
    ) -> None:
        self.book = book
        self.site = site
        self.loopback = loopback
        super().__init__(*args, directory=str(site), **kwargs)

    def host_refused(self) -> bool:
        """On a loopback address, answer only requests for a loopback name (no DNS rebinding)."""
        if not self.loopback:
            return False
        name = urlsplit("//" + self.headers.get("Host", "")).hostname or ""
        if name in LOOPBACK_NAMES:
            return False
        self.send_json(HTTPStatus.FORBIDDEN, {"error": "open the site at http://127.0.0.1"})
        return True

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def end_headers(self) -> None:
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        super().end_headers()

    def send_json(self, status: int, body: dict[str, Any]) -> None:
        """Reply with a JSON body, never cached."""
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _route(self) -> str:
        return urlsplit(self.path).path

    def do_GET(self) -> None:
        if self.host_refused():
            return
        route = self._route()
        if route == API_PATH:
            self.send_json(HTTPStatus.OK, self.book.document())
        elif route.startswith("/api/"):
            self.send_json(HTTPStatus.NOT_FOUND, {"error": f"no API at {route}"})
        else:
            super().do_GET()

    def do_HEAD(self) -> None:
        if self.host_refused():
            return
        if self._route().startswith("/api/"):
            self.send_json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "use GET or POST"})
        else:
            super().do_HEAD()

    def do_POST(self) -> None:
        if self.host_refused():
            return
        if self._route() != API_PATH:
            self.send_json(HTTPStatus.NOT_FOUND, {"error": f"POST labels to {API_PATH}"})
            return
        origin = self.headers.get("Origin")
        if origin and urlsplit(origin).netloc != self.headers.get("Host"):
            self.send_json(HTTPStatus.FORBIDDEN, {"error": "labels come from this site only"})
            return
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            self.send_json(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE, {"error": "send Content-Type: application/json"}
            )
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.send_json(HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length is required"})
            return
        if not 0 < length <= MAX_POST_BYTES:
            self.close_connection = True
            self.send_json(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                {"error": f"a post holds 1 byte to {MAX_POST_BYTES} bytes; send fewer labels"},
            )
            return
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            self.close_connection = True
            return
        if len(body) < length:  # the client closed before sending its whole body
            self.close_connection = True
            return
        try:
            entries = label_entries(json.loads(body))
        except (ValueError, RecursionError) as error:  # bad JSON or UTF-8, too deep, off schema
            self.send_json(HTTPStatus.BAD_REQUEST, {"error": f"malformed labels: {error}"})
            return
        self.save_records(entries)

    def save_records(self, entries: list[Any]) -> None:
        """Save the valid records of a post; answer per record saved, superseded or refused."""
        results: list[dict[str, Any]] = [{} for _ in entries]
        valid: list[tuple[int, dict[str, str]]] = []
        for index, entry in enumerate(entries):
            try:
                valid.append((index, validate_record(entry, f"labels[{index}]", MAX_TEXT)))
            except LabelFormatError as error:
                results[index] = {"status": "refused", "error": str(error)}
        refused = len(entries) - len(valid)
        if not valid:
            first = results[0]["error"] if results else "no labels in the post"
            self.send_json(
                HTTPStatus.BAD_REQUEST, {"error": f"malformed labels: {first}", "results": results}
            )
            return
        try:
            newer, total = self.book.add([record for _, record in valid])
        except OSError as error:
            log.error("could not write %s: %s", self.book.path, error)
            self.send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "labels not saved"})
            return
        for (index, _), stored in zip(valid, newer, strict=True):
            results[index] = (
                {"status": "saved"} if stored is None else {"status": "superseded", "by": stored}
            )
        saved = sum(stored is None for stored in newer)
        log.info(
            "saved %d label(s), %d superseded, %d refused; %d in %s",
            saved, len(newer) - saved, refused, total, self.book.path,
        )  # fmt: skip
        self.send_json(
            HTTPStatus.OK, {"ok": True, "saved": saved, "total": total, "results": results}
        )

    def send_head(self) -> Any:
        """Serve only regular files inside the site, no dot-files and no directory listings."""
        route = unquote(self._route())  # as translate_path decodes it: "%2e" is a dot
        target = Path(self.translate_path(self.path)).resolve()
        hidden = any(part.startswith(".") for part in route.replace("\\", "/").split("/") if part)
        if hidden or not target.is_relative_to(self.site) or not target.exists():
            self.send_error(HTTPStatus.NOT_FOUND, "not found")
            return None
        if target.is_dir() and not (target / SITE_INDEX).is_file():
            self.send_error(HTTPStatus.NOT_FOUND, "not found")
            return None
        return super().send_head()


class LabelServer(ThreadingHTTPServer):
    """The threaded server; closing it releases the labels file's lock."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: Any, book: LabelBook) -> None:
        self.book = book
        super().__init__(address, handler)

    def server_close(self) -> None:
        super().server_close()
        self.book.close()


def make_server(site: Path, labels: Path, host: str, port: int) -> LabelServer:
    """A threaded HTTP server for ``site`` writing labels to ``labels`` (validated first)."""
    site = site.resolve()
    if not (site / SITE_INDEX).is_file():
        raise BmsegError(f"{site}: no index.html here; make the site with bmseg pages --out SITE")
    if labels.exists() and not labels.is_file():
        raise BmsegError(f"{labels}: is not a file; pass --labels FILE")
    book = LabelBook(labels.resolve())
    handler = partial(SiteHandler, book=book, site=site, loopback=host in LOOPBACK_NAMES)
    try:
        server = LabelServer((host, port), handler, book)
    except OSError as error:
        book.close()
        raise BmsegError(
            f"--host {host} --port {port}: cannot listen ({error}); pick another --port"
        ) from error
    return server


def serve(
    site: Path, labels: Path | None = None, *, host: str = "127.0.0.1", port: int = 8080
) -> None:
    """``bmseg annotate serve``: serve ``site`` until interrupted, saving labels to ``labels``.

    ``labels`` defaults to ``labels.json`` inside the site; ``port`` 0 picks a free port (the
    log line names it).
    """
    labels = labels if labels is not None else site / LABELS_FILE
    server = make_server(site, labels, host, port)
    bound_host, bound_port = server.server_address[:2]
    log.info(
        "serving %s at http://%s:%d/ ; labels are saved to %s", site, bound_host, bound_port, labels
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("stopped; labels are in %s", labels)
    finally:
        server.server_close()
