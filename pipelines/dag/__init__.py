"""DAG spec (YAML -> validated model), fingerprints, planner, state and the Ray runner.
Importing this package does not import Ray; only ``runner``/``ray_exec`` do, when a DAG runs."""

from .spec import Dag, DagError, load_dag, parse_dag

__all__ = ["Dag", "DagError", "load_dag", "parse_dag"]
