"""``bmseg pages``: site layout, ordering, contour/scale-bar geometry, escaping, page weight."""

from __future__ import annotations

import html
import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bmseg.cli import main
from bmseg.errors import BmsegError
from bmseg.pages import build_pages, json_for_script
from bmseg.testing.gathered import PIXEL_SIZE_UM, make_gathered, make_slide

HOSTILE = "<img src=x onerror=alert(1)>"
BUDGET_BYTES = 2 * 1024 * 1024


def page_data(page: Path) -> dict:
    """The JSON block a gallery or index page carries."""
    text = page.read_text(encoding="utf-8")
    block = re.search(r'<script type="application/json" id="bmseg-data">(.*?)</script>', text, re.S)
    assert block is not None
    return json.loads(block.group(1))


@pytest.fixture(scope="module")
def gathered(tmp_path_factory) -> Path:
    """Two slides (one with a hostile name), both cell types, contours marked green in crops."""
    return make_gathered(
        tmp_path_factory.mktemp("gathered"),
        {"S1": {"MK": 9, "HSPC": 6}, HOSTILE: {"MK": 4, "HSPC": 3}},
        mark_contours=True,
    )


@pytest.fixture(scope="module")
def site(gathered, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site") / "site"
    assert main(["pages", str(gathered), "--out", str(out), "--per-page", "5"]) == 0
    return out


def all_cells(site: Path) -> dict[str, list[dict]]:
    """Every gallery page's cells, by page file."""
    return {str(p.relative_to(site)): page_data(p)["cells"] for p in sorted(site.glob("*/page-*"))}


def test_site_pages_every_cell_once_in_pages_of_per_page(site, gathered):
    pages = all_cells(site)
    assert sorted(pages) == [
        *(f"HSPC/page-{i:04d}.html" for i in (1, 2)),
        *(f"MK/page-{i:04d}.html" for i in (1, 2, 3)),
    ]
    assert all(len(cells) <= 5 for cells in pages.values())
    shown = sorted(c["u"] for cells in pages.values() for c in cells)
    expected = sorted(
        uid
        for f in gathered.glob("*.cells.parquet")
        for uid in pq.read_table(f)["cell_uid"].to_pylist()
    )
    assert shown == expected
    for name, cells in pages.items():
        cell_type = name.split("/")[0]
        assert all(c["u"].split(":")[-3] == cell_type for c in cells)
        for cell in cells:  # each crop is its own small JPEG beside the page, not inlined
            image = site / cell_type / cell["i"]
            with Image.open(image) as thumb:
                assert thumb.format == "JPEG"
                assert (thumb.width, thumb.height) == (cell["w"], cell["h"])
                assert max(thumb.size) <= 160
    text = "".join(p.read_text() for p in site.rglob("*.html"))
    assert "base64" not in text and "data:image" not in text
    assert (site / "assets" / "bmseg.js").is_file() and (site / "assets" / "bmseg.css").is_file()


def test_contour_overlay_lands_on_the_contour_drawn_in_the_crop(site):
    """The crops carry the contour in pure green; the page's path must trace those pixels."""
    hits = np.zeros(2)
    total = 0
    for name, cells in all_cells(site).items():
        for cell in cells:
            with Image.open(site / name.split("/")[0] / cell["i"]) as thumb:
                rgb = np.asarray(thumb.convert("RGB")).astype(int)
            points = np.array(re.findall(r"(-?\d+) (-?\d+)", cell["c"]), int)
            assert len(points) >= 6
            greenness = rgb[..., 1] - (rgb[..., 0] + rgb[..., 2]) / 2
            for x, y in points:
                for k, shift in enumerate((0, cell["w"] // 8)):  # shifted: a control that misses
                    window = greenness[max(0, y - 2) : y + 3, max(0, x + shift - 2) : x + shift + 3]
                    hits[k] += window.size > 0 and window.max() > 30
                total += 1
    assert hits[0] / total > 0.95
    assert hits[1] / total < 0.5


def test_contour_overlay_keeps_the_half_pixel_offset_of_the_crop_geometry(site, gathered):
    """Path corners sit on the green line's centre, not half a pixel off (docs/cells.md, Crops).

    HSPC crops are stored at full resolution and shown unshrunk, so a path that drops the
    +0.5 px of SEGMENT's mapping is 0.5 px up-left of the line at every corner. Measured as
    the mean offset from each corner to the green-weighted centre of the 6 x 6 pixels around
    it: rounding the corners to whole pixels averages out over the ~200 corners; the offset
    along the line is not seen (the window slides along the line), so a missing 0.5 px shows
    as about 0.25 px in each axis, an exact mapping as about 0.
    """
    crops = pa.concat_tables(pq.read_table(f) for f in gathered.glob("*.crops.parquet"))
    hspc = [uid.split(":")[-3] == "HSPC" for uid in crops["cell_uid"].to_pylist()]
    assert all(s == 1 for s, h in zip(crops["scale"].to_pylist(), hspc, strict=True) if h)
    offsets = []
    pages = all_cells(site)
    for cell in (cell for name in pages if name.startswith("HSPC/") for cell in pages[name]):
        with Image.open(site / "HSPC" / cell["i"]) as thumb:
            rgb = np.asarray(thumb.convert("RGB")).astype(float)
        assert max(rgb.shape[:2]) == max(cell["w"], cell["h"])  # shown unshrunk
        green = np.clip(rgb[..., 1] - (rgb[..., 0] + rgb[..., 2]) / 2 - 30, 0, None)
        for x, y in np.array(re.findall(r"(-?\d+) (-?\d+)", cell["c"]), int):
            left, top = max(0, x - 3), max(0, y - 3)
            window = green[top : y + 3, left : x + 3]  # pixel centres x - 2.5 ... x + 2.5
            if window.sum() == 0:
                continue
            rows, cols = np.indices(window.shape)
            centre_x = (cols * window).sum() / window.sum() + left + 0.5
            centre_y = (rows * window).sum() / window.sum() + top + 0.5
            offsets.append((centre_x - x, centre_y - y))
    assert len(offsets) > 100
    assert np.all(np.abs(np.mean(offsets, axis=0)) < 0.1), np.mean(offsets, axis=0)


def test_scale_bar_matches_pixel_size_and_crop_scale(site, gathered):
    crops = {
        row["cell_uid"]: row
        for f in gathered.glob("*.crops.parquet")
        for row in pq.read_table(f, columns=["cell_uid", "scale", "width"]).to_pylist()
    }
    for cells in all_cells(site).values():
        for cell in cells:
            crop = crops[cell["u"]]
            um_per_thumb_px = PIXEL_SIZE_UM * crop["scale"] * crop["width"] / cell["w"]
            length_px, label = cell["b"]
            length_um = float(label.split()[0])
            assert label.endswith(" µm")
            assert length_px * um_per_thumb_px == pytest.approx(length_um, rel=0.02)
            assert 0.1 * cell["w"] <= length_px <= 0.4 * cell["w"]


def test_hostile_slide_name_is_escaped_everywhere(site):
    index = (site / "index.html").read_text()
    assert HOSTILE not in index
    assert html.escape(HOSTILE) in index
    for page in [site / "index.html", *site.glob("*/page-*.html")]:
        block = page.read_text().split('id="bmseg-data">', 1)[1].split("</script>", 1)[0]
        assert "<" not in block and ">" not in block
    slides = {c["s"] for cells in all_cells(site).values() for c in cells}
    assert slides == {"S1", HOSTILE}
    assert {row["slide"] for row in page_data(site / "index.html")["rows"]} == {"S1", HOSTILE}


def test_json_for_script_cannot_close_the_script_block():
    text = json_for_script({"name": "</script><!-- \u2028 & <b>"})
    assert "</" not in text and "<!--" not in text and "\u2028" not in text
    assert json.loads(text) == {"name": "</script><!-- \u2028 & <b>"}


def test_index_counts_per_slide_and_type(site):
    rows = {(r["slide"], r["type"]): r["cells"] for r in page_data(site / "index.html")["rows"]}
    assert rows == {("S1", "MK"): 9, ("S1", "HSPC"): 6, (HOSTILE, "MK"): 4, (HOSTILE, "HSPC"): 3}
    index = (site / "index.html").read_text()
    assert 'href="MK/page-0003.html"' in index and 'href="HSPC/page-0002.html"' in index


def order_of(site: Path, cell_type: str) -> list[str]:
    return [
        c["u"] for p in sorted(site.glob(f"{cell_type}/page-*.html")) for c in page_data(p)["cells"]
    ]


def test_orders_size_random_and_uncertainty(gathered, tmp_path):
    areas = {
        row["cell_uid"]: row["area_um2"]
        for f in gathered.glob("*.cells.parquet")
        for row in pq.read_table(f, columns=["cell_uid", "area_um2"]).to_pylist()
    }
    build_pages([gathered], tmp_path / "size", per_page=4, order="size")
    by_size = order_of(tmp_path / "size", "MK")
    assert [areas[u] for u in by_size] == sorted((areas[u] for u in by_size), reverse=True)

    build_pages([gathered], tmp_path / "r1", per_page=4, seed=1)
    build_pages([gathered], tmp_path / "r1b", per_page=4, seed=1)
    build_pages([gathered], tmp_path / "r2", per_page=4, seed=2)
    assert order_of(tmp_path / "r1", "MK") == order_of(tmp_path / "r1b", "MK")
    assert order_of(tmp_path / "r1", "MK") != order_of(tmp_path / "r2", "MK")

    uids = sorted(areas)
    ranked = uids[:-2]  # two cells unranked: they go last
    uncertainty = np.linspace(0.1, 0.9, len(ranked))
    pq.write_table(
        pa.table({"cell_uid": ranked, "uncertainty": uncertainty}), gathered / "ranking.parquet"
    )
    try:
        build_pages([gathered], tmp_path / "u", per_page=4, order="uncertainty")
    finally:
        (gathered / "ranking.parquet").unlink()
    rank = dict(zip(ranked, uncertainty, strict=True))
    for cell_type in ("MK", "HSPC"):
        shown = order_of(tmp_path / "u", cell_type)
        known = [rank[u] for u in shown if u in rank]
        assert known == sorted(known, reverse=True)
        unranked = [i for i, u in enumerate(shown) if u not in rank]
        assert unranked == list(range(len(shown) - len(unranked), len(shown)))


def test_cell_files_can_be_passed_directly(gathered, tmp_path):
    tables = sorted(gathered.glob("*.cells.parquet"))
    assert main(["pages", str(tables[0]), "--out", str(tmp_path / "one")]) == 0
    assert len(pq.read_table(tables[0], columns=["cell_uid"])) == sum(
        len(cells) for cells in all_cells(tmp_path / "one").values()
    )


@pytest.mark.parametrize(
    "problem, message",
    [
        ("no_crops", "crops"),
        ("missing_column", "contour_x_px"),
        ("uncertainty_without_ranking", "ranking"),
        ("bad_name", "cells.parquet"),
    ],
)
def test_bad_input_one_line_error_and_no_output(tmp_path, capsys, problem, message):
    cells, crops = make_slide(tmp_path / "in", "S9", {"MK": 2})
    args = ["pages", str(tmp_path / "in"), "--out", str(tmp_path / "site")]
    if problem == "no_crops":
        crops.unlink()
    elif problem == "missing_column":
        pq.write_table(pq.read_table(cells).drop_columns(["contour_x_px"]), cells)
    elif problem == "uncertainty_without_ranking":
        args += ["--order", "uncertainty"]
    else:
        args[1] = str(cells.rename(tmp_path / "in" / "S9.table.parquet"))
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1
    assert not (tmp_path / "site").exists()


def test_duplicate_cells_across_inputs_are_refused(tmp_path):
    make_slide(tmp_path / "a", "S1", {"MK": 2}, seed=3)
    make_slide(tmp_path / "b", "S1", {"MK": 2}, seed=3)
    with pytest.raises(BmsegError, match="more than once"):
        build_pages([tmp_path / "a", tmp_path / "b"], tmp_path / "site")


def test_page_of_300_realistic_crops_stays_within_2_mb(tmp_path):
    """Page + its images + the shared JS/CSS, with 256 px JPEG crops (q90) as SEGMENT stores."""
    gathered = make_gathered(tmp_path / "g", {"S1": {"MK": 300}})
    site = tmp_path / "site"
    build_pages([gathered], site)
    page = site / "MK" / "page-0001.html"
    cells = page_data(page)["cells"]
    assert len(cells) == 300
    weight = page.stat().st_size + sum(
        (site / "assets" / n).stat().st_size for n in ("bmseg.js", "bmseg.css")
    )
    weight += sum((site / "MK" / c["i"]).stat().st_size for c in cells)
    source_bytes = sum(
        len(b) for b in pq.read_table(gathered / "S1.crops.parquet")["image"].to_pylist()
    )
    assert weight <= BUDGET_BYTES, f"{weight} bytes"
    assert weight < source_bytes  # the crops were shrunk, not copied
    with Image.open(io.BytesIO((site / "MK" / cells[0]["i"]).read_bytes())) as thumb:
        assert thumb.format == "JPEG"


def test_unreadable_crop_and_unknown_pixel_size_still_show_the_cell(tmp_path):
    cells, crops = make_slide(tmp_path / "g", "S1", {"HSPC": 2})
    table = pq.read_table(crops)
    broken = pa.array([b"\xff\xd8not a jpeg", *table["image"].to_pylist()[1:]], pa.binary())
    pq.write_table(table.set_column(6, "image", broken), crops)
    cell_table = pq.read_table(cells)
    zero = pa.array(np.zeros(len(cell_table)), pa.float64())
    pq.write_table(
        cell_table.set_column(cell_table.schema.get_field_index("area_px"), "area_px", zero), cells
    )
    build_pages([tmp_path / "g"], tmp_path / "site")
    shown = page_data(tmp_path / "site" / "HSPC" / "page-0001.html")["cells"]
    assert len(shown) == 2
    assert all(cell["b"] is None and cell["c"] for cell in shown)
    width = table["width"][0].as_py()
    placeholder = next(c for c in shown if c["u"] == table["cell_uid"][0].as_py())
    with Image.open(tmp_path / "site" / "HSPC" / placeholder["i"]) as thumb:
        assert thumb.size == (width, width)
        assert np.asarray(thumb).std() < 3  # flat grey


def test_rerun_into_the_same_site_leaves_no_stale_pages_or_crops(tmp_path):
    gathered = make_gathered(tmp_path / "g", {"S1": {"HSPC": 7}})
    site = tmp_path / "site"
    build_pages([gathered], site, per_page=2)  # 4 pages
    (site / "labels.json").write_text("{}")  # the user's file stays
    build_pages([gathered], site, per_page=5)  # 2 pages
    assert sorted(p.name for p in (site / "HSPC").glob("page-*.html")) == [
        "page-0001.html",
        "page-0002.html",
    ]
    images = sorted(str(p.relative_to(site / "HSPC")) for p in (site / "HSPC").rglob("*.jpg"))
    shown = sorted(c["i"] for cells in all_cells(site).values() for c in cells)
    assert images == shown and len(shown) == 7
    assert (site / "labels.json").exists()
