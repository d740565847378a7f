"""Who may call what, for every transport: the access each route or call declares, the API keys
(read from files, rotated live) and the check of a call's key against them.

Protected when a key set is configured, by the access each route or call declares:
``Access.INFERENCE`` and ``Access.API`` by the API keys, ``Access.METRICS`` by the metrics keys,
``Access.REPOSITORY`` by the repository keys (and refused while other keys are in use but no
repository keys are). Health probes, the docs and the page are ``Access.OPEN``. A key comes as
``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` (HTTP headers, or gRPC metadata).

Key files: one key per line, blank lines and ``#`` comments ignored; rotated live.

A line is the key, optionally followed by, once each and in any order:

- ``name=<class>``: the caller class its requests are counted under in the metrics (letters,
  digits, ``._-``, up to 64; keys without one count as "unnamed");
- ``weight=<1..100>``: its share when callers of its priority compete (app.batching.fair;
  default 1);
- ``priority=high|normal|low``: which callers' work every queue serves first (default normal);
- ``rate=<requests per second>`` and ``burst=<requests>``: its rate limit (app.edge.limits;
  default none; the burst defaults to one second's worth, at least 1)::

    3c9f...e1  name=mobile-app  weight=3  priority=high  rate=50  burst=100

The file is re-read when it changes (its size, mtime or inode, looked at once per
``check_interval_s`` at most, on the request path) and on ``reload()`` (SIGHUP). Keys are never
logged, only their count.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

from app.edge.requests import Caller, Priority, Rate
from app.settings import Settings
from core.errors import ServiceError

# Where a route declares its access: its decorator's ``openapi_extra`` (shown in the OpenAPI
# document as ``x-access``), read by the HTTP route table (app.http.routing).
ACCESS_KEY = "x-access"


class Access(StrEnum):
    OPEN = "open"  # the docs, the page: never guarded
    PROBE = "probe"  # health and readiness: open, and logged at debug (probes come every second)
    API = "api"  # the API keys (the model's description)
    INFERENCE = "inference"  # the API keys, then admission before the body is read
    METRICS = "metrics"  # the metrics keys
    REPOSITORY = "repository"  # the repository keys: loading and unloading models


def access(kind: Access, **openapi_extra: Any) -> dict[str, Any]:
    """A route decorator's ``openapi_extra``, declaring ``kind`` beside any other extras."""
    return {**openapi_extra, ACCESS_KEY: kind.value}


# Which key set guards each kind of call; the rest are open.
KEY_SETS = {
    Access.API: "api",
    Access.INFERENCE: "api",
    Access.METRICS: "metrics",
    Access.REPOSITORY: "repository",
}
_CHALLENGE = 'Bearer realm="resnet-serve"'
_MESSAGES = {
    "missing": "an API key is required: send Authorization: Bearer <key> or X-API-Key: <key>",
    "empty": "the API key is empty",
    "too_long": "the API key is longer than {limit} bytes",
    "invalid": "the API key is not valid",
}


class KeyRefused(ServiceError):
    """A call refused for its key, as every transport answers it: 401 (the key is missing, empty,
    too long or not valid; with the Bearer challenge, which HTTP sends) or 403 (keys are in use,
    but none may make this call). ``reason``: the metrics label."""

    def __init__(self, status_code: int, code: str, message: str, reason: str) -> None:
        headers = {}
        if status_code == 401:
            invalid = ', error="invalid_token"' if reason != "missing" else ""
            headers["WWW-Authenticate"] = _CHALLENGE + invalid
        super().__init__(message, headers=headers)
        self.status_code, self.code, self.reason = status_code, code, reason


def check_key(
    access: Access, headers: Mapping[bytes, bytes], keys: Mapping[str, KeyFile]
) -> Caller | None:
    """The caller a call of ``access`` with these headers (or gRPC metadata) is for, by its key,
    or None where no key guards it; raises KeyRefused."""
    name = KEY_SETS.get(access)
    key_set = keys.get(name) if name is not None else None
    if name == "repository" and key_set is None and keys:
        # Keys are in use, but none may change models: an inference key must not unload.
        message = (
            "the repository API needs a repository key, and none is configured "
            "(RESNET_SERVE_REPOSITORY_API_KEYS_FILE)"
        )
        raise KeyRefused(403, "forbidden", message, "no_key_set")
    if key_set is None:
        return None
    found = identify(presented_key(headers), key_set)
    if isinstance(found, Caller):
        return found
    raise KeyRefused(401, "unauthorized", _MESSAGES[found].format(limit=MAX_KEY_BYTES), found)


def key_files(settings: Settings) -> dict[str, KeyFile]:
    """The configured key sets by name, each read now (raises KeyFileError)."""
    paths = {
        "api": settings.api_keys_file,
        "metrics": settings.metrics_api_keys_file,
        "repository": settings.repository_api_keys_file,
    }
    return {name: KeyFile(path, name) for name, path in paths.items() if path is not None}


def presented_key(headers: Mapping[bytes, bytes]) -> bytes | None:
    """The key the call carries: a Bearer token, else X-API-Key; None when it has neither."""
    scheme, _, token = headers.get(b"authorization", b"").strip().partition(b" ")
    if scheme.lower() == b"bearer":
        return token.strip()
    return headers.get(b"x-api-key")


def identify(key: bytes | None, keys: KeyFile) -> Caller | str:
    """The caller ``key`` stands for, or why it is refused (a metrics label)."""
    if key is None:
        return "missing"
    if not key:
        return "empty"
    if len(key) > MAX_KEY_BYTES:
        return "too_long"
    return keys.match(key) or "invalid"


log = logging.getLogger(__name__)

# Longer presented keys are refused before any comparison: bounds the work an attacker can ask for.
MAX_KEY_BYTES = 256
CHECK_INTERVAL_S = 1.0
# Visible ASCII: what a header carries unchanged through every client, proxy and shell.
_PRINTABLE = range(0x21, 0x7F)
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_WEIGHT = 100
MAX_RATE = 1e6  # requests per second: beyond it a limit means nothing
_OPTIONS = ("name", "weight", "priority", "rate", "burst")
UNNAMED = "unnamed"

Signature = tuple[int, int, int]


class KeyFileError(Exception):
    """A key file that cannot be used at start-up: one line for the operator, never a key."""


def parse_keys(text: str, source: str) -> dict[bytes, Caller]:
    """Each key with the caller it stands for (its name and weight)."""
    keys: dict[bytes, Caller] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        key, *options = words
        where = f"{source} line {number}"
        raw = key.encode()
        if len(raw) > MAX_KEY_BYTES:
            raise KeyFileError(f"{where}: key longer than {MAX_KEY_BYTES} bytes")
        if any(byte not in _PRINTABLE for byte in raw):
            raise KeyFileError(f"{where}: key has a character that is not visible ASCII")
        keys.setdefault(raw, _caller(raw, options, where))
    if not keys:
        raise KeyFileError(f"{source} holds no keys")
    return keys


def _caller(raw: bytes, options: list[str], where: str) -> Caller:
    fields: dict[str, str] = {}
    for option in options:
        field, equals, value = option.partition("=")
        if not equals or field not in _OPTIONS or field in fields:
            raise KeyFileError(
                f"{where}: after the key only name=, weight=, priority=, rate= and burst= may "
                "follow, once each"
            )
        fields[field] = value
    name = fields.get("name", UNNAMED)
    if not _NAME.fullmatch(name):
        raise KeyFileError(f"{where}: name must be 1-64 letters, digits, '.', '_' or '-'")
    weight = fields.get("weight", "1")
    if not weight.isdigit() or not 1 <= int(weight) <= MAX_WEIGHT:
        raise KeyFileError(f"{where}: weight must be a whole number from 1 to {MAX_WEIGHT}")
    priority = fields.get("priority", "normal")
    if priority.upper() not in Priority.__members__:
        raise KeyFileError(f"{where}: priority must be high, normal or low")
    # Who shares is the key itself (its digest: the key never leaves this module).
    identity = "key:" + hashlib.sha256(raw).hexdigest()[:32]
    rate = _rate(fields.get("rate"), fields.get("burst"), where)
    return Caller(identity, name, int(weight), Priority[priority.upper()], rate)


def _rate(rate: str | None, burst: str | None, where: str) -> Rate | None:
    if rate is None:
        if burst is not None:
            raise KeyFileError(f"{where}: burst= needs a rate= beside it")
        return None
    try:
        per_second = float(rate)
    except ValueError:
        per_second = math.nan
    if not 0 < per_second <= MAX_RATE:  # NaN fails too
        raise KeyFileError(f"{where}: rate must be requests per second, above 0, at most 1e6")
    if burst is None:
        return Rate(per_second, max(1, math.ceil(per_second)))
    if not burst.isdigit() or not 1 <= int(burst) <= MAX_RATE:
        raise KeyFileError(f"{where}: burst must be a whole number of requests, at least 1")
    return Rate(per_second, int(burst))


class KeyFile:
    def __init__(
        self,
        path: Path,
        name: str,
        *,
        check_interval_s: float = CHECK_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``name`` says which key set this is in logs ("api", "metrics"). Raises KeyFileError."""
        self.path = path
        self.name = name
        self.check_interval_s = check_interval_s
        self.clock = clock
        self._digests, self._signature = self._read()
        self._next_check = clock() + check_interval_s
        self._log_loaded()

    @property
    def count(self) -> int:
        return len(self._digests)

    def match(self, candidate: bytes) -> Caller | None:
        """The caller ``candidate`` is the key of, or None. Constant time per key, and every key
        is compared: no early exit on a match."""
        self._check_for_change()
        # Digests are all one length: compare_digest's time then says nothing of a key's length.
        digest = hashlib.sha256(candidate).digest()
        found = None
        for key, who in self._digests:
            if hmac.compare_digest(key, digest):
                found = who
        return found

    def reload(self) -> None:
        """Re-read now. A file that is unreadable or holds no keys keeps the current keys in use."""
        try:
            self._digests, self._signature = self._read()
        except KeyFileError as exc:
            log.warning(
                "api keys not reloaded; the previous keys stay in use",
                extra={"key_set": self.name, "reason": str(exc)},
            )
            return
        self._log_loaded()

    def _check_for_change(self) -> None:
        now = self.clock()
        if now < self._next_check:
            return
        self._next_check = now + self.check_interval_s
        try:
            signature = _signature(os.stat(self.path))
        except OSError:
            signature = (0, 0, 0)
        if signature != self._signature:
            # Remembered even if the reload fails: a bad file is reported once, not every second.
            self._signature = signature
            self.reload()

    def _read(self) -> tuple[tuple[tuple[bytes, Caller], ...], Signature]:
        try:
            with self.path.open(encoding="utf-8") as file:
                signature = _signature(os.fstat(file.fileno()))
                text = file.read()
        except OSError as exc:
            raise KeyFileError(f"cannot read {self._source}: {exc.strerror}") from None
        except UnicodeDecodeError:
            # The exception's own text would quote a byte of the file.
            raise KeyFileError(f"{self._source} is not UTF-8 text") from None
        keys = parse_keys(text, self._source)
        digests = tuple((hashlib.sha256(key).digest(), who) for key, who in keys.items())
        return digests, signature

    @property
    def _source(self) -> str:
        return f"the {self.name} key file {self.path}"

    def _log_loaded(self) -> None:
        log.info("api keys loaded", extra={"key_set": self.name, "keys": self.count})


def _signature(stat: os.stat_result) -> Signature:
    # The inode catches Kubernetes' Secret updates, which swap a symlink to a new file.
    return stat.st_ino, stat.st_size, stat.st_mtime_ns
