"""SEGMENT: turn one batch of tiles into cells, masks, gallery crops and a run record.

``bmseg segment BATCH --slides SLIDE_FILES... --models DIR --out DIR`` reads every tile of the
batch (core + margin, the ``read_*`` window) with a prefetching pool of reader threads while
the device segments, keeps the cells whose centroid lies in the tile's core, measures them
(:mod:`bmseg.features`), embeds their crops in batches and streams the rows to
``cells.parquet``, ``crops.parquet`` and ``masks.h5``; ``batch.json`` is written last.

The work itself is :func:`segment_batch`, which takes the segmenters and the embedder as
arguments: the command (:func:`segment_batch_file`) passes the production models, tests pass
their own implementations of :mod:`bmseg.models.base` through exactly the same path. See
docs/cells.md, docs/data.md and docs/architecture.md (which module holds what).
"""

from bmseg.segment.cells import hspc_windows, keep_owned
from bmseg.segment.engine import segment_batch
from bmseg.segment.options import SegmentOptions
from bmseg.segment.run import segment_batch_file
from bmseg.segment.tiles import Tile, TileReader, read_batch_table, read_plans

__all__ = [
    "SegmentOptions",
    "Tile",
    "TileReader",
    "hspc_windows",
    "keep_owned",
    "read_batch_table",
    "read_plans",
    "segment_batch",
    "segment_batch_file",
]
