"""Which versions of a model a repository serves (Triton's version policies): parsed once, from
the ``version_policy`` setting or a load request's config."""

from __future__ import annotations

from dataclasses import dataclass

from core.errors import BadRequest


def check_version(version: str) -> int:
    if not version.isdigit() or int(version) < 1 or version != str(int(version)):
        raise BadRequest(f"version {version!r} is not a positive integer")
    return int(version)


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions of a model to serve: ``latest`` (the newest), ``latest:N``, ``all``, or
    ``specific:1,3`` (Triton's version policies)."""

    kind: str
    count: int = 1
    versions: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        kind, _, rest = text.partition(":")
        try:
            if kind == "latest":
                count = int(rest) if rest else 1
                if count >= 1:
                    return cls("latest", count=count)
            elif kind == "all" and not rest:
                return cls("all")
            elif kind == "specific" and rest:
                versions = tuple(sorted({check_version(v.strip()) for v in rest.split(",")}))
                return cls("specific", versions=versions)
        except (ValueError, BadRequest):
            pass
        raise ValueError(
            f"version policy {text!r} is not one of latest, latest:N (N >= 1), all, "
            "specific:V[,V...] (versions positive integers)"
        )

    def __str__(self) -> str:
        """The text ``parse`` reads back."""
        if self.kind == "latest":
            return f"latest:{self.count}"
        if self.kind == "all":
            return "all"
        return "specific:" + ",".join(str(v) for v in self.versions)

    def pick(self, available: list[int]) -> list[int]:
        ordered = sorted(available)
        if self.kind == "latest":
            return ordered[-self.count :]
        if self.kind == "all":
            return ordered
        return [v for v in ordered if v in self.versions]
