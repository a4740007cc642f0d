"""pipelines: composition and execution, the only package that imports Ray. ``dag`` (spec,
fingerprints, planner, runner), ``stages`` (one module per stage kind), ``configs`` (example
DAGs), ``cli`` (the ``vgen`` command)."""
