"""vgen_core: the library. Data identity, schemas and the Delta table store (``data``), the
tracker (``tracking``), tokenizers, generators, the in-worker training loop (``training``) and
metrics (``eval``). No Ray import anywhere in it; it runs and tests on a laptop CPU."""
