"""``bmseg segment`` as a function: one batch table, its slide files and a models folder in, one
batch folder (cells.parquet, crops.parquet, masks.h5, batch.json) out, written as a set."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bmseg.contract import GALLERY_CROP_PX
from bmseg.errors import BmsegError
from bmseg.models import load_models
from bmseg.models.choices import DEFAULT_ATTENTION
from bmseg.models.settings import EmbedderSettings, HSPCSettings, MKSettings
from bmseg.segment.engine import segment_batch
from bmseg.segment.options import SegmentOptions
from bmseg.segment.tiles import check_tiles, read_batch_table, read_plans, slide_pixel_sizes
from bmseg.slide import open_slide
from bmseg.slide_args import match_slides
from bmseg.storage import output_set

log = logging.getLogger(__name__)


def segment_batch_file(
    batch: Path,
    slides: Sequence[str],
    models_dir: Path,
    out: Path,
    *,
    slide_ids: Sequence[str] | None = None,
    plans: Sequence[str] = (),
    device: str = "auto",
    mk: MKSettings | None = None,
    hspc: HSPCSettings | None = None,
    embedder: EmbedderSettings | None = None,
    readers: int = 2,
    workers: int = 2,
    measure_processes: bool = False,
    gpu_batch_tiles: int = 1,
    crop_px: int = GALLERY_CROP_PX,
    attention: str = DEFAULT_ATTENTION,
    compile_networks: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Segment the batch table ``batch`` into ``out``; return batch.json's content.

    Everything is validated before the models load: the batch table, which of ``slides`` (file
    names, or ``ID=PATH``) is which slide, the counts, ``plans`` (the slides' slide.json) and
    every tile's window against its slide. ``slide_ids`` names each of ``slides`` in order,
    instead of their file names. ``attention`` and ``compile_networks`` go to
    :func:`bmseg.models.load_models` (Cellpose-SAM's attention; ``torch.compile`` on a GPU). The
    outputs reach ``out`` together when the batch is
    done (:func:`bmseg.storage.output_set`); an error, a GPU out of memory included, leaves
    ``out`` as it was.
    """
    mk, hspc = mk or MKSettings(), hspc or HSPCSettings()
    embedder = embedder or EmbedderSettings()
    with output_set(out) as staging:
        number, tiles = read_batch_table(batch)
        slide_paths = match_slides((t.slide_id for t in tiles), slides, slide_ids)
        pixel_sizes = slide_pixel_sizes(batch, tiles)
        counts = {
            "readers": readers,
            "workers": workers,
            "gpu_batch_tiles": gpu_batch_tiles,
            "embed_batch": embedder.batch_size,
            "crop_px": crop_px,
        }
        for option, value in counts.items():
            if value < 1:
                raise BmsegError(f"--{option.replace('_', '-')} {value}: must be at least 1")
        plan_records = read_plans(plans, slide_paths)
        opened = {}
        try:
            for slide_id, path in slide_paths.items():
                opened[slide_id] = open_slide(
                    path,
                    pixel_size_um=pixel_sizes[slide_id],
                    slide_id=slide_id,
                    **plan_records.choices.get(slide_id, {}),
                )
            check_tiles(batch, tiles, opened)
        finally:
            for slide in opened.values():
                slide.close()
        log.info(
            "%s: batch %d, %d tiles of %d slide(s)", batch, number, len(tiles), len(slide_paths)
        )
        for slide_id, path in slide_paths.items():
            log.info("slide %s: %s", slide_id, path)
        models = load_models(
            Path(models_dir),
            device,
            mk_settings=mk,
            hspc_settings=hspc,
            embedder_settings=embedder,
            attention=attention,
            compile_networks=compile_networks,
        )
        record = {
            "dir": str(models_dir),
            "manifest": asdict(models.manifest),
            "mk": asdict(mk),
            "hspc": asdict(hspc),
            "embedder": asdict(embedder),
            "attention": attention,
            "compiled": compile_networks and models.device.type == "cuda",
        }
        options = SegmentOptions(
            mk_min_area_um2=mk.min_area_um2,
            mk_max_area_um2=mk.max_area_um2,
            hspc_min_area_um2=hspc.min_area_um2,
            hspc_max_area_um2=hspc.max_area_um2,
            readers=readers,
            workers=workers,
            measure_processes=measure_processes,
            gpu_batch_tiles=gpu_batch_tiles,
            embed_batch=embedder.batch_size,
            hspc_embed_px=embedder.hspc_crop_size,
            crop_px=crop_px,
            device=str(models.device),
            progress=progress,
            intensity=plan_records.intensity,
            slide_choices=plan_records.choices,
        )
        return segment_batch(
            tiles,
            slide_paths,
            models.mk,
            models.hspc,
            models.embedder,
            staging,
            options,
            {"batch": number, "device": str(models.device), "models": record},
            model_timer=models.timer,
        )
