"""ASGI middleware shared by both embedded CRMs: Date header, body limit, rate limit,
authentication, fault injection.

Pure ASGI (no ``BaseHTTPMiddleware``) so they run before routing and body parsing: an
unauthenticated call is refused 401 even when its body is malformed, an oversized body is
refused 413 before it is read, and a dropped connection really drops.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import asdict, dataclass
from typing import Any

from crm_assets.embedded.clock import Clock

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Paths anyone may call: the API description and the OAuth2 token endpoint.
PUBLIC_PATHS = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
ADMIN_PREFIX = "/_admin/"
#: Request bodies above this are refused 413 (a CRMOffice batch of 100 full records is a
#: few hundred KiB, at most a few MiB even with every string 4-byte UTF-8).
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
log = logging.getLogger("crm_assets.embedded")


async def send_json(
    send: Send, status: int, body: Any, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    payload = json.dumps(body).encode()
    raw = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        *(headers or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


class DateHeaderMiddleware:
    """Give every response exactly one ``Date`` header, read from the service's clock.

    Outermost (uvicorn runs with ``date_header=False``), so the 413, 429 and 401 of the
    other middleware and Starlette's own 500 carry it too, and a clock offset shows in it.
    """

    def __init__(self, app: ASGIApp, clock: Clock) -> None:
        self.app = app
        self.clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_dated(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"date"]
                headers.append((b"date", self.clock.http_date().encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_dated)


class BodyLimitMiddleware:
    """Refuse request bodies above ``max_bytes`` with 413, before reading them.

    A ``Content-Length`` above the limit is answered at once, nothing of the body read. A
    body without one (chunked) is counted as the app reads it: once past the limit the app
    gets ``http.disconnect`` instead of more bytes, the client gets the 413 (when nothing
    was answered yet) and whatever the app answers afterwards is dropped. Either way the
    response says ``Connection: close``: the unread rest of the body is never read.
    Runs outside authentication and rate limiting, so they never read a body either.
    """

    def __init__(self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _refuse(self, send: Send) -> None:
        message = f"request body larger than {self.max_bytes} bytes"
        await send_json(
            send,
            413,
            {"errors": [{"field": "body", "message": message}]},
            [(b"connection", b"close")],
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            log.warning(
                "refused %s %s: Content-Length %d > %d",
                scope["method"],
                scope["path"],
                declared,
                self.max_bytes,
            )
            await self._refuse(send)
            return
        received = 0
        refused = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    log.warning(
                        "refused %s %s: body past %d bytes",
                        scope["method"],
                        scope["path"],
                        self.max_bytes,
                    )
                    if not started:
                        await self._refuse(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 is the answer
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not refused:
                raise
            # the app saw a disconnect it could not handle (e.g. ClientDisconnect): answered


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server refuses it; counting still applies
    return None


class TokenBucket:
    """``rate`` requests per second on average, bursts of up to ``max(1, rate)``."""

    def __init__(self, rate: float) -> None:
        self.rate = float(rate)
        self.capacity = max(1.0, self.rate)
        self.tokens = self.capacity
        self.updated = time.monotonic()
        self._lock = threading.Lock()

    def take(self) -> float:
        """Take one token; returns 0.0 when allowed, else the seconds until one is free."""
        with self._lock:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return 0.0
            return (1.0 - self.tokens) / self.rate


class RateLimitMiddleware:
    """Answer 429 with an integer ``Retry-After`` (>= 1 s) once the bucket is empty.

    The admin endpoints and the API description are exempt: a test harness must always be
    able to reconfigure a throttled service.
    """

    def __init__(self, app: ASGIApp, rate: float | None) -> None:
        self.app = app
        self.bucket = TokenBucket(rate) if rate and rate > 0 else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.bucket is None or scope["type"] != "http" or _exempt(scope["path"]):
            await self.app(scope, receive, send)
            return
        wait = self.bucket.take()
        if wait > 0:
            retry_after = max(1, math.ceil(wait))
            await send_json(
                send,
                429,
                {
                    "error": "rate_limited",
                    "message": f"rate limit exceeded, retry in {retry_after}s",
                },
                [(b"retry-after", str(retry_after).encode())],
            )
            return
        await self.app(scope, receive, send)


def _exempt(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(ADMIN_PREFIX)


def bearer_token(scope: Scope) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, if any."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


class AuthMiddleware:
    """Refuse every call without a valid bearer token (401), except the public paths.

    ``check`` gets the token and returns ``None`` when it is valid, else the reason, which is
    put into ``WWW-Authenticate`` (never the token itself).
    """

    def __init__(
        self,
        app: ASGIApp,
        check: Callable[[str | None], str | None],
        public: frozenset[str] = PUBLIC_PATHS,
    ) -> None:
        self.app = app
        self.check = check
        self.public = public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.public:
            await self.app(scope, receive, send)
            return
        problem = self.check(bearer_token(scope))
        if problem is not None:
            await send_json(
                send,
                401,
                {"error": "unauthorized", "message": problem},
                [
                    (
                        b"www-authenticate",
                        f'Bearer error="invalid_token", error_description="{problem}"'.encode(),
                    )
                ],
            )
            return
        await self.app(scope, receive, send)


@dataclass
class FaultConfig:
    """What ``POST /_admin/faults`` sets; all zero means no faults.

    - ``error_rate``: share of calls answered 500/503 *before* anything is done;
    - ``post_write_error_rate``: share of calls whose work is done and committed, but
      answered 500 (the client cannot know the write happened);
    - ``latency_ms``: added to every call;
    - ``drop_rate``: share of calls whose work is done and committed, then the connection
      is closed mid-response (the client sees a transport error);
    - ``throttle_rate``: share of calls answered 429 with ``Retry-After: 1`` (bursts);
    - ``batch_item_error_rate``: share of batch items (where the API has batches) failing with 500, unapplied.
    """

    error_rate: float = 0.0
    post_write_error_rate: float = 0.0
    latency_ms: int = 0
    drop_rate: float = 0.0
    throttle_rate: float = 0.0
    batch_item_error_rate: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Faults:
    """The live fault configuration of one service plus its random source."""

    def __init__(self, enabled: bool, seed: int | None = None) -> None:
        self.enabled = enabled
        self.config = FaultConfig()
        self.random = random.Random(seed)

    def clear(self) -> None:
        self.config = FaultConfig()

    def roll(self, rate: float) -> bool:
        return rate > 0 and self.random.random() < rate


class FaultMiddleware:
    """Inject the configured faults into every call but the admin and public ones."""

    def __init__(self, app: ASGIApp, faults: Faults) -> None:
        self.app = app
        self.faults = faults

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        faults = self.faults
        if not faults.enabled or scope["type"] != "http" or _exempt(scope["path"]):
            await self.app(scope, receive, send)
            return
        config = faults.config
        if config.latency_ms > 0:
            await asyncio.sleep(config.latency_ms / 1000)
        if faults.roll(config.throttle_rate):
            await send_json(
                send,
                429,
                {"error": "rate_limited", "message": "injected throttling"},
                [(b"retry-after", b"1")],
            )
            return
        if faults.roll(config.error_rate):
            status = faults.random.choice((500, 503))
            await send_json(send, status, {"error": "injected_fault", "message": "injected fault"})
            return
        drop = faults.roll(config.drop_rate)
        late_error = not drop and faults.roll(config.post_write_error_rate)
        if not drop and not late_error:
            await self.app(scope, receive, send)
            return

        async def swallow(_message: Message) -> None:
            return None

        await self.app(scope, receive, swallow)  # the work happens, its answer is lost
        if late_error:
            await send_json(send, 500, {"error": "injected_fault", "message": "injected fault"})
            return
        # Start a response and return without finishing it: uvicorn closes the connection,
        # the client gets a truncated answer / "server disconnected".
        log.warning("injected fault: dropping the answer to %s %s", scope["method"], scope["path"])
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"4096")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"items": [', "more_body": True})
