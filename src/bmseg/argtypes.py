"""Argument forms the pipeline's one-line command lines need, shared by the step parsers.

The Nextflow modules render every option from a param or a task input by plain interpolation,
with no conditionals (docs/pipeline.md, "Command lines"). So an unset value arrives as the word
Nextflow renders for it, ``null``, and an optional file that was not staged arrives as nothing
after its flag. These types and constants read both as "not given".
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

UNSET = "null"
"""What Nextflow renders for an unset param or meta field inside a command line."""

BAKED_MODELS_DIR = "/opt/bmseg/models"
"""Where an image built with --bake-models keeps its weights: ``--models`` with no folder."""


def nullable(kind: Callable[[str], T]) -> Callable[[str], T | None]:
    """An argparse type: ``kind(text)``, or None for ``null`` (the value was not set)."""

    def convert(text: str) -> T | None:
        return None if text == UNSET else kind(text)

    convert.__name__ = getattr(kind, "__name__", "value")
    return convert


def nullable_choice(choices: tuple[str, ...]) -> Callable[[str], str | None]:
    """An argparse type: one of ``choices``, or None for ``null``."""

    def choice(text: str) -> str | None:
        if text == UNSET:
            return None
        if text not in choices:
            raise argparse.ArgumentTypeError(
                f"{text!r}: choose from {', '.join(choices)} (or {UNSET})"
            )
        return text

    return choice


def switch(text: str) -> bool:
    """An on/off value a param renders (``true`` / ``false``), for a flag that also stands
    alone (``nargs="?", const=True``): ``--compile`` and ``--compile ${params.compile}``."""
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"{text!r}: give true or false")
    return text.lower() == "true"


def id_list(text: str) -> list[str]:
    """A comma-separated list, e.g. slide ids ``S1,S2``: the order of the files it pairs with."""
    items = text.split(",")
    if not all(items):
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated values, e.g. S1,S2")
    return items


def nullable_float_list(text: str) -> list[float | None]:
    """A comma-separated list of numbers, ``null`` for a value that is not set."""
    try:
        return [nullable(float)(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give comma-separated numbers or null, e.g. 0.25,null"
        ) from None


def add_slide_ids_and_models(parser: argparse.ArgumentParser, models_help: str) -> None:
    """``--slide-ids`` (each ``--slides`` file's id, in order) and ``--models`` (the flag
    alone: the image's baked-in weights), as SEGMENT and FINETUNE both take them."""
    parser.add_argument(
        "--slide-ids",
        type=id_list,
        metavar="ID,...",
        help="the id of each file in --slides, in their order (instead of names or ID=PATH)",
    )
    parser.add_argument(
        "--models",
        required=True,
        nargs="?",
        const=BAKED_MODELS_DIR,
        metavar="DIR",
        help=f"{models_help} (the flag alone: the image's baked-in {BAKED_MODELS_DIR})",
    )
