"""Small plots for MLflow (histograms of per-sample statistics), rendered off-screen to RGB."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np


def histogram_image(values: Sequence[float], title: str, *, bins: int = 30,
                    xlabel: str | None = None) -> np.ndarray:
    """A histogram as an RGB uint8 image (H, W, 3), ready for ``Tracker.log_image``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from PIL import Image

    fig = Figure(figsize=(4.8, 3.2), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    v = np.asarray(list(values), dtype=np.float64)
    v = v[np.isfinite(v)]
    ax.hist(v, bins=bins if len(v) else 1, color="#4477aa")
    ax.set_title(f"{title} (n={len(v)})", fontsize=10)
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        return np.asarray(im.convert("RGB"))
