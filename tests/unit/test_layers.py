from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


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


def test_no_test_module_imports_another_test_module() -> None:
    # What two test modules share lives in tests/helpers/ (or a fixture in tests/conftest.py):
    # importing a test module runs its module-level code again and ties one folder to the other.
    crossing = set()
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        modules = imported_modules(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):  # also "from tests.unit import test_x", relative
                modules |= {node.module or ""}
                modules |= {f"{node.module or ''}.{alias.name}" for alias in node.names}
        crossing |= {
            f"{path.relative_to(ROOT)} imports {module}"
            for module in modules
            if module.rsplit(".", 1)[-1].startswith("test_")
        }
    assert not crossing


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
