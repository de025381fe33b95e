"""Models behind one small interface: segmenters that turn tiles into labelled cells, and an
embedder that turns cell crops into feature vectors. A step never cares which backend it runs.

``load_models``, ``ModelSet`` and ``resolve_device`` import torch and the model libraries, so
they are loaded on first use; importing this package stays cheap for the command-line parser.
"""

from __future__ import annotations

import importlib
from typing import Any

from bmseg.models.base import Detections, Embedder, Segmenter
from bmseg.models.settings import EmbedderSettings, HSPCSettings, MKSettings

_LAZY = {
    "load_models": "bmseg.models.loading",
    "ModelSet": "bmseg.models.loading",
    "resolve_device": "bmseg.models.device",
}

__all__ = [
    "Detections",
    "Embedder",
    "EmbedderSettings",
    "HSPCSettings",
    "MKSettings",
    "ModelSet",
    "Segmenter",
    "load_models",
    "resolve_device",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
