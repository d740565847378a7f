"""Images by URL (``{"urls": [...]}``): fetched by the server, only from the hosts the operator
allows (``url_allow``), never from an address inside the server's own networks unless an entry
names it (docs/security.md, "Images by URL").

Server-side fetches are the classic way into a private network (SSRF): a URL naming, or
resolving to, 127.0.0.1, 10.0.0.0/8 or the cloud metadata address 169.254.169.254 must not be
fetched. So:

- a URL's host must match an entry: a host name (``images.example.com``), a pattern of them
  (``*.example.com``), or an IP address or network (``10.1.2.0/24``) for IP literals;
- every address a host name resolves to is checked when the connection is made (the resolver
  below: the connection goes to the address checked, so a DNS answer that changes between check
  and connect cannot slip through), and loopback, private, link-local, multicast, reserved and
  unspecified addresses are refused unless an IP or network entry holds them;
- only http and https; redirects followed by hand, at most ``url_max_redirects``, each hop
  checked again; the body cut at ``max_image_bytes``, the whole fetch at ``url_timeout_ms``,
  and at most ``url_fetch_concurrency`` fetches at once per worker.
"""

from __future__ import annotations

import asyncio
import fnmatch
import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from core.errors import PayloadTooLarge, ServiceError

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
REDIRECTS = frozenset({301, 302, 303, 307, 308})
CHUNK = 64 * 1024


class UrlNotAllowed(ServiceError):
    status_code = 403
    code = "url_not_allowed"


class UrlFetchFailed(ServiceError):
    status_code = 422
    code = "url_fetch_failed"


@dataclass(frozen=True)
class UrlPolicy:
    """Which URLs may be fetched (``url_allow``) and the limits of a fetch."""

    hosts: tuple[str, ...]  # names and fnmatch patterns, lower case
    networks: tuple[Network, ...]  # IP addresses (as /32, /128) and networks
    max_bytes: int
    timeout_s: float
    max_redirects: int
    concurrency: int

    @classmethod
    def parse(
        cls,
        entries: tuple[str, ...],
        max_bytes: int,
        timeout_ms: float,
        max_redirects: int,
        concurrency: int,
    ) -> UrlPolicy:
        hosts, networks = [], []
        for entry in entries:
            try:
                networks.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError:
                hosts.append(entry.strip().lower().rstrip("."))
        limits = (max_bytes, timeout_ms / 1000, max_redirects, concurrency)
        return cls(tuple(hosts), tuple(networks), *limits)

    @property
    def on(self) -> bool:
        return bool(self.hosts or self.networks)

    def check_url(self, url: str) -> tuple[str, Address | None]:
        """The URL's host (and its address, for an IP literal); UrlNotAllowed otherwise."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise UrlNotAllowed(f"{_shown(url)}: only http and https URLs are fetched")
        host = (parts.hostname or "").rstrip(".")
        if not host:
            raise UrlNotAllowed(f"{_shown(url)}: no host")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            if not any(fnmatch.fnmatchcase(host, pattern) for pattern in self.hosts):
                raise UrlNotAllowed(f"{_shown(url)}: host {host!r} is not in url_allow") from None
            return host, None
        self.check_address(host, address)
        return host, address

    def check_address(self, host: str, address: Address) -> None:
        """An IP literal must be in an entry; an address a name resolves to must be public or
        in an entry."""
        named = any(address in network for network in self.networks)
        if named:
            return
        if host == str(address):
            raise UrlNotAllowed(f"address {address} is not in url_allow")
        if not address.is_global or address.is_multicast:
            raise UrlNotAllowed(
                f"host {host!r} resolves to {address}, an address of a private, loopback, "
                "link-local or multicast range, which url_allow does not name"
            )


class _CheckedResolver(AbstractResolver):
    """The system's resolver, every answer checked against the policy before a connection."""

    def __init__(self, policy: UrlPolicy) -> None:
        self._policy = policy
        self._inner = aiohttp.ThreadedResolver()  # getaddrinfo on a thread: the loop goes on

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        for entry in found:
            self._policy.check_address(host, ipaddress.ip_address(entry["host"]))
        return found

    async def close(self) -> None:
        await self._inner.close()


class Fetcher:
    """One worker's fetches. Create in the running loop; ``close`` when done."""

    def __init__(self, policy: UrlPolicy) -> None:
        self.policy = policy
        self._session: aiohttp.ClientSession | None = None
        self._slots = asyncio.Semaphore(policy.concurrency)

    async def fetch(self, url: str) -> bytes:
        """The body at ``url``, following allowed redirects; UrlNotAllowed, UrlFetchFailed or
        PayloadTooLarge otherwise."""
        if not self.policy.on:
            raise UrlNotAllowed(
                "images by URL are off: url_allow (RESNET_SERVE_URL_ALLOW) is empty"
            )
        async with self._slots:
            try:
                async with asyncio.timeout(self.policy.timeout_s):
                    return await self._follow(url)
            except TimeoutError:
                raise UrlFetchFailed(
                    f"{_shown(url)}: no whole answer within url_timeout_ms="
                    f"{self.policy.timeout_s * 1000:g}"
                ) from None
            except (aiohttp.ClientError, OSError) as exc:
                raise UrlFetchFailed(f"{_shown(url)}: cannot fetch it: {_reason(exc)}") from None

    async def fetch_all(self, urls: Sequence[str], element: str = "url") -> list[bytes]:
        """Every URL's body, fetched at once. The first failure stops the others and is raised,
        naming which of them: ``url 1: ...`` (``element`` says what an item is called)."""
        fetches = [asyncio.ensure_future(self.fetch(url)) for url in urls]
        try:
            await asyncio.wait(fetches, return_when=asyncio.FIRST_EXCEPTION)
        finally:  # one failed (or the request went): the others stop, and are waited for
            for fetch in fetches:
                fetch.cancel()
            outcomes = await asyncio.gather(*fetches, return_exceptions=True)
        # The failure that stopped the others first: those it cancelled are no answer of their own.
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        failures.sort(key=lambda o: isinstance(o, asyncio.CancelledError))
        if failures:
            first = failures[0]
            if isinstance(first, ServiceError):
                index = outcomes.index(first)
                raise type(first)(f"{element} {index}: {first.message}", headers=first.headers)
            raise first  # a bug, or this request itself cancelled
        return [data for data in outcomes if isinstance(data, bytes)]  # all of them, by now

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _follow(self, url: str) -> bytes:
        session = self._session_now()
        for _ in range(self.policy.max_redirects + 1):
            self.policy.check_url(url)
            async with session.get(url, allow_redirects=False) as response:
                if response.status in REDIRECTS and "location" in response.headers:
                    url = urljoin(url, response.headers["location"])
                    continue
                if response.status != 200:
                    raise UrlFetchFailed(f"{_shown(url)}: answered HTTP {response.status}")
                return await self._body(url, response)
        raise UrlFetchFailed(
            f"{_shown(url)}: more than url_max_redirects={self.policy.max_redirects} redirects"
        )

    async def _body(self, url: str, response: aiohttp.ClientResponse) -> bytes:
        limit = self.policy.max_bytes
        if response.content_length is not None and response.content_length > limit:
            raise _too_large(url, response.content_length, limit)
        chunks, size = [], 0
        async for chunk in response.content.iter_chunked(CHUNK):
            size += len(chunk)
            if size > limit:
                raise _too_large(url, size, limit)
            chunks.append(chunk)
        return b"".join(chunks)

    def _session_now(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                resolver=_CheckedResolver(self.policy),
                use_dns_cache=False,  # every fetch resolves, and is checked, again
                limit=self.policy.concurrency,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                headers={"User-Agent": "resnet-serve"},
                auto_decompress=True,
            )
        return self._session


def _too_large(url: str, size: int, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"{_shown(url)}: at least {size} bytes, over max_image_bytes={limit}")


def _reason(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _shown(url: str) -> str:
    """The URL as an error names it: bounded, and without credentials."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        url = parts._replace(netloc=host if parts.port is None else f"{host}:{parts.port}").geturl()
    return repr(url[:200])
