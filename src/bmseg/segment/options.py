"""The settings of one SEGMENT run that are not models (what :func:`segment_batch` takes)."""

from __future__ import annotations

from dataclasses import dataclass, field

from bmseg.contract import GALLERY_CROP_PX
from bmseg.models.settings import EmbedderSettings, HSPCSettings, MKSettings


@dataclass(frozen=True)
class SegmentOptions:
    """Knobs of :func:`segment_batch` that are not models."""

    mk_min_area_um2: float = MKSettings.min_area_um2
    mk_max_area_um2: float = MKSettings.max_area_um2
    hspc_min_area_um2: float = HSPCSettings.min_area_um2
    hspc_max_area_um2: float = HSPCSettings.max_area_um2
    readers: int = 2
    workers: int = 2
    measure_processes: bool = False
    """Measure cells in ``workers`` processes (free of the GIL, for hosts with many cores)
    instead of on the worker threads; docs/benchmarks.md has what each costs. The processes
    import the caller's main script as multiprocessing does: a script that turns this on must
    keep its work under ``if __name__ == "__main__":``."""
    gpu_batch_tiles: int = 1
    embed_batch: int = EmbedderSettings.batch_size
    """Host crops cut and embedded per call for an embedder that takes crops only
    (:func:`bmseg.segment.cells.embed_cells`). ResNet-50 cuts its own crops and batches them by
    its ``EmbedderSettings.batch_size``; ``bmseg segment --embed-batch`` sets both to one value."""
    hspc_embed_px: int | None = None
    """The side HSPC crops are embedded at (None: the embedder's crop size, as MKs'); see
    :func:`bmseg.segment.cells.embed_cells`."""
    crop_px: int = GALLERY_CROP_PX
    device: str = "cpu"
    progress: bool = True
    intensity: dict[str, dict] = field(default_factory=dict)
    """Per slide id, slide.json's ``intensity`` (``--plans``): the models' intensity scale."""
    slide_choices: dict[str, dict] = field(default_factory=dict)
    """Per slide id, the modality and plane PLAN read (``--plans``), as open_slide keywords."""
