"""requirements/: the hashed locks that the venv and the images install from agree with
pyproject.toml, with each other on ONNX Runtime, and with what is installed here (so the tests run
what ships)."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOCKS = {
    "dev": ["cpu", "train", "dev", "bench"],
    "build": ["cpu", "train"],
    "serve-cpu": ["cpu"],
    "serve-gpu": ["gpu"],
}
PIN = re.compile(r"^([A-Za-z0-9._-]+)==([^\s;\\]+)", re.MULTILINE)


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(lock: str) -> dict[str, str]:
    text = (ROOT / "requirements" / f"{lock}.txt").read_text()
    return {normalize(name): version for name, version in PIN.findall(text)}


def direct_requirements(extras: list[str]) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = project["optional-dependencies"]
    names, pending = set(), list(extras)
    for requirement in project["dependencies"]:
        names.add(normalize(re.split(r"[\[<>=!~; ]", requirement)[0]))
    while pending:
        for requirement in optional[pending.pop()]:
            name = normalize(re.split(r"[\[<>=!~; ]", requirement)[0])
            if name == "resnet-serve":
                pending.extend(re.findall(r"\[(.*)\]", requirement)[0].split(","))
            else:
                names.add(name)
    return names - {"torch"}


@pytest.mark.parametrize("lock", list(LOCKS))
def test_lock_covers_pyproject_and_is_hashed(lock: str) -> None:
    locked = pins(lock)
    missing = direct_requirements(LOCKS[lock]) - set(locked)
    assert not missing, f"requirements/{lock}.txt lacks {missing}: run bash requirements/lock.sh"
    text = (ROOT / "requirements" / f"{lock}.txt").read_text()
    entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2])
    assert all("--hash=sha256:" in entry for entry in entries), f"{lock}: an entry without hashes"
    # torch is the host's choice (CPU or CUDA build), installed beside the lock.
    assert "torch" not in locked


def test_one_onnx_runtime_version_everywhere() -> None:
    versions = {
        lock: pins(lock).get("onnxruntime") or pins(lock)["onnxruntime-gpu"] for lock in LOCKS
    }
    assert len(set(versions.values())) == 1, versions
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    (version,) = set(versions.values())
    assert f"onnxruntime=={version}" in extras["cpu"]
    assert f"onnxruntime-gpu[cuda,cudnn]=={version}" in extras["gpu"]


def test_installed_packages_match_the_dev_lock() -> None:
    locked = pins("dev")
    for name in ("onnxruntime", "numpy", "pillow", "fastapi", "starlette", "onnx"):
        assert metadata.version(name) == locked[name], f"{name}: reinstall the venv from the lock"
