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


# Inside app/: the transports (HTTP, the Open Inference Protocol's REST routes, gRPC) are adapters
# over the service and never import each other (gRPC serves the protocol's recipe,
# app.oip.serving, not its REST routes); the edge, the service and the pipeline know no transport;
# runtimes never import the pipeline, batching or the repository; the shared store (Redis) only
# telemetry; app.main and app.__main__ compose
# them all, and nothing imports them.
TOP = {"app.main", "app.__main__", "app.client"}
TRANSPORTS = {"app.http", "app.oip", "app.grpc"}
ENGINE = {"app.service", "app.pipeline", "app.batching", "app.repository", "app.runtimes"}
APP_LAYERS = {
    "app/http": TOP | {"app.oip", "app.grpc"},
    "app/oip": TOP | {"app.http", "app.grpc"},
    "app/grpc": TOP | {"app.http", "app.oip.rest"},
    "app/service.py": TOP | TRANSPORTS,
    "app/edge": TOP | TRANSPORTS | ENGINE,
    "app/pipeline": TOP | TRANSPORTS | {"app.service", "app.repository", "app.edge"},
    "app/batching": TOP | TRANSPORTS | {"app.service", "app.pipeline", "app.repository"},
    "app/runtimes": TOP | TRANSPORTS | ENGINE - {"app.runtimes"} | {"app.edge"},
    "app/repository": TOP | TRANSPORTS | {"app.service", "app.edge"},
    "app/process": TOP | TRANSPORTS | {"app.service", "app.pipeline", "app.batching"},
    "app/store": TOP | TRANSPORTS | ENGINE | {"app.edge", "app.process"},
    "app/telemetry": TOP | TRANSPORTS | ENGINE | {"app.edge", "app.process", "app.store"},
    "app/settings.py": TOP
    | TRANSPORTS
    | ENGINE
    | {"app.edge", "app.process", "app.telemetry", "app.store"},
    "app/errors.py": TOP
    | TRANSPORTS
    | ENGINE
    | {"app.edge", "app.process", "app.telemetry", "app.store"},
}
# The settings validate against two leaves that import nothing of app/ but the errors: the cores
# there are, and the version policies.
LEAVES = {"app/settings.py": {"app.process.cpus", "app.repository.policy"}}


@pytest.mark.parametrize(("where", "forbidden"), APP_LAYERS.items(), ids=list(APP_LAYERS))
def test_app_layers_transports_over_the_edge_and_the_service_over_the_engine(
    where: str, forbidden: set[str]
) -> None:
    target = ROOT / where
    assert target.exists(), f"{where} is gone: hold its new home to the rules instead"
    paths = [target] if target.is_file() else sorted(target.rglob("*.py"))
    crossing = {
        f"{path.relative_to(ROOT)} imports {module}"
        for path in paths
        for module in imported_modules(path)
        if any(module == f or module.startswith(f + ".") for f in forbidden)
        and module not in LEAVES.get(where, ())
    }
    assert not crossing


@pytest.mark.parametrize("leaf", sorted(set().union(*LEAVES.values())))
def test_the_leaves_the_settings_use_import_nothing_of_app_but_the_errors(leaf: str) -> None:
    path = ROOT / (leaf.replace(".", "/") + ".py")
    assert {m for m in imported_modules(path) if m.startswith("app.")} <= {"app.errors"}
