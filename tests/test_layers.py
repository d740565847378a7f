from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Importing every app module must neither need torch nor open a model.
SCRIPT = """
import importlib, pkgutil, sys
sys.modules["torch"] = None  # any "import torch" now raises ImportError
import app, core
names = [m.name for m in pkgutil.walk_packages(app.__path__, "app.")]
names += [m.name for m in pkgutil.walk_packages(core.__path__, "core.")]
for name in names:
    importlib.import_module(name)
assert {"app.__main__", "app.main", "core.contract"} <= set(names), names
assert sys.modules["torch"] is None
print(len(names))
"""


def test_every_app_and_core_module_imports_without_torch_and_without_a_model(
    tmp_path: Path,
) -> None:
    env = {"RESNET_SERVE_MODEL_PATH": str(tmp_path / "absent.onnx"), "PATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) >= 10


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def imported_packages(package: str) -> set[str]:
    return {
        module.split(".")[0]
        for path in (ROOT / package).rglob("*.py")
        for module in imported_modules(path)
    }


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [("core", {"app", "model", "torch"}), ("model", {"app"}), ("app", {"model", "torch"})],
)
def test_layers_core_at_the_bottom_model_and_app_side_by_side(
    package: str, forbidden: set[str]
) -> None:
    assert not imported_packages(package) & forbidden


# Inside app/, arrows point down only: the HTTP edge (and the protocols) above the inference
# engine, above the process (server, workers, metrics, keys) and the settings. app.main and
# app.__main__ compose them all; nothing imports them.
APP_LAYERS = {
    "app/http": {"app.grpc", "app.main", "app.__main__", "app.client"},
    "app/oip": {"app.grpc", "app.main", "app.__main__", "app.client"},
    "app/grpc": {"app.main", "app.__main__", "app.client"},
    "app/engine": {"app.http", "app.oip", "app.grpc", "app.main", "app.__main__", "app.client"},
    "app/process": {"app.engine", "app.http", "app.oip", "app.grpc", "app.main", "app.__main__"},
    "app/settings.py": {
        "app.engine",
        "app.http",
        "app.oip",
        "app.grpc",
        "app.main",
        "app.process.server",
    },
    "app/repository/policy.py": {
        "app.engine",
        "app.http",
        "app.oip",
        "app.grpc",
        "app.main",
        "app.process",
    },
    "app/errors.py": {"app.engine", "app.http", "app.oip", "app.grpc", "app.main", "app.process"},
}


@pytest.mark.parametrize(("where", "forbidden"), APP_LAYERS.items(), ids=list(APP_LAYERS))
def test_app_layers_the_edge_above_the_engine_above_the_process(
    where: str, forbidden: set[str]
) -> None:
    target = ROOT / where
    paths = [target] if target.is_file() else sorted(target.rglob("*.py"))
    crossing = {
        f"{path.relative_to(ROOT)} imports {module}"
        for path in paths
        for module in imported_modules(path)
        if any(module == f or module.startswith(f + ".") for f in forbidden)
    }
    assert not crossing
