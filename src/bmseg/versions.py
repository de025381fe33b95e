"""Versions of bmseg and the packages its results depend on, for provenance records."""

from __future__ import annotations

import platform
from importlib import metadata

from bmseg import __version__

TRACKED_PACKAGES = (
    "numpy",
    "pyarrow",
    "pylibCZIrw",
    "tifffile",
    "zarr",
    "h5py",
    "hdf5plugin",
    "scikit-image",
    "scikit-learn",
    "torch",
    "torchvision",
    "sam2",
    "cellpose",
)


def package_versions() -> dict[str, str]:
    """Return ``{name: version}`` for Python, bmseg and every tracked package that is installed.

    Reads installed metadata only, so it never imports torch or the models.
    """
    versions = {"python": platform.python_version(), "bmseg": __version__}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def versions_yaml(process: str) -> str:
    """Render :func:`package_versions` as the ``versions.yml`` block an nf-core process emits."""
    lines = [f'"{process}":']
    lines += [f'    {name}: "{version}"' for name, version in package_versions().items()]
    return "\n".join(lines) + "\n"
