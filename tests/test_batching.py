"""BATCH: pooling, seeded sampling, read-local order, and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bmseg.cli import main
from bmseg.plan import tile_grid, tile_table
from bmseg.slide import Rect


def _tile_table(path: Path, slide_id: str, cols: int, rows: int, kept_every: int = 1) -> Path:
    """A tile table as PLAN writes it, for a slide of cols x rows tiles of 1000 px."""
    grid = tile_grid(Rect(0, 0, cols * 1000, rows * 1000), 1000, 100)
    kept = np.arange(grid["row"].size) % kept_every == 0
    fractions = np.full(grid["row"].size, 0.5, np.float32)
    pq.write_table(tile_table(slide_id, grid, fractions, kept, 0.25), path)
    return path


@pytest.fixture
def tables(tmp_path) -> list[Path]:
    return [
        _tile_table(tmp_path / "b.tiles.parquet", "slide-B", 6, 5),
        _tile_table(tmp_path / "a.tiles.parquet", "slide-A", 4, 4, kept_every=2),
        _tile_table(tmp_path / "c.tiles.parquet", "slide-C", 7, 3),
    ]


def _batch(out: Path, tables: list[Path], *flags) -> list[dict]:
    assert main(["batch", *map(str, tables), "--out", str(out), *map(str, flags)]) == 0
    files = sorted(out.glob("batch_*.parquet"))
    rows = []
    for number, path in enumerate(files):
        assert path.name == f"batch_{number:04d}.parquet"
        table = pq.read_table(path)
        assert table.schema.field("batch").type == pa.int32()
        assert table.schema.field("order").type == pa.int32()
        batch_rows = table.to_pylist()
        assert [r["batch"] for r in batch_rows] == [number] * len(batch_rows)
        assert [r["order"] for r in batch_rows] == list(range(len(batch_rows)))
        rows += batch_rows
    return rows


def test_fraction_one_batches_every_tile_once_in_read_order(tables, tmp_path):
    rows = _batch(tmp_path / "out", tables, "--batch-size", 7)
    keys = [(r["slide_id"], r["tile_id"]) for r in rows]
    assert len(keys) == len(set(keys)) == 30 + 8 + 21
    assert keys == sorted(keys)  # by slide, then row, then column (tile ids sort that way)
    sizes = np.bincount([r["batch"] for r in rows])
    assert sizes.tolist() == [7] * 8 + [3]
    source = pq.read_table(tables[0]).to_pylist()[0]
    first_b = next(r for r in rows if r["slide_id"] == "slide-B")
    assert {k: first_b[k] for k in source} == source  # tile columns carried unchanged


def test_same_seed_same_tiles_and_smaller_fractions_nest(tables, tmp_path):
    def sample(name, fraction, seed, order=tables):
        rows = _batch(tmp_path / name, order, "--fraction", fraction, "--seed", seed)
        return {(r["slide_id"], r["tile_id"]) for r in rows}

    first = sample("a", 0.3, 1)
    assert len(first) == round(0.3 * 59)
    assert sample("b", 0.3, 1, tables[::-1]) == first  # order of the tables does not matter
    assert sample("c", 0.3, 2) != first
    assert first < sample("d", 0.6, 1)
    assert {s for s, _ in first} == {"slide-A", "slide-B", "slide-C"}


def test_sampling_is_spread_over_slides(tmp_path):
    tables = [_tile_table(tmp_path / f"{i}.tiles.parquet", f"s{i}", 10, 10) for i in range(4)]
    rows = _batch(tmp_path / "out", tables, "--fraction", 0.25, "--batch-size", 1000)
    counts = np.unique([r["slide_id"] for r in rows], return_counts=True)[1]
    assert counts.sum() == 100 and counts.min() >= 12  # binomial(100, 1/4) each: ~25 ± 4


def _bad_batch(tmp_path, capsys, tables, *flags) -> str:
    out = tmp_path / "out"
    code = main(["batch", *map(str, tables), "--out", str(out), *map(str, flags)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("bmseg batch: error: ")
    assert not out.exists() or not any(out.iterdir())
    return err[0]


def test_duplicate_slide_ids_are_refused(tables, tmp_path, capsys):
    twin = _tile_table(tmp_path / "twin.tiles.parquet", "slide-A", 2, 2)
    message = _bad_batch(tmp_path, capsys, [*tables, twin])
    assert "slide-A" in message and "twin.tiles.parquet" in message
    assert "a.tiles.parquet" in message


@pytest.mark.parametrize("fraction", [0, -0.5, 1.01, 2])
def test_fraction_outside_zero_one_is_refused(tables, tmp_path, capsys, fraction):
    assert "--fraction" in _bad_batch(tmp_path, capsys, tables, "--fraction", fraction)


def test_bad_batch_size_and_tables(tables, tmp_path, capsys):
    assert "--batch-size" in _bad_batch(tmp_path, capsys, tables, "--batch-size", 0)
    assert "absent.parquet" in _bad_batch(tmp_path, capsys, [tmp_path / "absent.parquet"])
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"x": [1]}), other)
    assert "not a tile table" in _bad_batch(tmp_path, capsys, [other])
    junk = tmp_path / "junk.parquet"
    junk.write_text("no parquet here")
    assert "junk.parquet" in _bad_batch(tmp_path, capsys, [junk])


def test_empty_tile_tables_write_no_batch(tmp_path, caplog):
    empty = _tile_table(tmp_path / "e.tiles.parquet", "empty", 2, 2, kept_every=10**6)
    pq.write_table(pq.read_table(empty).slice(0, 0), empty)
    assert _batch(tmp_path / "out", [empty]) == []
    assert "no tiles" in caplog.text
