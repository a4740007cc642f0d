"""The one dependency rule: kernels <- vgen_core <- pipelines; only pipelines imports Ray."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(package: str):
    for path in (ROOT / package).rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    yield path, a.name
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                yield path, node.module


def test_vgen_core_imports_no_ray_and_no_pipelines():
    bad = [(str(p.relative_to(ROOT)), m) for p, m in imported_modules("vgen_core")
           if m.split(".")[0] in ("ray", "pipelines")]
    assert bad == []


def test_kernels_import_neither_vgen_core_nor_pipelines_nor_ray():
    bad = [(str(p.relative_to(ROOT)), m) for p, m in imported_modules("kernels")
           if m.split(".")[0] in ("ray", "pipelines", "vgen_core")]
    assert bad == []


def test_importing_vgen_core_does_not_load_ray():
    import subprocess
    import sys

    code = ("import sys, vgen_core, vgen_core.data, vgen_core.tracking, vgen_core.training, "
            "vgen_core.tokenizers, vgen_core.generators; print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_stages_do_not_import_the_dag_runner():
    """A stage sees only its contract: nothing under pipelines/stages imports pipelines.dag (the
    runner passes the executor in; shared error types live in pipelines.errors)."""
    bad = []
    for path in (ROOT / "pipelines" / "stages").rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level == 0 and mod.startswith("pipelines.dag"):
                    bad.append((path.name, mod))
                if node.level == 2 and mod.startswith("dag"):  # from ..dag import ...
                    bad.append((path.name, f"..{mod}"))
            elif isinstance(node, ast.Import):
                bad += [(path.name, a.name) for a in node.names
                        if a.name.startswith("pipelines.dag")]
    assert bad == []
