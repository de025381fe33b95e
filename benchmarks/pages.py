"""Annotation page of 300 cells: weight and time to interactive, against the old inlined page.

Baseline (same run, same crops): one HTML page with every crop inlined as base64 at the
resolution SEGMENT stored it, the way the replaced script built its 35 MB pages. Ours: the
page ``bmseg pages`` writes (small JPEG per crop beside it, JSON block, shared JS/CSS).
Both are opened from file:// in headless Chromium; "interactive" is when the page's script
has run (ours: the ``bmseg-interactive`` mark; baseline: DOMContentLoaded); "first screen" is
the load event: every image of the baseline, the crops in view for ours (the rest load lazily
as one scrolls). Run: ``python benchmarks/pages.py [--cells 300 --repeat 5]``.
"""

from __future__ import annotations

import argparse
import base64
import statistics
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

from bmseg.pages import build_pages
from bmseg.testing.gathered import make_gathered

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def inlined_page(crops_file: Path, out: Path) -> int:
    """The baseline: every crop inlined as base64 in one page; returns its size in bytes."""
    images = pq.read_table(crops_file, columns=["cell_uid", "image"]).to_pylist()
    cards = "\n".join(
        f'<div><img src="data:image/jpeg;base64,{base64.b64encode(r["image"]).decode()}">'
        f"<p>{r['cell_uid']}</p><button>Yes</button><button>No</button></div>"
        for r in images
    )
    out.write_text(f"<!doctype html><html><body>{cards}</body></html>")
    return out.stat().st_size


def measure(browser, url: str, mark: str | None) -> tuple[float, float]:
    """(interactive ms, load ms) of one fresh page."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.goto(url, wait_until="load")
    timing = page.evaluate(
        "(mark) => { const n = performance.getEntriesByType('navigation')[0];"
        " const m = mark && performance.getEntriesByName(mark)[0];"
        " return [m ? m.startTime : n.domContentLoadedEventEnd, n.loadEventEnd]; }",
        mark,
    )
    context.close()
    return timing[0], timing[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        gathered = make_gathered(folder / "g", {"S1": {"MK": args.cells}})
        site = folder / "site"
        build_pages([gathered], site, per_page=args.cells)
        page = site / "MK" / "page-0001.html"
        ours = page.stat().st_size + sum(
            p.stat().st_size for p in (site / "MK" / "p0001").iterdir()
        )
        ours += sum(p.stat().st_size for p in (site / "assets").iterdir())
        baseline_page = folder / "inlined.html"
        baseline = inlined_page(gathered / "S1.crops.parquet", baseline_page)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            measure(browser, page.as_uri(), "bmseg-interactive")  # warm the disk cache
            runs_ours = [
                measure(browser, page.as_uri(), "bmseg-interactive") for _ in range(args.repeat)
            ]
            runs_base = [measure(browser, baseline_page.as_uri(), None) for _ in range(args.repeat)]
            browser.close()
    rows = [("inlined (baseline)", baseline, runs_base), ("bmseg pages", ours, runs_ours)]
    median = {
        name: [statistics.median(r[i] for r in runs) for i in (0, 1)] for name, _, runs in rows
    }
    print(f"{args.cells}-cell page, median of {args.repeat} loads in headless Chromium")
    print(f"{'':24}{'bytes':>12}{'interactive ms':>16}{'first screen ms':>17}")
    for name, size, _ in rows:
        print(f"{name:24}{size:>12,}{median[name][0]:>16.0f}{median[name][1]:>17.0f}")
    base, mine = median["inlined (baseline)"], median["bmseg pages"]
    print(
        f"ratio baseline/ours: weight {baseline / ours:.1f}x, "
        f"interactive {base[0] / mine[0]:.1f}x, first screen {base[1] / mine[1]:.1f}x"
    )


if __name__ == "__main__":
    main()
