"""``import app`` in a fresh interpreter: every app and core module imports with torch
unimportable and no model file (tests/unit/test_layers.py holds the import arrows)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

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
