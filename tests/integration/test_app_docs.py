"""/docs, /redoc and the page load every asset from this server; each is counted under its route."""

from __future__ import annotations

import re

import pytest

from tests.conftest import Serve
from tests.helpers.metrics import families

pytestmark = pytest.mark.anyio

REFERENCES = re.compile(r"""(?:src|href|url)\s*[=:(]\s*["']([^"']+)["']""")


@pytest.mark.parametrize("page", ["/docs", "/redoc", "/"])
async def test_pages_reference_no_external_host(serve: Serve, page: str) -> None:
    async with serve() as client:
        html = (await client.get(page)).text
        assert "//" not in html.replace("://", ""), "no protocol-relative URLs"
        assert not re.search(r"https?://", html), re.findall(r"https?://\S+", html)
        references = REFERENCES.findall(html)
        assert references, "the page loads its assets from somewhere"
        for reference in references:
            assert reference.startswith("/"), reference
            if reference != "/docs" and reference != "/metrics":
                response = await client.get(reference)
                assert response.status_code == 200, reference
                assert len(response.content) > 100, reference


async def test_docs_schema_and_static_files_are_counted_under_their_route(serve: Serve) -> None:
    async with serve() as client:
        for path in ("/docs", "/redoc", "/openapi.json", "/", "/static/page.js", "/nope"):
            await client.get(path)
        text = (await client.get("/metrics")).text
    counted = {
        sample.labels["endpoint"]: sample.labels["status"]
        for sample in families(text)["resnet_serve_requests"].samples
        if sample.name.endswith("_total")
    }
    assert counted == {
        "/docs": "200",
        "/redoc": "200",
        "/openapi.json": "200",
        "/": "200",
        "/static": "200",
        "unmatched": "404",
    }
