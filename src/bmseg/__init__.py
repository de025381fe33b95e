"""bmseg: find, measure and classify megakaryocytes and HSPCs in whole-slide bone-marrow images."""

import logging

__version__ = "0.1.0"


class _DropOptionalBackboneWarning(logging.Filter):
    """Drops Cellpose's import-time warning that the optional dinov3 backbone is missing.

    Cellpose logs it on every import; bmseg never uses that model (CPDINO), so the user cannot
    act on it. Every other Cellpose message passes.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "dinov3" not in record.getMessage()


logging.getLogger("cellpose.vit").addFilter(_DropOptionalBackboneWarning())
