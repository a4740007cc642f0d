"""pipelines: composition and execution, the only package that imports Ray. ``dag`` (spec,
fingerprints, planner, runner, the Ray executor), ``stages`` (one module per stage kind; they
import nothing from ``dag``), ``errors`` (the error types both share), ``configs`` (example DAGs),
``cli`` (the ``vgen`` command)."""
