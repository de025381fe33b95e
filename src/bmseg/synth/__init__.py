"""Synthetic slides: real CZI mosaics with tissue, planted MK- and HSPC-like cells, and their truth.

``bmseg synth OUT.czi`` writes a CZI with pylibCZIrw, one subblock per 1024 × 1024 mosaic tile,
pixel size 0.1725 µm in its metadata, plus ``OUT.truth.parquet`` listing every planted cell.
Everything derives from ``--seed``:

* tissue: a smooth random field sampled every 32 px, thresholded after bilinear interpolation,
  so any pixel's tissue state is computed the same way in whichever tile draws it;
* cells: placed once for the whole slide (MKs first, then HSPCs), each a polygon in slide
  pixels, kept only where it lies wholly in tissue and clear of every other cell;
* pixels: each mosaic tile is rendered on its own (tissue, then the cells whose box meets the
  tile, then noise), so the slide is never held in memory. A cell is rasterised in its own
  box and that mask is pasted into every tile it meets, so a cell spanning tiles is drawn
  exactly as its truth mask was measured.

Mosaic tiles far from any tissue are not acquired, as a scanner's tile regions would leave them.
The truth's areas and centroids are measured on the rasterised masks, not the parametric shapes.

``--density marrow`` packs the tissue as marrow is packed (~6 000 cells per 3000² of tissue instead
of ~120): MKs placed as above, then every free stretch of tissue tiled by small round-ish
cells (the Voronoi cells of a jittered hexagonal grid, each shrunk by 1.5 px so neighbours
touch, 1–3 px apart, without sharing a pixel), all planted as HSPC-like cells.

The package: :mod:`~bmseg.synthetic` (tissue, cells, pixels, truth),
:mod:`~bmseg.synth.writing` (the CZI files) and :mod:`~bmseg.synth.frames` (single test frames).
"""

from __future__ import annotations

from bmseg.synth.frames import blank_frame, section_image
from bmseg.synth.writing import (
    describe_channels,
    truth_path_for,
    write_frames_czi,
    write_synthetic_slide,
)
from bmseg.synthetic import (
    MOSAIC_TILE,
    PIXEL_SIZE_UM,
    PlantedCell,
    SyntheticLayout,
    cell_mask,
    lobed_outline,
    make_hspc,
    polygon_area,
    truth_labels,
    truth_table,
)

__all__ = [
    "MOSAIC_TILE",
    "PIXEL_SIZE_UM",
    "PlantedCell",
    "SyntheticLayout",
    "blank_frame",
    "cell_mask",
    "describe_channels",
    "lobed_outline",
    "make_hspc",
    "polygon_area",
    "section_image",
    "truth_labels",
    "truth_path_for",
    "truth_table",
    "write_frames_czi",
    "write_synthetic_slide",
]
