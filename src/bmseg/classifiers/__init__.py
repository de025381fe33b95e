"""TRAIN and CLASSIFY: one classifier per cell type from gallery labels, applied to cell tables.

- :mod:`.training`: ``train(...)``, cross-validated comparison of two models per cell type;
- :mod:`.applying`: ``classify(...)``, the saved models applied to gathered tables;
- :mod:`.bundles`: the saved model bundle, written and read back with skops (never pickle);
- :mod:`.metrics`: cross-validated metrics and the acceptance rule;
- :mod:`.training_report`: TRAIN's self-contained ``report.html``.
"""
