"""Shared fixtures: where the real Zeiss files live, and small synthetic slides made per session."""

from __future__ import annotations

import hashlib
import inspect
import shutil
from pathlib import Path

import numpy as np
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


@pytest.fixture(scope="session")
def test_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models directory of random-initialised checkpoints, by `bmseg models make-test`."""
    from bmseg.cli import main

    dest = tmp_path_factory.mktemp("models")
    assert main(["-q", "models", "make-test", "--dest", str(dest)]) == 0
    return dest


def demo_models_key() -> str:
    """Version of everything that shapes make-demo's weights: the code that renders the synthetic
    slides, shows them to the models and trains, and the versions of Cellpose and torch."""
    from importlib.metadata import version

    from bmseg import pixels, synthetic
    from bmseg.models import making, training

    digest = hashlib.sha256()
    for part in (
        inspect.getsource(making),
        inspect.getsource(training),
        inspect.getsource(synthetic),
        inspect.getsource(pixels.to_rgb8),
        version("cellpose"),
        version("torch"),
    ):
        digest.update(part.encode("utf-8"))
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def demo_models_dir(request: pytest.FixtureRequest) -> Path:
    """`bmseg models make-demo`'s folder, built once and kept in the pytest cache under the
    version of the code that makes it (so CI and reruns train it once); older builds go."""
    from bmseg.models.making import make_demo_models

    cache = Path(request.config.cache.mkdir("bmseg-demo-models"))
    key = demo_models_key()
    dest = cache / key
    if not (dest / "manifest.json").is_file():
        for stale in cache.iterdir():
            if not stale.name.startswith("."):  # a dot name is a build still under way
                shutil.rmtree(stale, ignore_errors=True)
        make_demo_models(dest, seed=0, progress=False)
    return dest


@pytest.fixture
def make_czi(tmp_path: Path):
    """Write a small CZI: ``make_czi(name, [(x, y, array), ...], pixel_size_um)`` -> path.

    Arrays are (h, w, 3) uint8 RGB (written as Bgr24) or (h, w) gray, placed at slide (x, y);
    ``pixel_size_um=None`` leaves the scaling out of the metadata.
    """
    from pylibCZIrw import czi

    def make(name: str, tiles: list, pixel_size_um: float | None = 0.5) -> Path:
        path = tmp_path / name
        with czi.create_czi(str(path), exist_ok=True) as writer:
            for x, y, array in tiles:
                data = array[:, :, ::-1] if array.ndim == 3 else array[:, :, None]
                writer.write(np.ascontiguousarray(data), location=(x, y))
            scale = pixel_size_um * 1e-6 if pixel_size_um else 0.0
            writer.write_metadata(document_name=name, scale_x=scale, scale_y=scale)
        return path

    return make
