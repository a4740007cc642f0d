"""The `Tracker` protocol, the no-op `NullTracker`, and helpers shared by trackers.

A tracker is an object passed to whatever wants to record something (a stage, the train loop on
rank 0, the evaluator). Nothing in vgen_core reaches for global tracking state: code that was
given a `NullTracker` records nothing and behaves identically otherwise.

Shape legend: N images, H height, W width, C channels (1, 3 or 4).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Protocol, Self, runtime_checkable

import numpy as np

__all__ = [
    "NullTracker",
    "Tracker",
    "flatten_params",
    "image_grid",
    "to_uint8_image",
]

# MLflow's limits (mlflow.utils.validation), repeated here so this module does not import mlflow.
MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
TRUNCATION_MARK = "...[truncated]"

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")


@runtime_checkable
class Tracker(Protocol):
    """What every tracker offers. Implementations: `NullTracker`, `MlflowTracker`.

    Implementations never raise because the tracking backend failed; they may raise ValueError
    for arguments that are wrong whatever the backend (an image of the wrong shape).
    """

    @property
    def run_id(self) -> str | None:
        """The backend's id of this run (None for a tracker that records nothing)."""
        ...

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Record parameters once per run. Nested mappings become dotted keys ("model.depth");
        lists and tuples are JSON-encoded; other values go through str(); values longer than
        MLflow's limit are truncated (see `flatten_params`)."""
        ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Record scalar metrics at `step` (MLflow's default step 0 when None)."""
        ...

    def log_image(self, name: str, image: np.ndarray, step: int | None = None) -> None:
        """Record an image, HxWxC (C in 1, 3, 4) or HxW, uint8 or float in [0, 1].

        With a step it is a stepped image (MLflow's image slider); without one, a file
        `<name>.png` among the run's artifacts."""
        ...

    def log_text(self, text: str, artifact_file: str) -> None:
        """Write `text` to the run-relative artifact path `artifact_file`."""
        ...

    def log_dict(self, d: Mapping[str, Any], artifact_file: str) -> None:
        """Write `d` as JSON (or YAML when `artifact_file` ends in .yaml/.yml)."""
        ...

    def log_table_input(
        self,
        name: str,
        uri: str,
        version: int,
        num_rows: int | None = None,
        digest: str | None = None,
        context: str = "input",
    ) -> None:
        """Record a Delta table read ("input") or written ("output") by this run, with the
        exact table version."""
        ...

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values go through str(), truncated to MLflow's limit)."""
        ...

    def child(self, name: str) -> Tracker:
        """Open a nested run (one per stage, per eval pass, ...) under this one."""
        ...

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with status FINISHED, FAILED or KILLED."""
        ...


class NullTracker:
    """A tracker that records nothing: the default wherever a tracker is optional."""

    @property
    def run_id(self) -> str | None:
        return None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_image(self, name: str, image: np.ndarray, step: int | None = None) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_dict(self, d: Mapping[str, Any], artifact_file: str) -> None:
        pass

    def log_table_input(
        self,
        name: str,
        uri: str,
        version: int,
        num_rows: int | None = None,
        digest: str | None = None,
        context: str = "input",
    ) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def child(self, name: str) -> NullTracker:
        return NullTracker()

    def finish(self, status: str = "FINISHED") -> None:
        pass

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def check_status(status: str, what: str = "status") -> None:
    """ValueError unless ``status`` is a terminal run status (FINISHED, FAILED, KILLED)."""
    if status not in RUN_STATUSES:
        raise ValueError(f"{what} must be one of {RUN_STATUSES}, got {status!r}")


class FinishOnExit:
    """``with tracker:`` ends the run: FINISHED, KILLED on KeyboardInterrupt, FAILED on any
    other exception (the trackers that own a run: `MlflowTracker`, `SidecarTracker`)."""

    def finish(self, status: str = "FINISHED") -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        else:
            self.finish("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")


def metric_value(name: str, value: Any) -> float:
    """``value`` as a float, or ValueError naming the metric (a tensor with many elements, a
    string)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"metric {name!r}: {value!r} is not a number; log scalars (a 0-d tensor or .item())"
        ) from None


def _truncate(value: str, limit: int) -> str:
    if len(value) <= limit:
        return value
    return value[: limit - len(TRUNCATION_MARK)] + TRUNCATION_MARK


def _param_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value), sort_keys=True, default=str)
    return str(value)


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested config into MLflow params.

    `{"model": {"depth": 12, "dims": [64, 128]}, "lr": 1e-4}` becomes
    `{"model.depth": "12", "model.dims": "[64, 128]", "lr": "0.0001"}`. Empty mappings are kept
    as "{}"; values are cut to MLflow's 6000 characters, ending in "...[truncated]".
    """
    flat: dict[str, str] = {}
    for key, value in params.items():
        full_key = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{full_key}."))
        elif isinstance(value, Mapping):
            flat[full_key] = "{}"
        else:
            flat[full_key] = _truncate(_param_value(value), MAX_PARAM_VALUE_LENGTH)
    return flat


def to_uint8_image(image: Any) -> np.ndarray:
    """Convert an HxW or HxWxC image (uint8, bool or float in [0, 1]) to uint8 HxWxC.

    Floats are clipped to [0, 1] (not min-max rescaled, so colours mean the same at every step).
    Accepts anything `np.asarray` takes, a CPU torch tensor included.
    """
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(
            f"image must be HxW or HxWxC with C in (1, 3, 4), got shape {array.shape}; "
            "for a CxHxW tensor pass image.transpose(1, 2, 0), for a batch use image_grid()"
        )
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        array = np.nan_to_num(array.astype(np.float32), nan=0.0)
        return np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(
                f"integer image values must lie in [0, 255], got [{array.min()}, {array.max()}]; "
                "scale it first or pass floats in [0, 1]"
            )
        return array.astype(np.uint8)
    raise ValueError(f"image dtype {array.dtype} is not supported; use uint8 or float in [0, 1]")


def image_grid(
    images_NHWC: Any, nrow: int = 8, padding: int = 2, pad_value: float = 0
) -> np.ndarray:
    """Tile N images into one, `nrow` images per row (torchvision's make_grid layout).

    Args:
        images_NHWC: N x H x W x C array (uint8 or float); a CPU tensor works too.
        nrow: images per row of the grid.
        padding: pixels between images and around the border.
        pad_value: value of the padding pixels, in the images' own scale.

    Returns:
        (rows*(H+padding)+padding) x (cols*(W+padding)+padding) x C array, same dtype as input,
        with rows = ceil(N / nrow), cols = min(N, nrow). Unused cells of the last row are padding.
    """
    images = np.asarray(images_NHWC)
    if images.ndim != 4:
        raise ValueError(f"image_grid expects N x H x W x C, got shape {images.shape}")
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    n, h, w, c = images.shape
    if n == 0:
        raise ValueError("image_grid got no images (N = 0)")
    cols = min(n, nrow)
    rows = math.ceil(n / nrow)
    grid = np.full(
        (rows * (h + padding) + padding, cols * (w + padding) + padding, c),
        pad_value,
        dtype=images.dtype,
    )
    for i in range(n):
        y = padding + (i // nrow) * (h + padding)
        x = padding + (i % nrow) * (w + padding)
        grid[y : y + h, x : x + w] = images[i]
    return grid
