"""A newcomer's friction: help texts with defaults, clean logs, refusals that say what to do."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from bmseg.cli import build_parser, main
from bmseg.testing.cells import cells_table, write_batch, write_plan

IMPORT_CELLPOSE = (
    "import logging, sys; logging.basicConfig(stream=sys.stderr); {first}import cellpose.models"
)


def _stderr_of(code: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    return done.stderr


def test_cellpose_optional_backbone_warning_is_silenced():
    """Cellpose warns at import that dinov3 (CPDINO) is missing; bmseg never uses that model."""
    assert "dinov3" in _stderr_of(IMPORT_CELLPOSE.format(first=""))  # what users saw
    assert "dinov3" not in _stderr_of(IMPORT_CELLPOSE.format(first="import bmseg; "))


def _commands(parser, prefix=()):
    """(command words, parser) for every sub-command, nested ones (``models fetch``) included."""
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield (*prefix, name), sub
                yield from _commands(sub, (*prefix, name))


def _shows_default(help_text: str, default) -> bool:
    """Whether the expanded help names the default: ``(0.5)``, ``default: random``..."""
    spellings = {str(default)}
    if isinstance(default, float):
        spellings.add(f"{default:g}")
    return any(spelling in help_text for spelling in spellings)


def test_every_option_has_help_and_shows_its_default():
    """A user reads a flag's meaning and default in --help, without opening the docs."""
    missing = []
    top = build_parser()
    for parser in [top] + [sub for _, sub in _commands(top)]:
        for action in parser._actions:
            if action.__class__.__name__ == "_SubParsersAction":
                listed = {choice.dest: choice.help for choice in action._choices_actions}
                missing += [
                    f"bmseg ... {name}: no help" for name in action.choices if not listed.get(name)
                ]
    for words, parser in _commands(top):
        for action in parser._actions:
            kind = action.__class__.__name__
            if kind in ("_HelpAction", "_VersionAction", "_SubParsersAction"):
                continue
            flag = action.option_strings[-1] if action.option_strings else action.dest
            where = f"bmseg {' '.join(words)} {flag}"
            if not action.help:
                missing.append(f"{where}: no help")
                continue
            help_text = parser._get_formatter()._expand_help(action)
            default = action.default
            empty = default is None or default is False or default in ([], ())
            has_value = not empty and kind not in (
                "_StoreTrueAction",
                "_StoreFalseAction",
                "BooleanOptionalAction",
            )
            if has_value and not _shows_default(help_text, action.default):
                missing.append(f"{where}: default {action.default!r} not shown")
    assert not missing, "\n".join(missing)


def test_batch_fraction_help_names_the_pipeline_default():
    """The CLI samples every tile by default, the pipeline a tenth: the help says both."""
    (batch,) = [parser for words, parser in _commands(build_parser()) if words == ("batch",)]
    (fraction,) = [a for a in batch._actions if "--fraction" in a.option_strings]
    assert "(1.0" in fraction.help and "--sample_fraction defaults to 0.1" in fraction.help


@pytest.fixture(scope="module")
def gathered_and_labels(tmp_path_factory):
    """A gathered slide of 40 HSPCs and a label file beside it, 20 yes and 20 no."""
    root = tmp_path_factory.mktemp("friction")
    table = cells_table(
        [100.0 + 60 * i for i in range(40)], [100.0] * 40, [12.0] * 40, slide_id="s1",
        tile_id="r0000c0000", cell_type="HSPC", signal=[i % 2 for i in range(40)],
        embedding_dim=16,
    )  # fmt: skip
    write_batch(root / "batch", [table])
    write_plan(root / "plans", "s1", tissue_area_mm2=1.0)
    gathered = root / "gathered"
    gather = ["gather", str(root / "batch"), "--plans", str(root / "plans")]
    assert main([*gather, "--out", str(gathered)]) == 0
    labels = [
        {"cell_uid": uid, "label": "yes" if i % 2 else "no", "annotator": "a",
         "time": "2026-12-01T09:00:00Z"}
        for i, uid in enumerate(table["cell_uid"].to_pylist())
    ]  # fmt: skip
    (root / "labels.json").write_text(json.dumps({"version": 1, "labels": labels}))
    return gathered, root / "labels.json"


@pytest.mark.parametrize("where", ["models", "gathered", "labels folder"])
def test_train_refuses_a_weights_folder_or_its_own_inputs(
    gathered_and_labels, test_models_dir, tmp_path, capsys, where
):
    gathered, labels = gathered_and_labels
    if where == "models":  # what `bmseg models fetch/make-test --dest models` leaves
        out = tmp_path / "models"
        out.mkdir()
        shutil.copy(test_models_dir / "manifest.json", out)
        message = "a segmentation models folder (manifest.json)"
    else:
        out = gathered if where == "gathered" else labels.parent
        message = "holds the input"
    before = sorted(p.name for p in out.iterdir())
    assert main(["train", str(gathered), str(labels), "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in error and "--out classifiers" in error
    assert sorted(p.name for p in out.iterdir()) == before  # nothing written


@pytest.mark.parametrize(
    ("weights", "why"),
    [
        ("test", "random test weights (bmseg models make-test)"),
        ("demo", "demo weights (bmseg models make-demo), which find only the HSPCs of bmseg synth"),
        ("real", "SEGMENT found no cells in the segmented tiles"),
    ],
)
def test_pages_on_a_run_without_cells_says_why_and_what_to_do(tmp_path, capsys, weights, why):
    empty = cells_table([], [], [], slide_id="s1", tile_id="r0000c0000", cell_type="HSPC")
    batch = write_batch(tmp_path / "batch", [empty], tiles=[("s1", "r0000c0000")])
    record = json.loads((batch / "batch.json").read_text())
    manifest = record["models"]["manifest"]  # what SEGMENT records of the models' manifest.json
    manifest["random_init"] = weights != "real"
    if weights == "demo":
        manifest["training"] = {"kind": "demo"}
    (batch / "batch.json").write_text(json.dumps(record))
    write_plan(tmp_path / "plans", "s1", tissue_area_mm2=1.0)
    gathered = tmp_path / "gathered"
    gather = ["gather", str(batch), "--plans", str(tmp_path / "plans"), "--out", str(gathered)]
    assert main(gather) == 0
    capsys.readouterr()
    assert main(["pages", str(gathered), "--out", str(tmp_path / "site")]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no cells to show" in error and why in error and "bmseg models fetch" in error
    assert not (tmp_path / "site").exists()
