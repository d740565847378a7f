"""Print the requirements of the project's base dependencies plus the given extras, one per line.

The Dockerfile installs these before it copies the source, so the dependency layer is rebuilt
only when pyproject.toml changes:

    python3 docker/requirements.py pyproject.toml cpu train > requirements.txt

Self-references such as `resnet-serve[serve]` are expanded; unknown extras fail loudly.
"""

import re
import sys
import tomllib


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(project: dict, extras: list[str]) -> list[str]:
    optional = project.get("optional-dependencies", {})
    self_ref = re.compile(rf"\s*{re.escape(_normalize(project['name']))}\s*\[([^\]]+)\]\s*")
    found = list(project.get("dependencies", []))
    pending, seen = list(extras), set()
    while pending:
        extra = pending.pop(0)
        if extra in seen:
            continue
        if extra not in optional:
            raise SystemExit(f"unknown extra {extra!r}; pyproject.toml has {sorted(optional)}")
        seen.add(extra)
        for requirement in optional[extra]:
            match = self_ref.fullmatch(_normalize(requirement))
            if match:
                pending.extend(name.strip() for name in match.group(1).split(","))
            else:
                found.append(requirement)
    return list(dict.fromkeys(found))


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(f"usage: {sys.argv[0]} PYPROJECT [EXTRA ...]")
    with open(sys.argv[1], "rb") as file:
        project = tomllib.load(file)["project"]
    print("\n".join(requirements(project, sys.argv[2:])))


if __name__ == "__main__":
    main()
