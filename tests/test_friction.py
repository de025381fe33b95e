"""A newcomer's friction: help texts with defaults, clean logs, refusals that say what to do."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bmseg.cli import build_parser

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
