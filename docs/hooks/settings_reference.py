"""The configuration reference, generated from ``app.settings.Settings``: a table of every setting,
its environment variable, its default and its description (the attribute's docstring in
``app/settings.py``).

The table is committed in ``docs/configuration.md`` between the two markers below, so the page
reads whole where the repository is browsed; this MkDocs hook fails the site's build (and with
it ``make test``) when the committed table is not what the code says now, and
``python docs/hooks/settings_reference.py`` writes it anew.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from app.settings import ENV_PREFIX, Settings

MARKER = "<!-- settings-reference -->"
END = "<!-- /settings-reference -->"
PAGE = Path(__file__).resolve().parents[1] / "configuration.md"
# The first setting of each section, in the order of the fields in app/settings.py.
SECTIONS = {
    "model_path": "Model, server and keys",
    "trace_exporter": "Tracing",
    "workers": "Processes and cores",
    "providers": "Runtime and providers",
    "max_batch_size": "Batching",
    "request_timeout_ms": "Admission, deadlines and shutdown",
    "default_top_k": "Request limits",
}


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    if MARKER in markdown and committed(markdown) != reference():
        raise ValueError(
            "docs/configuration.md: the settings table is not what app/settings.py says; run "
            "python docs/hooks/settings_reference.py"
        )
    return markdown


def committed(page: str) -> str:
    """The table between the markers of ``page``."""
    return page.split(MARKER + "\n", 1)[1].split(END, 1)[0]


def write(page: Path = PAGE) -> None:
    text = page.read_text()
    before, after = text.split(MARKER, 1)[0], text.split(END, 1)[1]
    page.write_text(f"{before}{MARKER}\n{reference()}{END}{after}")


def reference() -> str:
    unknown = set(SECTIONS) - set(Settings.model_fields)
    if unknown:
        raise ValueError(f"SECTIONS names settings that do not exist: {sorted(unknown)}")
    lines: list[str] = []
    for name, field in Settings.model_fields.items():
        if name in SECTIONS:
            lines += ["", f"## {SECTIONS[name]}", "", "| variable | default | meaning |"]
            lines.append("|---|---|---|")
        if not field.description:
            raise ValueError(f"setting {name} has no docstring in app/settings.py")
        variable = f"`{ENV_PREFIX}{name.upper()}`"
        meaning = " ".join(field.description.split()).replace("|", "\\|")
        lines.append(f"| {variable} | {default(field)} | {meaning} |")
    return "\n".join(lines) + "\n"


def default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        return "computed (see meaning)"
    value = field.default
    if value is PydanticUndefined or value is None:
        return "unset"
    if isinstance(value, tuple):
        return f"`{json.dumps(list(value))}`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        return f"`{int(value)}`"
    return f"`{value}`"


if __name__ == "__main__":
    write()
