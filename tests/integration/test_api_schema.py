"""Schemathesis against ``/openapi.json`` of a real ``python -m app``: the schema tells the truth.

Every check (no 5xx, documented statuses, headers and bodies, schema-valid requests accepted,
invalid ones refused), bounded in examples per operation and seeded, so the run is repeatable.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Serve
from tests.helpers.server import message_is, run_server

MAX_EXAMPLES = 100


def test_schemathesis_finds_no_mismatch(model_path: Path, tmp_path: Path) -> None:
    with run_server(model_path) as server:
        server.wait_for_log(message_is("ready"))
        command = [
            *(sys.executable, "-m", "schemathesis.cli", "--no-color"),
            *("--config-file", str(Path(__file__).with_name("schemathesis.toml"))),
            *("run", f"{server.url}/openapi.json", "--checks", "all"),
            *("--max-examples", str(MAX_EXAMPLES), "--seed", "0", "--workers", "1"),
            # Loading and unloading change what the server serves: a fuzzer that unloads the
            # model makes every later answer a 404 or 503.
            # tests/integration/test_app_repository.py covers them; the repository index is
            # fuzzed with the rest.
            *("--exclude-path-regex", "^/v2/repository/models/"),
        ]
        done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    selected = re.search(r"Selected: (\d+)/\d+", done.stdout)
    assert selected is not None, done.stdout[-2000:]
    assert int(selected.group(1)) >= 5  # /predict, /healthz, /readyz, /metrics, /v1/model
    generated = re.search(r"(\d+) generated, \1 passed", done.stdout)
    assert generated is not None, done.stdout[-2000:]
    assert int(generated.group(1)) >= MAX_EXAMPLES


@pytest.mark.anyio
async def test_bounds_come_from_settings_and_model(serve: Serve) -> None:
    async with serve(max_images_per_request=3, default_top_k=20) as client:
        schema = (await client.get("/openapi.json")).json()
    predict = schema["paths"]["/predict"]["post"]
    body = predict["requestBody"]["content"]
    files = body["multipart/form-data"]["schema"]["properties"]["files"]
    assert (files["minItems"], files["maxItems"], files["items"]["minLength"]) == (1, 3, 1)
    assert body["image/*"]["schema"]["minLength"] == 1
    parameters = {parameter["name"]: parameter for parameter in predict["parameters"]}
    assert set(parameters) == {"top_k", "model", "version", "timeout_ms"}
    assert parameters["timeout_ms"]["schema"]["anyOf"][0]["exclusiveMinimum"] == 0
    # The models and versions being served, so a fuzzer asks for those.
    assert parameters["model"]["schema"] == {"type": "string", "enum": ["tiny-test"]}
    assert parameters["version"]["schema"] == {"type": "string", "enum": ["7"]}
    assert parameters["top_k"]["schema"] | {"title": ""} == {
        "type": "integer",
        "minimum": 1,
        "maximum": 10,  # the tiny model's classes
        "default": 10,  # default_top_k capped at the classes
        "title": "",
    }
    explain = {p["name"]: p["schema"] for p in schema["paths"]["/explain"]["post"]["parameters"]}
    assert (explain["class_id"]["minimum"], explain["class_id"]["maximum"]) == (0, 9)
    assert explain["top_k"]["maximum"] == 10
    for path in ("/embed", "/explain"):
        content = schema["paths"][path]["post"]["requestBody"]["content"]
        assert content["multipart/form-data"]["schema"]["properties"]["files"]["maxItems"] == 3
    documented = predict["responses"]
    assert set(documented) == {
        *("200", "400", "401", "403", "404", "413", "415", "422", "500", "503", "504"),
    }
    assert "Retry-After" in documented["503"]["headers"]
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    for status in documented.keys() - {"200"}:
        assert documented[status]["content"]["application/json"]["schema"] == error, status
