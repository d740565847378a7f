"""The docs stay true to the code: the configuration reference and the README's table come from,
or are checked against, ``Settings``. (``make docs`` builds the site with ``--strict``.)"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

from app.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]


def hook() -> ModuleType:
    path = ROOT / "docs" / "hooks" / "settings_reference.py"
    spec = importlib.util.spec_from_file_location("settings_reference", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_rows(text: str) -> dict[str, list[str]]:
    """Markdown table rows keyed by their first cell's ``RESNET_SERVE_*`` variable."""
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        found = re.fullmatch(rf"`({ENV_PREFIX}[A-Z0-9_]+)`", cells[0]) if cells else None
        if found:
            rows[found.group(1)] = cells
    return rows


def test_the_reference_lists_every_setting_with_its_default_and_description() -> None:
    rows = table_rows(hook().reference())
    assert set(rows) == {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    assert rows["RESNET_SERVE_MAX_BATCH_SIZE"][1] == "`8`"
    assert rows["RESNET_SERVE_API_KEYS_FILE"][1] == "unset"
    assert rows["RESNET_SERVE_PIN_WORKERS"][1] == "`true`"
    assert all(cells[2] for cells in rows.values())


def test_the_configuration_page_holds_the_table_generated_from_settings() -> None:
    module = hook()
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert module.committed(page) == module.reference()  # else: python docs/hooks/...
    assert set(table_rows(page)) == set(table_rows(module.reference()))
    assert module.on_page_markdown(page) == page


def test_the_docs_build_refuses_a_stale_settings_table() -> None:
    module = hook()
    page = (ROOT / "docs" / "configuration.md").read_text()
    stale = page.replace("| `RESNET_SERVE_PORT` | `8000` |", "| `RESNET_SERVE_PORT` | `8080` |")
    assert stale != page
    with pytest.raises(ValueError, match=r"settings_reference\.py"):
        module.on_page_markdown(stale)


def test_the_readme_table_agrees_with_settings() -> None:
    module = hook()
    readme = table_rows((ROOT / "README.md").read_text())
    assert len(readme) >= 10
    for variable, cells in readme.items():
        name = variable.removeprefix(ENV_PREFIX).lower()
        assert name in Settings.model_fields, f"README names {variable}, which is no setting"
        assert cells[1] == module.default(Settings.model_fields[name]), variable
