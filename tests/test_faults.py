"""Fault injection (issue 15): SIGKILL mid-write, a read-only folder and a full disk.

What every step promises (docs/promises.md): its ``--out`` folder holds the previous complete
set or the new complete set, never a mix that a reader takes for finished; a rerun leaves only
its own files; a full or read-only disk is one line and exit 2, never a traceback or a crash.
The kills are real ``SIGKILL``s of a real ``bmseg`` process, sent at the n-th file rename
(``os.replace``) of its run: early (while the outputs are written under temporary names) and
late (while the finished set is renamed into place).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from bmseg.errors import BmsegError
from bmseg.storage import MANIFEST, STAGING_PREFIX, check_complete, read_manifest
from bmseg.testing.cells import cells_table, write_batch, write_plan

KILLER = """
import os, signal, sys
import bmseg.storage as storage
kill_at, in_commit = int(sys.argv[1]), sys.argv[2] == "commit"
real_replace, real_commit, count = os.replace, storage._commit, [0]
counting = [not in_commit]
def replace(source, target):
    if counting[0]:
        count[0] += 1
        if count[0] >= kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    real_replace(source, target)
def commit(staging, out):
    counting[0] = True
    real_commit(staging, out)
os.replace, storage._commit = replace, commit
from bmseg.cli import main
sys.exit(main(sys.argv[3:]))
"""


def bmseg_killed(args: list[str], kill_at: int, phase: str) -> int:
    """Run ``bmseg ARGS`` in a child that SIGKILLs itself at its ``kill_at``-th rename, counted
    from the start (``phase`` "write") or from the start of the output set's commit."""
    run = subprocess.run(
        [sys.executable, "-c", KILLER, str(kill_at), phase, *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return run.returncode


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every visible file below ``folder`` (what a reader globs)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    }


def _tile_table(path: Path, tiles: int = 5) -> Path:
    """A tile table of ``tiles`` tiles of slide t1, in PLAN's schema."""
    import pyarrow as pa

    from bmseg.contract import TILE_SCHEMA

    columns = {name: list(range(tiles)) for name in TILE_SCHEMA.names}
    columns.update(slide_id=["t1"] * tiles, tile_id=[f"r0000c{i:04d}" for i in range(tiles)])
    pq.write_table(pa.table(columns).cast(TILE_SCHEMA), path)
    return path


def batch_dir(root: Path, slides: list[str], cells_each: int = 3) -> Path:
    """A SEGMENT output with ``cells_each`` HSPCs on each of ``slides``, and their plans."""
    tables = []
    for index, slide in enumerate(slides):
        n = cells_each
        tables.append(
            cells_table(
                np.arange(n) * 200.0 + 100, np.full(n, 300.0), np.full(n, 12.0),
                slide_id=slide, tile_id="r0000c0000", cell_type="HSPC", embedding_dim=8,
                seed=index,
            )
        )  # fmt: skip
        write_plan(root / "plans", slide, tissue_area_mm2=1.0)
    return write_batch(root / f"batch-{'-'.join(slides)}", tables)


@pytest.fixture(scope="module")
def gather_inputs(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("faults")
    return batch_dir(root, ["a"]), batch_dir(root, ["a", "b", "c"]), root / "plans"


def gather_args(batch: Path, plans: Path, out: Path) -> list[str]:
    return ["gather", str(batch), "--plans", str(plans), "--out", str(out)]


@pytest.mark.parametrize(
    "kill_at, phase, left",
    [
        (1, "write", "old"),  # the first finished output, under its temporary name
        (4, "write", "old"),
        (1, "commit", "old"),  # the commit's first step: marking the folder incomplete
        (2, "commit", "incomplete"),  # after the first output renamed into place
        (6, "commit", "incomplete"),
    ],
)
def test_a_gather_killed_mid_write_leaves_the_old_set_or_a_folder_marked_incomplete(
    gather_inputs, tmp_path, kill_at, phase, left
):
    from bmseg.cli import main

    small, large, plans = gather_inputs
    out = tmp_path / "gathered"
    assert main(gather_args(small, plans, out)) == 0
    before = digest(out)
    assert bmseg_killed(gather_args(large, plans, out), kill_at, phase) == -signal.SIGKILL
    if left == "old":  # nothing renamed into place yet: the old set, untouched and complete
        assert digest(out) == before
        check_complete(out)
    else:  # half renamed: readers refuse the folder instead of taking it for finished
        assert not read_manifest(out)["complete"]
        with pytest.raises(BmsegError, match="interrupted"):
            check_complete(out)
        assert main(["pages", str(out), "--out", str(tmp_path / "site")]) == 2
    assert main(gather_args(large, plans, out)) == 0  # a rerun repairs it
    check_complete(out)
    assert not list(out.glob(f"{STAGING_PREFIX}*"))
    fresh = tmp_path / "fresh"
    assert main(gather_args(large, plans, fresh)) == 0
    assert digest(out).keys() == digest(fresh).keys()  # only its own files, none of the first run
    assert (
        json.loads((out / MANIFEST).read_text())["files"]
        == json.loads((fresh / MANIFEST).read_text())["files"]
    )


def test_every_step_killed_at_its_first_rename_keeps_its_previous_set(tmp_path):
    """batch, train, classify and pages: a kill before the commit changes nothing visible, a
    kill during it is refused by the readers until a rerun repairs it."""
    from bmseg.cli import main

    batch = batch_dir(tmp_path, ["p", "q"], cells_each=30)
    gathered = tmp_path / "gathered"
    assert main(gather_args(batch, tmp_path / "plans", gathered)) == 0
    labels = tmp_path / "labels.json"
    tables = sorted(gathered.glob("*.cells.parquet"))
    uids = [uid for f in tables for uid in pq.read_table(f)["cell_uid"].to_pylist()]
    records = [
        {"cell_uid": uid, "label": ("no", "yes")[i % 2], "annotator": "a", "time": "2026-01-01"}
        for i, uid in enumerate(uids)
    ]
    labels.write_text(json.dumps({"version": 1, "labels": records}))
    steps = {
        "batch": ["batch", str(_tile_table(tmp_path / "t1.tiles.parquet")), "--batch-size", "2"],
        "train": ["train", str(gathered), str(labels), "--folds", "2", "--pca-components", "2"],
        "pages": ["pages", str(gathered)],
    }
    for name, args in steps.items():
        out = tmp_path / name
        assert main([*args, "--out", str(out)]) == 0, name
        before = digest(out)
        assert bmseg_killed([*args, "--out", str(out)], 1, "write") == -signal.SIGKILL, name
        assert digest(out) == before, name
        check_complete(out)
    classify = ["classify", str(gathered), "--classifiers", str(tmp_path / "train")]
    out = tmp_path / "classified"
    assert main([*classify, "--out", str(out)]) == 0
    before = digest(out)
    assert bmseg_killed([*classify, "--out", str(out)], 2, "commit") == -signal.SIGKILL
    with pytest.raises(BmsegError, match="interrupted"):
        check_complete(out)
    assert main([*classify, "--out", str(out)]) == 0
    assert digest(out).keys() == before.keys()


# ---- a read-only folder and a full disk: a small tmpfs in a private mount namespace ----------
def _namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--map-root-user", "--mount", "sh", "-c",
         "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d && umount $d"],
        capture_output=True,
    )  # fmt: skip
    return probe.returncode == 0


needs_mounts = pytest.mark.skipif(
    not _namespaces_work(), reason="no user/mount namespaces here to mount a small tmpfs"
)


def bmseg_on_tmpfs(args: list[str], mount: Path, size: str, readonly: bool = False):
    """Run ``bmseg ARGS`` with a fresh tmpfs of ``size`` mounted at ``mount`` (read-only if
    asked) in a private mount namespace: nothing is mounted on the machine itself."""
    mount.mkdir(parents=True, exist_ok=True)
    remount = f" && mount -o remount,ro {mount}" if readonly else ""
    script = f'mount -t tmpfs -o size={size} tmpfs {mount}{remount} && exec "$@"'
    return subprocess.run(
        ["unshare", "--map-root-user", "--mount", "sh", "-c", script, "sh",
         sys.executable, "-m", "bmseg.cli", *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _one_line_exit_2(run: subprocess.CompletedProcess, *words: str) -> None:
    err = run.stderr.strip().splitlines()
    errors = [line for line in err if ": error: " in line]
    assert run.returncode == 2, run.stderr
    assert len(errors) == 1 and "Traceback" not in run.stderr, run.stderr
    for word in words:
        assert word in errors[0], errors[0]


@needs_mounts
def test_a_read_only_out_is_one_line(gather_inputs, tmp_path):
    small, _, plans = gather_inputs
    mount = tmp_path / "ro"
    run = bmseg_on_tmpfs(gather_args(small, plans, mount / "gathered"), mount, "1m", readonly=True)
    _one_line_exit_2(run, str(mount / "gathered"), "read-only")


@needs_mounts
@pytest.mark.parametrize("size", ["12k", "40k", "80k"])
def test_a_full_disk_is_one_line_and_exit_2(gather_inputs, tmp_path, size):
    _, large, plans = gather_inputs
    mount = tmp_path / "small"
    run = bmseg_on_tmpfs(gather_args(large, plans, mount / "gathered"), mount, size)
    _one_line_exit_2(run, "No space left on device", "free space")


@needs_mounts
def test_a_full_disk_while_writing_a_site_is_one_line(gather_inputs, tmp_path):
    from bmseg.cli import main

    _, large, plans = gather_inputs
    gathered = tmp_path / "gathered"
    assert main(gather_args(large, plans, gathered)) == 0
    mount = tmp_path / "small"
    run = bmseg_on_tmpfs(["pages", str(gathered), "--out", str(mount / "site")], mount, "24k")
    _one_line_exit_2(run, "No space left on device")


@needs_mounts
def test_a_full_disk_in_segment_is_one_line_not_a_crash(tmp_path, test_models_dir):
    """HDF5 meeting a full disk mid-file crashed the process on close (exit 139)."""
    from bmseg.cli import main
    from bmseg.synth import write_synthetic_slide

    slide = tmp_path / "s1.czi"
    write_synthetic_slide(slide, 1200, 1200, seed=1)
    assert main(["plan", str(slide), "--out", str(tmp_path / "plans")]) == 0
    tiles = tmp_path / "plans" / "s1.tiles.parquet"
    assert main(["batch", str(tiles), "--out", str(tmp_path / "batches")]) == 0
    mount = tmp_path / "small"
    args = ["segment", str(tmp_path / "batches" / "batch_0000.parquet"), "--slides", str(slide)]
    args += ["--models", str(test_models_dir), "--device", "cpu", "--no-progress"]
    run = bmseg_on_tmpfs([*args, "--out", str(mount / "seg")], mount, "24k")
    _one_line_exit_2(run, "No space left on device", str(mount / "seg"))


def test_a_killed_segment_rerun_keeps_the_earlier_set_whole(tmp_path, test_models_dir):
    """The earlier batch.json is never left beside a rerun's half-written tables."""
    from bmseg.cli import main
    from bmseg.synth import write_synthetic_slide

    slide = tmp_path / "s1.czi"
    write_synthetic_slide(slide, 1200, 1200, seed=2)
    assert main(["plan", str(slide), "--out", str(tmp_path / "plans")]) == 0
    tiles = tmp_path / "plans" / "s1.tiles.parquet"
    assert main(["batch", str(tiles), "--out", str(tmp_path / "batches")]) == 0
    args = ["segment", str(tmp_path / "batches" / "batch_0000.parquet"), "--slides", str(slide)]
    args += ["--models", str(test_models_dir), "--device", "cpu", "--no-progress"]
    out = tmp_path / "seg"
    assert main([*args, "--out", str(out)]) == 0
    before = digest(out)
    assert bmseg_killed([*args, "--out", str(out)], 2, "write") == -signal.SIGKILL
    assert digest(out) == before
    check_complete(out)
