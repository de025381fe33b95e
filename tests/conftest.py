"""Shared fixtures: where the real Zeiss files live, and small synthetic slides made per session."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_CZI = REPO_ROOT.parent / "shared" / "czi"


@pytest.fixture(scope="session")
def shared_czi() -> Path:
    """The folder of real Zeiss CZI files beside the checkout; tests using it skip without it."""
    if not SHARED_CZI.is_dir():
        pytest.skip("../shared/czi is absent (real Zeiss test files)")
    return SHARED_CZI


@pytest.fixture(scope="session")
def synthetic_slide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 4000 x 4000 px brightfield synthetic CZI (seed 0) and its truth table, made once."""
    from bmseg.synth import write_synthetic_slide

    czi_path = tmp_path_factory.mktemp("synthetic") / "synthetic.czi"
    truth_path = write_synthetic_slide(czi_path, 4000, 4000, seed=0, modality="brightfield")
    return czi_path, truth_path
