"""Who a request is for, as fair shares (app.batching.fair) and the per-caller metrics see it.

A caller is an API key (its ``name=`` in the key file says which class it is counted under in
the metrics, its ``weight=`` how many turns it gets to another's one), or, when keys are off, a
client address, counted as "anonymous": addresses are the world's to invent, so they never
become metric labels, and key names are the operator's, as many as the key file has lines.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True)
class Caller:
    identity: str  # who shares: the key's digest or the client's address (never a label)
    label: str  # the class it is counted under in metrics: a key's name, "unnamed", "anonymous"
    weight: int = 1


ANONYMOUS = Caller("anonymous", "anonymous")
# Set per request where its key is checked; read by every queue it waits in.
caller: ContextVar[Caller] = ContextVar("resnet_serve_caller", default=ANONYMOUS)


def by_address(host: str | None) -> Caller:
    """The caller when keys are off: the client's address (behind a proxy, the one uvicorn reads
    from ``X-Forwarded-For`` when the proxy's address is in ``FORWARDED_ALLOW_IPS``)."""
    return Caller(f"address:{host}", ANONYMOUS.label) if host else ANONYMOUS
