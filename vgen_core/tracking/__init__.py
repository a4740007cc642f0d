"""Experiment tracking: the `Tracker` protocol and its implementations.

- `base.py`: `Tracker` (the protocol everything takes), `NullTracker` (records nothing),
  `image_grid` and `flatten_params` helpers. No MLflow import.
- `mlflow_tracker.py`: `MlflowTracker` (explicit `MlflowClient`, no global run state, backend
  failures degrade to a warning plus a local JSON-lines record; an unreachable server is
  noticed once by a short probe, not per call), `default_tracking_uri`,
  `default_artifact_location`, `register_model`, `mlflow_ui_url` (a link that opens the MLflow
  UI in its model-training layout).
- `locations.py`: `default_tracking_uri`, `default_artifact_location` (no MLflow import).
- `sidecar.py`: `TrackingSidecar` / `SidecarTracker`: `vgen run`'s runs logged from a child
  process (MLflow's import and store open off the driver's critical path).
- `redact.py`: `redact_uri`, `redact_text`, `redact_config`, `is_secret_key`: what every printed,
  logged or stored value goes through. No MLflow import.
- `sync.py`: `sync_records`, the replay of fallback records behind `vgen tracking sync`.

The driver opens runs with `MlflowTracker.start`; a worker (training rank 0 only) writes into
the driver's run with `MlflowTracker.attach(tracking_uri, run_id)`. The MLflow names are loaded
on first use, so importing this package does not import mlflow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vgen_core.tracking.base import NullTracker, Tracker, flatten_params, image_grid, to_uint8_image
from vgen_core.tracking.redact import is_secret_key, redact_config, redact_text, redact_uri

if TYPE_CHECKING:
    from vgen_core.tracking.mlflow_tracker import (
        MlflowTracker,
        TrackingServerUnavailable,
        default_artifact_location,
        default_fallback_dir,
        default_tracking_uri,
        mlflow_ui_url,
        register_model,
        tag_model_versions,
    )

__all__ = [
    "MlflowTracker",
    "NullTracker",
    "Tracker",
    "TrackingServerUnavailable",
    "default_artifact_location",
    "default_fallback_dir",
    "default_tracking_uri",
    "flatten_params",
    "image_grid",
    "is_secret_key",
    "mlflow_ui_url",
    "redact_config",
    "redact_text",
    "redact_uri",
    "register_model",
    "tag_model_versions",
    "to_uint8_image",
]

_MLFLOW_NAMES = (
    "MlflowTracker",
    "TrackingServerUnavailable",
    "default_artifact_location",
    "default_fallback_dir",
    "default_tracking_uri",
    "mlflow_ui_url",
    "register_model",
    "tag_model_versions",
)


def __getattr__(name: str) -> Any:
    if name in ("default_artifact_location", "default_tracking_uri"):  # no mlflow import
        from vgen_core.tracking import locations

        return getattr(locations, name)
    if name in _MLFLOW_NAMES:
        from vgen_core.tracking import mlflow_tracker

        return getattr(mlflow_tracker, name)
    raise AttributeError(f"module 'vgen_core.tracking' has no attribute {name!r}")
