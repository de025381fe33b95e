"""The annotation pages in headless Chromium (Debian's, driven by Playwright; never downloaded).

Covers what a biologist does: open the index and a gallery, label by keyboard and mouse, label
the rest of a page, export (the file TRAIN reads), import, reload, and the served mode through
a server ``kill -9`` and restart; plus the hostile slide name and the page-weight budget.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from collections import Counter
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from annotate_server import start_server
from bmseg.labels import merge_labels, validate_labels
from bmseg.pages import build_pages
from bmseg.testing.gathered import make_gathered

CHROMIUM = Path("/usr/bin/chromium")
HOSTILE = "<img src=x onerror=alert(1)>"
BUDGET_BYTES = 2 * 1024 * 1024
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed"),
]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
            ],
        )  # fmt: skip
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """18 MKs on three pages of 8, 5 HSPCs; one slide with a hostile name."""
    gathered = make_gathered(
        tmp_path_factory.mktemp("gathered"), {"S1": {"MK": 14, "HSPC": 5}, HOSTILE: {"MK": 4}}
    )
    out = tmp_path_factory.mktemp("site") / "site"
    build_pages([gathered], out, per_page=8)
    return out


class Watch:
    """A page with its dialogs and script errors recorded: both must stay empty.

    Waits use function predicates ("() => ..."): the pages' CSP forbids eval, which string
    expressions would need.
    """

    def __init__(self, context):
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.page = context.new_page()
        self.page.on(
            "dialog", lambda dialog: (self.dialogs.append(dialog.message), dialog.dismiss())
        )
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))

    def open(self, url: str):
        self.page.goto(url)
        self.page.wait_for_selector("body[data-ready='1']")
        return self.page

    def clean(self, expected: str = "") -> bool:
        """No dialog fired and no script error (but the ``expected`` network error) occurred."""
        errors = [e for e in self.errors if not (expected and expected in e)]
        return not self.dialogs and not errors


def labels_on_page(page) -> dict[str, str]:
    return page.eval_on_selector_all(
        ".card", "cards => Object.fromEntries(cards.map(c => [c.dataset.uid, c.dataset.label]))"
    )


def counters(page) -> dict[str, int]:
    return {
        name: int(page.inner_text(f'[data-count="{name}"]'))
        for name in ("yes", "no", "unsure", "open")
    }


def sign_in(page, name: str) -> None:
    page.fill("#annotator", name)
    page.press("#annotator", "Enter")  # leaves the field, so keys label cells again


def export(page) -> dict:
    with page.expect_download() as info:
        page.click("#export")
    return json.loads(Path(info.value.path()).read_text())


def test_index_and_gallery_load_and_the_hostile_slide_name_is_inert(browser, site):
    context = browser.new_context()
    watch = Watch(context)
    page = watch.open(site.joinpath("index.html").as_uri())
    assert page.locator("img").count() == 0  # the slide name did not become an element
    slide_cells = page.locator("td.slide").all_inner_texts()
    assert HOSTILE in slide_cells and "S1" in slide_cells
    assert page.locator("tr[data-row] td.labelled").first.inner_text() == "0 / 5"
    page.click("section.type >> text=MK")  # the MK heading's section holds its page links
    page.locator('a[href="MK/page-0001.html"]').first.click()
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator(".card").count() == 8
    assert page.locator(".card svg path.contour").count() == 8
    assert page.locator(".card .bar-label").first.text_content().endswith("µm")
    page.wait_for_function(  # eight cards fit on the first screen: all crops load
        "() => [...document.querySelectorAll('.card img')]"
        ".every(i => i.complete && i.naturalWidth > 0)"
    )
    texts = page.locator(".card .slide").all_inner_texts()
    slides = Counter(texts)
    assert set(slides) <= {"S1", HOSTILE} and sum(slides.values()) == 8
    assert page.locator(".card .slide", has_text=HOSTILE).count() == slides[HOSTILE]
    hostile_shown = slides[HOSTILE]
    for n in (2, 3):
        watch.open(site.joinpath("MK", f"page-{n:04d}.html").as_uri())
        hostile_shown += Counter(page.locator(".card .slide").all_inner_texts())[HOSTILE]
    assert hostile_shown == 4  # shown as visible text, all four cells
    assert watch.clean(), (watch.dialogs, watch.errors)
    context.close()


def test_keyboard_labelling_rest_of_page_export_and_reload(browser, site, tmp_path):
    context = browser.new_context(viewport={"width": 900, "height": 900})
    watch = Watch(context)
    page = watch.open(site.joinpath("MK", "page-0001.html").as_uri())
    uids = list(labels_on_page(page))
    page.keyboard.press("y")  # no annotator yet: nothing is labelled, the name box asks
    assert set(labels_on_page(page).values()) == {""}
    assert "name" in page.inner_text("#notice")
    sign_in(page, "Ada")

    columns = page.evaluate(
        "(() => { const c = [...document.querySelectorAll('.card')];"
        " return c.filter(x => x.offsetTop === c[0].offsetTop).length; })()"
    )
    page.keyboard.press("y")  # card 0 yes, focus moves to 1
    page.keyboard.press("ArrowRight")  # focus 2
    page.keyboard.press("n")  # card 2 no, focus 3
    page.keyboard.press("ArrowLeft")  # focus 2
    page.keyboard.press("ArrowDown")  # focus 2 + columns
    page.keyboard.press("U")
    assert 1 < columns < 6  # the viewport holds two rows of cards
    expected = {uids[0]: "yes", uids[2]: "no", uids[2 + columns]: "unsure"}
    shown = {uid: label for uid, label in labels_on_page(page).items() if label}
    assert shown == expected
    assert counters(page) == {"yes": 1, "no": 1, "unsure": 1, "open": 5}

    page.click('[data-rest="no"]')
    expected.update({uid: "no" for uid in uids if uid not in expected})
    assert labels_on_page(page) == expected
    assert counters(page)["open"] == 0
    page.locator(f'.card[data-uid="{uids[5]}"] button[data-label="yes"]').click()
    expected[uids[5]] = "yes"

    document = export(page)
    records = validate_labels(document)  # the schema of docs/data.md
    assert {r["cell_uid"]: r["label"] for r in records} == expected
    assert len(records) == 8 and {r["annotator"] for r in records} == {"Ada"}
    exported = tmp_path / "export.json"
    exported.write_text(json.dumps(document))
    merged, _ = merge_labels([exported])  # what bmseg train reads: unsure is left out
    assert merged == {u: v == "yes" for u, v in expected.items() if v != "unsure"}

    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    assert labels_on_page(page) == expected
    assert page.input_value("#annotator") == "Ada"

    index = watch.open(site.joinpath("index.html").as_uri())
    rows = json.loads(index.inner_text("#bmseg-data"))["rows"]
    per_group = Counter(uid.rsplit(":", 3)[0] for uid in expected)
    for i, row in enumerate(rows):
        labelled = index.inner_text(f'tr[data-row="{i}"] td.labelled')
        count = per_group[row["slide"]] if row["type"] == "MK" else 0
        assert labelled == f"{count} / {row['cells']}"
    types = json.loads(index.inner_text("#bmseg-data"))["types"]
    mk = [t["type"] for t in types].index("MK")
    assert index.inner_text(f'section[data-type="{mk}"] .labelled') == "8 / 18"
    assert watch.clean(), (watch.dialogs, watch.errors)
    context.close()


def test_import_adds_labels_and_rejects_a_foreign_file(browser, site, tmp_path):
    context = browser.new_context()
    watch = Watch(context)
    page = watch.open(site.joinpath("MK", "page-0002.html").as_uri())
    sign_in(page, "Ada")
    uids = list(labels_on_page(page))
    good = tmp_path / "labels.json"
    rows = [(uids[1], "yes", "Ada"), (uids[3], "unsure", "Ada"), (uids[4], "no", "Bob")]
    good.write_text(
        json.dumps(
            {
                "version": 1,
                "labels": [
                    {"cell_uid": u, "label": v, "annotator": a, "time": f"2026-11-21T09:00:0{i}Z"}
                    for i, (u, v, a) in enumerate(rows)
                ],
            }
        )
    )
    page.set_input_files("#import", str(good))
    page.wait_for_function(
        "() => document.getElementById('notice').textContent.includes('Imported 3')"
    )
    assert {u: v for u, v in labels_on_page(page).items() if v} == {
        uids[1]: "yes",
        uids[3]: "unsure",
    }
    sign_in(page, "Bob")  # each annotator sees their own labels
    assert {u: v for u, v in labels_on_page(page).items() if v} == {uids[4]: "no"}
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 1, "labels": [{"cell_uid": "x", "label": "maybe"}]}')
    page.set_input_files("#import", str(bad))
    page.wait_for_function("() => document.getElementById('notice').classList.contains('warn')")
    assert len(export(page)["labels"]) == 3
    assert watch.clean(), (watch.dialogs, watch.errors)
    context.close()


def test_on_a_plain_static_host_labels_stay_in_the_browser(browser, site):
    handler = partial(QuietStaticHandler, directory=str(site))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    context = browser.new_context()
    watch = Watch(context)
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/HSPC/page-0001.html"
        page = watch.open(url)
        sign_in(page, "Ada")
        page.keyboard.press("y")
        page.wait_for_selector("#sync[data-state='local']")  # no API here: browser storage
        page.reload()
        page.wait_for_selector("body[data-ready='1']")
        assert list(labels_on_page(page).values()).count("yes") == 1
        assert watch.clean("404"), watch.errors  # the probe for /api/labels finds nothing
    finally:
        context.close()
        httpd.shutdown()
        httpd.server_close()


class QuietStaticHandler(SimpleHTTPRequestHandler):
    """A plain static file server, like any web host, without request logs."""

    def log_message(self, format, *args):
        pass


def test_served_labels_survive_a_server_kill_and_restart(browser, site, tmp_path):
    served = tmp_path / "site"
    shutil.copytree(site, served)
    labels = tmp_path / "labels.json"
    process, port = start_server(served, labels, 0)
    url = f"http://127.0.0.1:{port}/MK/page-0001.html"
    context = browser.new_context()
    watch = Watch(context)
    try:
        page = watch.open(url)
        page.wait_for_selector("#sync[data-state='saved']")
        sign_in(page, "Ada")
        uids = list(labels_on_page(page))
        for key in "yny":
            page.keyboard.press(key)
        page.wait_for_selector("#sync[data-state='saved']")
        on_disk = {
            r["cell_uid"]: r["label"] for r in validate_labels(json.loads(labels.read_text()))
        }
        assert on_disk == {uids[0]: "yes", uids[1]: "no", uids[2]: "yes"}

        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        page.keyboard.press("u")  # made while the server is down: kept in the browser, retried
        page.wait_for_selector("#sync[data-state='offline']", timeout=15000)
        process, _ = start_server(served, labels, port)
        page.wait_for_selector("#sync[data-state='saved']", timeout=30000)

        other = browser.new_context()  # a second annotator, fresh browser storage
        bob = Watch(other)
        second = bob.open(url)
        sign_in(second, "Ada")
        assert {u: v for u, v in labels_on_page(second).items() if v} == {
            uids[0]: "yes", uids[1]: "no", uids[2]: "yes", uids[3]: "unsure",
        }  # fmt: skip
        sign_in(second, "Bob")
        second.keyboard.press("n")  # Bob's label of card 0; Ada's stays
        second.wait_for_selector("#sync[data-state='saved']")
        records = validate_labels(json.loads(labels.read_text()))
        assert {(r["cell_uid"], r["annotator"]): r["label"] for r in records} == {
            (uids[0], "Ada"): "yes", (uids[1], "Ada"): "no", (uids[2], "Ada"): "yes",
            (uids[3], "Ada"): "unsure", (uids[0], "Bob"): "no",
        }  # fmt: skip
        assert watch.clean("ERR_CONNECTION_REFUSED") and bob.clean(), (watch.errors, bob.errors)
        other.close()
    finally:
        context.close()
        process.kill()
        process.wait(timeout=10)


def test_300_cell_page_weight_budget_and_time_to_interactive(browser, tmp_path, request):
    """All requests of a 300-cell page (HTML, JS, CSS, every crop) weigh at most 2 MB."""
    gathered = make_gathered(tmp_path / "g", {"S1": {"MK": 200}, "S2": {"MK": 100}})
    site = tmp_path / "site"
    build_pages([gathered], site)
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    watch = Watch(context)
    requested: list[Path] = []
    watch.page.on(
        "requestfinished", lambda r: requested.append(Path(unquote(urlsplit(r.url).path)))
    )
    page = watch.open(site.joinpath("MK", "page-0001.html").as_uri())
    page.wait_for_load_state("load")
    assert page.locator(".card").count() == 300
    for i in range(0, 300, 10):  # crops load lazily: scroll through the page to fetch them all
        page.locator(".card").nth(i).scroll_into_view_if_needed()
    page.wait_for_function(
        "() => [...document.querySelectorAll('.card img')]"
        ".every(i => i.complete && i.naturalWidth > 0)"
    )
    images = [p for p in requested if p.suffix == ".jpg"]
    assert len(set(images)) == 300
    assert {p.name for p in requested} >= {"page-0001.html", "bmseg.js", "bmseg.css"}
    weight = sum(p.stat().st_size for p in set(requested))
    assert weight <= BUDGET_BYTES, f"{weight} bytes"
    interactive_ms = page.evaluate("performance.getEntriesByName('bmseg-interactive')[0].startTime")
    print(f"300-cell page: {weight / 1e6:.2f} MB, interactive after {interactive_ms:.0f} ms")

    sign_in(page, "Ada")
    for key in "yynyyuyynynyyynyy":
        page.keyboard.press(key)
    page.evaluate("window.scrollTo(0, 0)")
    screenshot = tmp_path / "gallery.png"
    page.screenshot(path=str(screenshot))
    assert screenshot.stat().st_size > 50_000  # a rendered page, not a blank one
    target = os.environ.get("BMSEG_GALLERY_SCREENSHOT")
    if target:  # how docs/gallery.png is made
        shutil.copy(screenshot, target)
    assert watch.clean(), (watch.dialogs, watch.errors)
    context.close()


def test_a_label_the_server_refuses_is_shown_refused_not_saved(browser, site, tmp_path):
    """The server answers per label; the page must not count a refused one as saved."""
    served = tmp_path / "site"
    shutil.copytree(site, served)
    labels = tmp_path / "labels.json"
    process, port = start_server(served, labels, 0)
    context = browser.new_context()
    watch = Watch(context)
    try:
        page = watch.open(f"http://127.0.0.1:{port}/MK/page-0001.html")
        page.wait_for_selector("#sync[data-state='saved']")
        # a name longer than the server keeps (past the field's maxlength, as an import can be)
        page.eval_on_selector("#annotator", "(field) => { field.value = 'A'.repeat(300); }")
        page.press("#annotator", "Enter")
        page.keyboard.press("y")
        page.wait_for_selector("#sync[data-state='refused']", timeout=15000)
        assert "refused" in page.inner_text("#notice")
        assert not labels.exists() or validate_labels(json.loads(labels.read_text())) == []
        page.reload()
        page.wait_for_selector("body[data-ready='1']")
        page.wait_for_selector("#sync[data-state='refused']", timeout=15000)  # not "saving" forever
        sign_in(page, "Ada")
        page.keyboard.press("n")
        page.wait_for_function(
            "() => !document.querySelector('#sync').textContent.startsWith('Saving')"
        )
        for _ in range(100):  # the page posts asynchronously
            if labels.exists() and validate_labels(json.loads(labels.read_text())):
                break
            page.wait_for_timeout(100)
        records = validate_labels(json.loads(labels.read_text()))
        assert [(r["annotator"], r["label"]) for r in records] == [("Ada", "no")]
        assert watch.clean("400 (Bad Request)"), watch.errors
    finally:
        context.close()
        process.kill()
        process.wait(timeout=10)
