"""Rectangles in slide pixels: tile cores, read windows, scene boxes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rect:
    """A rectangle in slide pixels: top-left corner and size, half-open."""

    x: int
    y: int
    w: int
    h: int

    @property
    def right(self) -> int:
        """First column past the rectangle."""
        return self.x + self.w

    @property
    def bottom(self) -> int:
        """First row past the rectangle."""
        return self.y + self.h

    def intersection(self, other: Rect) -> Rect:
        """The overlap of two rectangles (zero-sized when they do not meet)."""
        x, y = max(self.x, other.x), max(self.y, other.y)
        right, bottom = min(self.right, other.right), min(self.bottom, other.bottom)
        return Rect(x, y, max(0, right - x), max(0, bottom - y))

    def as_dict(self) -> dict[str, int]:
        """``{x, y, w, h}`` as written to slide.json."""
        return {"x": self.x, "y": self.y, "w": self.w, "h": self.h}


def merge_overlapping(boxes: list[Rect]) -> list[Rect]:
    """``boxes`` with every group of overlapping rectangles replaced by the box around it,
    in order of first appearance (so that no pixel belongs to two of them)."""
    merged = list(boxes)
    changed = True
    while changed:
        changed = False
        for i in range(len(merged)):
            for j in range(i + 1, len(merged)):
                a, b = merged[i], merged[j]
                overlap = a.intersection(b)
                if overlap.w > 0 and overlap.h > 0:
                    x, y = min(a.x, b.x), min(a.y, b.y)
                    union = Rect(x, y, max(a.right, b.right) - x, max(a.bottom, b.bottom) - y)
                    merged[i] = union
                    del merged[j]
                    changed = True
                    break
            if changed:
                break
    return merged
