from __future__ import annotations

import pytest

from app.batching.admission import Lifecycle
from app.errors import NotReady, ShuttingDown

pytestmark = pytest.mark.anyio


async def test_ready_only_once_warmed_and_never_after_a_failure() -> None:
    lifecycle = Lifecycle(retry_after_s=3)
    with pytest.raises(NotReady, match="warming up") as warming:
        lifecycle.check_admitting()
    assert warming.value.headers == {"Retry-After": "3"}
    lifecycle.mark_warmed()
    assert lifecycle.ready
    lifecycle.fail(RuntimeError("batcher died"))
    assert not lifecycle.ready
    with pytest.raises(NotReady, match="broken"):
        lifecycle.check_admitting()


async def test_draining_refuses_with_retry_after() -> None:
    lifecycle = Lifecycle(retry_after_s=2)
    lifecycle.mark_warmed()
    lifecycle.draining = True
    with pytest.raises(ShuttingDown) as refused:
        lifecycle.check_admitting()
    assert refused.value.headers == {"Retry-After": "2"}
