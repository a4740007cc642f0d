"""`vgen ui` serves the MLflow UI of a storage root on 127.0.0.1."""

from __future__ import annotations

import urllib.request


from tests.conftest import serve_ui


def test_ui_serves_mlflow_on_loopback(tmp_path):
    with serve_ui(tmp_path) as url:
        with urllib.request.urlopen(f"{url}/", timeout=30) as r:
            body = r.read().decode(errors="replace")
        assert "mlflow" in body.lower()
        assert (tmp_path / "mlflow.db").exists()
