"""Read a GeoJSON file the way QuPath's importer does, failing where QuPath would fail or drop.

Mirrors QuPath 0.6's ``QuPathTypeAdapters.PathObjectTypeAdapter.parseObject``,
``MeasurementListTypeAdapter.read`` and ``GsonTools.PathClassTypeAdapter.read``:

* ``id``: kept as the object's id only if ``UUID.fromString`` accepts it; otherwise QuPath logs
  "Invalid ID" and gives the object a new random id;
* ``properties.objectType``: ``detection`` makes a detection; anything else an annotation;
* ``properties.name``: a string (``getAsString``);
* ``properties.classification``: an object with ``name`` (or ``names``) *and* ``color``, else
  "Unable to parse PathClass" aborts the import; ``color`` an int array;
* ``properties.measurements``: an object; a number is kept, a string must be ``NaN``/``Inf``/
  ``-Inf`` or parse as a double (else ``NumberFormatException`` aborts), anything else (null,
  object) is dropped with a warning;
* ``properties.metadata``: an object whose primitive values become strings.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

# java.util.UUID.fromString: five groups of hex digits separated by dashes
HEX = "[0-9a-fA-F]"
JAVA_UUID = re.compile(f"^{HEX}{{1,8}}-{HEX}{{1,4}}-{HEX}{{1,4}}-{HEX}{{1,4}}-{HEX}{{1,12}}$")


@dataclass
class QuPathObject:
    """What QuPath keeps of one feature."""

    object_type: str
    uuid: uuid.UUID | None  # None: QuPath would assign a random one
    name: str | None
    class_name: str | None
    class_color: tuple[int, ...] | None
    measurements: dict[str, float]
    metadata: dict[str, str]
    ring: list[list[float]]


def _measurement(key: str, value: object) -> float | None:
    if isinstance(value, bool):  # Gson reads JSON true/false as Boolean, not Number
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        lower = value.lower()
        special = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
        if lower in special:
            return special[lower]
        return float(value)  # Double.parseDouble: a ValueError here aborts QuPath's import too
    return None  # "Cannot parse measurement value": dropped


def read_like_qupath(path: Path) -> list[QuPathObject]:
    """Every feature of the FeatureCollection at ``path`` as QuPath would import it."""
    document = json.loads(path.read_text(encoding="utf-8"))
    assert document["type"] == "FeatureCollection" and isinstance(document["features"], list)
    objects = []
    for feature in document["features"]:
        assert feature["type"] == "Feature"
        identifier = feature.get("id")
        kept_uuid = None
        if isinstance(identifier, str) and JAVA_UUID.match(identifier):
            kept_uuid = uuid.UUID(identifier)
        geometry = feature["geometry"]
        assert geometry["type"] == "Polygon"
        (ring,) = geometry["coordinates"]
        assert len(ring) >= 4 and ring[0] == ring[-1]
        assert all(len(p) == 2 and all(isinstance(v, int | float) for v in p) for p in ring)
        properties = feature.get("properties", {})
        name = properties.get("name")
        assert name is None or isinstance(name, str)
        classification = properties.get("classification")
        class_name = class_color = None
        if classification is not None:
            assert isinstance(classification, dict), "QuPath: Unable to parse PathClass"
            has_name = "name" in classification or "names" in classification
            assert has_name and "color" in classification, "QuPath: Unable to parse PathClass"
            class_name = classification.get("name") or ": ".join(classification["names"])
            class_color = tuple(classification["color"])
            assert all(isinstance(c, int) and 0 <= c <= 255 for c in class_color)
        measurements: dict[str, float] = {}
        raw = properties.get("measurements", {})
        assert isinstance(raw, dict | list)
        for key, value in raw.items() if isinstance(raw, dict) else ():
            parsed = _measurement(key, value)
            if parsed is not None:
                measurements[key] = parsed
        metadata = {
            k: str(v)
            for k, v in properties.get("metadata", {}).items()
            if isinstance(v, str | int | float | bool)
        }
        objects.append(
            QuPathObject(
                object_type=properties.get("objectType", "unknown"),
                uuid=kept_uuid,
                name=name,
                class_name=class_name,
                class_color=class_color,
                measurements=measurements,
                metadata=metadata,
                ring=ring,
            )
        )
    return objects
