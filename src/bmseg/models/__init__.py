"""Models behind one small interface: segmenters that turn tiles into labelled cells, and an
embedder that turns cell crops into feature vectors. A step never cares which backend it runs."""

from bmseg.models.base import Detections, Embedder, Segmenter

__all__ = ["Detections", "Embedder", "Segmenter"]
