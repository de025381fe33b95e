"""The models directory: which file holds which model, and the manifest describing them.

```
MODELS_DIR/
  manifest.json           which files and which SAM2 config (written by fetch / make-test)
  sam2.1_hiera_large.pt   SAM2.1 checkpoint ({"model": state_dict}, SAM2's own format)
  cpsam                   Cellpose-SAM weights (Cellpose's own state-dict file)
  resnet50.pth            torchvision ResNet-50 state dict (ImageNet weights)
```

A directory without ``manifest.json`` is read with the production defaults above, so weights
copied in by hand work too. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from bmseg.errors import BmsegError
from bmseg.storage import write_json

MANIFEST_NAME = "manifest.json"
FETCH_HINT = "bmseg models fetch --dest DIR"

SAM2_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_large.pt"
"""From SAM2's checkpoints/download_ckpts.sh (release 092824, SAM 2.1)."""


@dataclass(frozen=True)
class Manifest:
    """What a models directory holds. ``random_init`` marks random-initialised checkpoints
    (make-test; make-demo's SAM2 and ResNet-50).

    ``sam2_image_size`` overrides the config's input resolution (1024) without touching the
    weights; only the test models use it (256), to keep CPU tests fast. ``description`` says in
    words what the weights are (logged when they load); ``training`` records how a trained
    Cellpose-SAM was made (make-demo, finetune): parent model, data, settings, validation AP.
    """

    sam2_checkpoint: str = "sam2.1_hiera_large.pt"
    sam2_config: str = "configs/sam2.1/sam2.1_hiera_l.yaml"
    sam2_image_size: int | None = None
    cellpose_checkpoint: str = "cpsam"
    resnet50_weights: str = "resnet50.pth"
    random_init: bool = False
    sha256: dict[str, str] | None = None
    """``{file name: sha256}`` recorded by fetch / make-test; loading checks every file."""
    description: str = ""
    training: dict | None = None

    def files(self) -> dict[str, str]:
        """``{model: file name}`` for the three weight files."""
        return {
            "sam2": self.sam2_checkpoint,
            "cellpose": self.cellpose_checkpoint,
            "resnet50": self.resnet50_weights,
        }


def read_manifest(models_dir: Path) -> Manifest:
    """The manifest of ``models_dir``, or the production defaults when it has none."""
    if not models_dir.is_dir():
        raise BmsegError(f"{models_dir}: models directory not found; run `{FETCH_HINT}`")
    path = models_dir / MANIFEST_NAME
    if not path.exists():
        return Manifest()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Manifest(**data)
    except (ValueError, TypeError) as error:
        raise BmsegError(
            f"{path}: not a valid models manifest ({error}); rerun `{FETCH_HINT}`"
        ) from error


def write_manifest(manifest: Manifest, models_dir: Path) -> Path:
    """Write ``manifest.json`` into ``models_dir`` atomically, with the weight files' sha256."""
    sums = {name: file_sha256(models_dir / name) for name in manifest.files().values()}
    return write_json(asdict(replace(manifest, sha256=sums)), models_dir / MANIFEST_NAME)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 8 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(manifest: Manifest, paths: dict[str, Path]) -> None:
    """BmsegError for a weight file whose sha256 is not the one the manifest recorded: a bit
    flipped on disk or a file replaced loads silently otherwise, and segments wrongly."""
    for path in paths.values():
        expected = (manifest.sha256 or {}).get(path.name)
        if expected is not None and file_sha256(path) != expected:
            raise BmsegError(
                f"{path}: its sha256 is not the one {MANIFEST_NAME} recorded (damaged or "
                f"replaced since it was written); delete it and rerun `{FETCH_HINT}`"
            )


def weight_path(models_dir: Path, file_name: str) -> Path:
    """Path of a weight file, or a one-line error naming it and the fetch command."""
    path = models_dir / file_name
    if not path.is_file():
        raise BmsegError(f"{path}: model weights missing; run `{FETCH_HINT}` to download them")
    return path


def corrupt(path: Path, what: str, error: Exception) -> BmsegError:
    """The one-line error for a weight file that exists but does not load."""
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return BmsegError(
        f"{path}: not a valid {what} checkpoint ({reason[:120]}); "
        f"delete it and rerun `{FETCH_HINT}`"
    )
