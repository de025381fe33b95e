"""PLAN's per-slide records as the later steps read them (``{slide}.slide.json`` and beside it).

GATHER reads them from PLAN's folder and copies them beside the gathered tables, where
CLASSIFY reads them again to place the QuPath GeoJSON in the slide's frame.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from bmseg.contract import (
    SLIDE_RECORD_SUFFIX,
    TILES_SUFFIX,
    TISSUE_PICTURE_SUFFIX,
    slide_file,
)
from bmseg.errors import BmsegError


@dataclass(frozen=True)
class SlidePlan:
    """What GATHER needs from PLAN's ``{slide}.slide.json`` (and its neighbours)."""

    slide_id: str
    pixel_size_um: float
    origin_x: float
    origin_y: float
    tissue_area_mm2: float
    tiles_kept: int
    slide_json: Path
    tissue_png: Path | None
    tiles_table: Path | None


def read_plans(plans_dir: Path, slide_ids: Iterable[str]) -> dict[str, SlidePlan]:
    """Read ``{slide}.slide.json`` for every slide; a missing or incomplete one is an error."""
    plans: dict[str, SlidePlan] = {}
    for slide_id in sorted(slide_ids):
        path = plans_dir / slide_file(slide_id, SLIDE_RECORD_SUFFIX)
        if not path.is_file():
            raise BmsegError(f"{path}: missing; pass --plans the directory PLAN wrote")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            bounds = data["bounds"]
            plan = SlidePlan(
                slide_id=slide_id,
                pixel_size_um=float(data["pixel_size_um"]),
                origin_x=float(bounds["x"]),
                origin_y=float(bounds["y"]),
                tissue_area_mm2=float(data["tissue_area_mm2"]),
                tiles_kept=int(data.get("tiles_kept", 0)),
                slide_json=path,
                tissue_png=_existing(plans_dir / slide_file(slide_id, TISSUE_PICTURE_SUFFIX)),
                tiles_table=_existing(plans_dir / slide_file(slide_id, TILES_SUFFIX)),
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise BmsegError(f"{path}: not a PLAN slide record ({error}); re-run PLAN") from error
        plans[slide_id] = plan
    return plans


def _existing(path: Path) -> Path | None:
    return path if path.is_file() else None
