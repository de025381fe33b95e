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
