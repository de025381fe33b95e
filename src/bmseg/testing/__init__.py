"""Test helpers: fabricated pipeline data and stand-in models, for tests and benchmarks.

For tests and benchmarks, not for production: nothing in bmseg's steps imports this package.
Like ``spatialdata.testing``, it is a public module so the test suite, the benchmarks and a
notebook fabricate inputs the same way:

- :mod:`bmseg.testing.cells`: cell tables in SEGMENT's full schema (built from
  :func:`bmseg.contract.cells_schema`), SEGMENT batch folders and PLAN slide records;
- :mod:`bmseg.testing.gathered`: a gathered folder of cell tables with real drawn crops;
- :mod:`bmseg.testing.oracle`: an oracle segmenter (returns the planted cells of a synthetic
  slide) and a cheap embedder, run through SEGMENT's production code path;
- :mod:`bmseg.testing.flows`: label images and perfect or noisy Cellpose network outputs.
"""
