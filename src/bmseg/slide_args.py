"""Which slide file is which slide id: the ``--slides`` arguments of the steps that read slides.

Shared by SEGMENT and the fine-tuning step; the id rule itself is PLAN's
(:func:`bmseg.slide.default_slide_id`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from bmseg.contract import check_id
from bmseg.errors import BmsegError
from bmseg.slide import SLIDE_ID_PATTERN, default_slide_id


def match_slides(
    slide_ids: Iterable[str], slide_args: Sequence[str], bound_ids: Sequence[str] | None = None
) -> dict[str, Path]:
    """Map each needed slide id to one of the given files.

    A file matches the id its name gives (:func:`bmseg.slide.default_slide_id`, as PLAN
    derives it); ``ID=PATH`` binds a file to an id explicitly (slides planned with --slide-id);
    ``bound_ids`` (--slide-ids) gives every file its id, in the order of the files.
    """
    if bound_ids is not None and len(bound_ids) != len(slide_args):
        raise BmsegError(
            f"--slide-ids names {len(bound_ids)} slides for {len(slide_args)} files in "
            "--slides: give one id per file, in the same order"
        )
    given: dict[str, Path] = {}
    for index, arg in enumerate(slide_args):
        slide_id, sep, path_text = arg.partition("=")
        if bound_ids is not None:
            slide_id, path = check_id(bound_ids[index], "--slide-ids"), Path(arg)
        elif sep and SLIDE_ID_PATTERN.match(slide_id) and not Path(arg).exists():
            path = Path(path_text)
        else:
            path = Path(arg)
            slide_id = default_slide_id(path)
        if slide_id in given:
            raise BmsegError(
                f"--slides: slide {slide_id!r} given twice ({given[slide_id]}, {path}); "
                "pass each slide once"
            )
        given[slide_id] = path
    needed = sorted(set(slide_ids))
    missing = [s for s in needed if s not in given]
    if missing:
        names = ", ".join(f"{s} ({p.name})" for s, p in given.items()) or "none"
        raise BmsegError(
            f"--slides: the batch needs slide(s) {', '.join(missing)} but was given {names}; "
            "pass their files (or ID=PATH)"
        )
    return {s: given[s] for s in needed}
