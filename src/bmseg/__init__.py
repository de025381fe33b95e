"""bmseg: find, measure and classify megakaryocytes and HSPCs in whole-slide bone-marrow images."""

__version__ = "0.1.0"
