"""Experiment tracking: the `Tracker` protocol and its implementations.

- `base.py`: `Tracker` (the protocol everything takes), `NullTracker` (records nothing),
  `image_grid` and `flatten_params` helpers. No MLflow import.
- `mlflow_tracker.py`: `MlflowTracker` (explicit `MlflowClient`, no global run state, backend
  failures degrade to a warning plus a local JSON-lines record), `default_tracking_uri`,
  `default_artifact_location`, `register_model`.

The driver opens runs with `MlflowTracker.start`; a worker (training rank 0 only) writes into
the driver's run with `MlflowTracker.attach(tracking_uri, run_id)`. The MLflow names are loaded
on first use, so importing this package does not import mlflow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vgen_core.tracking.base import NullTracker, Tracker, flatten_params, image_grid, to_uint8_image

if TYPE_CHECKING:
    from vgen_core.tracking.mlflow_tracker import (
        MlflowTracker,
        default_artifact_location,
        default_tracking_uri,
        register_model,
        tag_model_versions,
    )

__all__ = [
    "MlflowTracker",
    "NullTracker",
    "Tracker",
    "default_artifact_location",
    "default_tracking_uri",
    "flatten_params",
    "image_grid",
    "register_model",
    "tag_model_versions",
    "to_uint8_image",
]

_MLFLOW_NAMES = (
    "MlflowTracker",
    "default_artifact_location",
    "default_tracking_uri",
    "register_model",
    "tag_model_versions",
)


def __getattr__(name: str) -> Any:
    if name in _MLFLOW_NAMES:
        from vgen_core.tracking import mlflow_tracker

        return getattr(mlflow_tracker, name)
    raise AttributeError(f"module 'vgen_core.tracking' has no attribute {name!r}")
