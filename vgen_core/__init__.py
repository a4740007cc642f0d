"""vgen_core: the library. Data identity, schemas, image helpers and the Delta table store
(``data``), the tracker (``tracking``), the model families (``families``: one ``FamilySpec`` per
family, declared at the end of its module in ``tokenizers`` / ``generators``), the in-worker
training loop (``training``) and metrics (``eval``). No Ray import anywhere in it; it runs and
tests on a laptop CPU."""
