"""Pieces of bmseg's self-contained HTML pages (the run report, the training report).

Both pages are single files that run no script: images are inlined as base64 PNG and the
Content-Security-Policy forbids everything else, so a value that slipped past escaping still
cannot act.
"""

from __future__ import annotations

import base64
import html
import io

from matplotlib.figure import Figure

CSP = (
    '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
    "style-src 'unsafe-inline'; img-src data:\">"
)
"""Content-Security-Policy of bmseg's self-contained HTML reports: no script runs at all, so a
value that slipped past escaping still cannot act."""


def esc(value: object) -> str:
    """``value`` as text safe in HTML content and quoted attributes."""
    return html.escape(str(value))


def img_tag(png: bytes, alt: str) -> str:
    """PNG bytes as an inline ``<img>`` (the reports are single self-contained files)."""
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def png_bytes(fig: Figure) -> bytes:
    """Render a matplotlib figure as PNG bytes.

    Figures are made with ``matplotlib.figure.Figure``, not pyplot: no global figure list to
    free and no backend to select, so a library caller's matplotlib setup is left alone.
    """
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()
