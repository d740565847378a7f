"""The model repository on disk: Triton's layout, which versions a policy serves, and when a
version directory is complete enough to load.

    DIR/<name>/<version>/model.onnx      versions are positive integers
    DIR/<name>/<version>/model.int8.onnx precision variants beside it (model_precision)

A version directory is taken only under its final name: write it beside under any name that is not
a positive integer (``2.partial``, ``.2``) and rename it into place, which is atomic. Watching the
directory (``repository_poll_s``), a version is also loaded only once its files have not changed
between two looks, so a version copied in place is not opened half-written.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from app.errors import RepositoryUnavailable, UnknownModel
from app.repository.configs import runtime_config
from app.repository.policy import VersionPolicy
from app.runtimes.registry import check_model
from app.settings import Settings
from core.contract import ModelMetadata
from core.errors import BadRequest, ModelError

MODEL_FILE = "model.onnx"
# A model's name in a URL and a folder: no separators, no "." or "..".
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

Signature = tuple[tuple[str, int, int], ...]  # each file's name, size and mtime


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name) or ".." in name:
        raise BadRequest(
            f"model name {name!r} is not a repository folder name: letters, digits, '.', '_' "
            "and '-', starting with a letter or digit, no '..' or '/'"
        )
    return name


def scan(root: Path) -> dict[str, dict[int, Path]]:
    """Every model folder's complete version directories: ``{name: {version: model file}}``.

    Raises RepositoryUnavailable when the folder cannot be read (gone, unmounted): what is
    loaded keeps serving, and the next look finds it again."""
    try:
        return _scan(root)
    except OSError as exc:
        raise RepositoryUnavailable(
            f"cannot read the model repository {root}: {exc.strerror or exc}"
        ) from None


def _scan(root: Path) -> dict[str, dict[int, Path]]:
    found: dict[str, dict[int, Path]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name)):
        versions = {
            int(entry.name): entry / MODEL_FILE
            for entry in folder.iterdir()
            if entry.is_dir()
            and entry.name.isdigit()
            and entry.name == str(int(entry.name))
            and int(entry.name) >= 1
            and (entry / MODEL_FILE).is_file()
        }
        found[folder.name] = versions
    return found


def signature(model_file: Path) -> Signature:
    """What changes while a version directory is still being written."""
    files = sorted(p for p in model_file.parent.iterdir() if p.is_file())
    return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)


def source(settings: Settings) -> RepositorySource | FileSource:
    """Where the model versions come from: the repository folder, or the one file. Raises
    ModelError (one line at start-up) for a repository folder that is not there."""
    if settings.model_repository is not None:
        return RepositorySource(
            settings.model_repository, VersionPolicy.parse(settings.version_policy)
        )
    check = runtime_config(settings)
    return FileSource(
        settings.model_path,
        lambda path: check_model(replace(check, model_path=path)),
    )


class RepositorySource:
    versioned = True
    """Models from a repository folder, each served by ``policy`` unless a load brings its own."""

    def __init__(self, root: Path, policy: VersionPolicy) -> None:
        """Raises ModelError when ``root`` is not a directory (start-up: one line, exit 1)."""
        if not root.is_dir():
            raise ModelError(
                f"model repository not found: {root} is not a directory "
                "(set RESNET_SERVE_MODEL_REPOSITORY)"
            )
        self.root = root
        self.policy = policy
        self._seen: dict[Path, Signature] = {}  # each version's files at the last look

    def names(self) -> list[str]:
        return sorted(scan(self.root))

    def wanted(self, name: str, policy: VersionPolicy | None, settled: bool) -> dict[str, Path]:
        check_name(name)
        versions = scan(self.root).get(name)
        if versions is None:
            raise UnknownModel(f"no model {name!r} in the repository {self.root}")
        if settled:
            versions = {v: path for v, path in versions.items() if self._settled(path)}
        return {str(v): versions[v] for v in (policy or self.policy).pick(list(versions))}

    def _settled(self, path: Path) -> bool:
        now = signature(path)
        before, self._seen[path] = self._seen.get(path), now
        return before == now


class FileSource:
    """``model_path`` as a one-model repository: the model named and versioned by its metadata;
    a changed file (renamed into place) is a new version."""

    versioned = False

    def __init__(self, path: Path, peek: Callable[[Path], ModelMetadata]) -> None:
        self.path = path
        self._peek = peek
        self._cached: tuple[tuple[int, int], ModelMetadata] | None = None

    def names(self) -> list[str]:
        metadata = self._metadata()
        return [metadata.name] if metadata is not None else []

    def wanted(self, name: str, policy: VersionPolicy | None, settled: bool) -> dict[str, Path]:
        metadata = self._metadata()
        if metadata is None or metadata.name != name:
            raise UnknownModel(f"no model {name!r}: this server serves the file {self.path}")
        return {metadata.version: self.path}

    def _metadata(self) -> ModelMetadata | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        key = (stat.st_size, stat.st_mtime_ns)
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, self._peek(self.path))
        return self._cached[1]
