"""What both CRM clients share: the error types, the retry policy, response checks.

Errors say which system, which call and why, never with credentials: request
headers are not part of any message, and URLs carry no secrets.

Every response a client receives is read with a size bound (``max_response_bytes``)
and its ``Date`` header sampled for the server's clock offset (``clock_offset()``);
both happen in the client's httpx response hook, so every call is covered.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import random
import ssl
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import httpx
import tenacity
from limits import RateLimitItemPerSecond
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

log = logging.getLogger("crm_assets.http")

T = TypeVar("T")
R = TypeVar("R")
C = TypeVar("C", bound="HttpClient")


def rfc3339(moment: datetime) -> str:
    """An RFC 3339 timestamp in UTC with microseconds, as the CRM APIs take them."""
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


class CrmError(Exception):
    """A call to a CRM failed; the message names the system, the call and the reason."""

    def __init__(self, system: str, call: str, reason: str, status: int | None = None) -> None:
        self.system, self.call, self.reason, self.status = system, call, reason, status
        super().__init__(f"{system}: {call} failed: {reason}")


class CrmUnavailable(CrmError):
    """Transport errors, 5xx or 429 that outlasted the retries: the system is unreachable.

    ``maybe_applied`` is true when a call that is not idempotent may have taken effect
    (its answer was lost or was a 5xx): the caller resolves it instead of resending.
    """

    maybe_applied = False


class CrmAuthError(CrmError):
    """401/403: the credentials are wrong or not accepted."""


class CrmNotFound(CrmError):
    """404: the record does not exist (any more)."""


class CrmConflict(CrmError):
    """412: the record changed since it was read (If-Match mismatch)."""


class CrmValidationError(CrmError):
    """422 or another 4xx: the CRM rejected this record; ``errors`` lists fields and messages."""

    def __init__(
        self, system: str, call: str, reason: str, status: int, errors: list[dict[str, Any]]
    ) -> None:
        super().__init__(system, call, reason, status)
        self.errors = errors


class CrmProtocolError(CrmError):
    """The CRM answered something that breaks its contract (malformed or truncated JSON)."""


class Pacer:
    """Keeps a client under a CRM's rate limit, so its calls are not answered 429.

    A moving window of ``per_second`` calls (the ``limits`` library), shared by the
    client's threads: a call waits for a free slot instead of being throttled and
    sleeping out a whole ``Retry-After``.
    """

    def __init__(self, per_second: float) -> None:
        if per_second >= 1:
            self.item = RateLimitItemPerSecond(int(per_second), 1)
        else:
            self.item = RateLimitItemPerSecond(1, math.ceil(1 / per_second))
        self.limiter = MovingWindowRateLimiter(MemoryStorage())
        # the in-memory storage starts an expiry timer on first use: not safe to race
        self._lock = threading.Lock()

    def wait(self) -> None:
        while True:
            with self._lock:
                if self.limiter.hit(self.item):
                    return
                reset = self.limiter.get_window_stats(self.item).reset_time
            time.sleep(min(1.0, max(0.001, reset - time.time())))


def pace_hook(per_second: float) -> Callable[[httpx.Request], None]:
    """An httpx request hook that waits for a free slot under the rate limit."""
    pacer = Pacer(per_second)
    return lambda _request: pacer.wait()


class _Retryable(Exception):
    """An answer worth retrying (429, 5xx, transport error), with the server's Retry-After."""

    def __init__(self, error: CrmError, retry_after: float | None = None) -> None:
        super().__init__(str(error))
        self.error, self.retry_after = error, retry_after


def retry_after_seconds(response: httpx.Response) -> float | None:
    """The ``Retry-After`` header as seconds (delta or HTTP date), if present and sane."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class RetryPolicy:
    """Exponential backoff with full jitter that waits at least what Retry-After asks.

    Built on tenacity; the wait honours the server's Retry-After when there is one, and
    a wait that would end past the deadline is not started: the last error is raised.
    """

    def __init__(
        self, attempts: int = 6, initial: float = 0.2, maximum: float = 20.0, deadline: float = 120
    ) -> None:
        self.attempts = attempts
        self.initial = initial
        self.maximum = maximum
        self.deadline = deadline

    def _wait(self, state: tenacity.RetryCallState) -> float:
        backoff = random.uniform(0, min(self.maximum, self.initial * 2 ** (state.attempt_number)))
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _Retryable) and exc.retry_after is not None:
            return exc.retry_after + random.uniform(0, self.initial)
        return backoff

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn``; retry it on :class:`_Retryable`; raise the last error as a CrmError."""
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.attempts)
            | tenacity.stop_before_delay(self.deadline),
            wait=self._wait,
            retry=tenacity.retry_if_exception_type(_Retryable),
            before_sleep=lambda s: log.info(
                "retrying after %s (attempt %d)",
                s.outcome.exception() if s.outcome else "?",
                s.attempt_number,
            ),
            reraise=True,
        )
        try:
            return retrying(fn)
        except _Retryable as exc:
            raise exc.error from None


def check_response(
    system: str, call: str, response: httpx.Response, retry_server_errors: bool = True
) -> httpx.Response:
    """Turn a non-2xx answer into the matching CrmError (retryable ones wrapped).

    A 5xx on a call that is not idempotent may have taken effect, so with
    ``retry_server_errors=False`` it is raised at once for the caller to resolve.
    """
    status = response.status_code
    if status < 300:
        return response
    detail = _error_detail(response)
    if status == 429 or status >= 500:
        error = CrmUnavailable(system, call, f"HTTP {status}{detail}", status)
        if status >= 500 and not retry_server_errors:
            error.maybe_applied = True
            raise error
        raise _Retryable(error, retry_after_seconds(response))
    if status in (401, 403):
        raise CrmAuthError(system, call, f"HTTP {status}: credentials not accepted", status)
    if status == 404:
        raise CrmNotFound(system, call, "HTTP 404: not found", status)
    if status == 412:
        raise CrmConflict(system, call, "HTTP 412: the record changed since it was read", status)
    errors = _field_errors(response)
    raise CrmValidationError(system, call, f"HTTP {status}{detail}", status, errors)


def _field_errors(response: httpx.Response) -> list[dict[str, Any]]:
    try:
        body = response.json()
    except ValueError:
        return []
    errors = body.get("errors") if isinstance(body, dict) else None
    return [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []


def _error_detail(response: httpx.Response) -> str:
    errors = _field_errors(response)
    if errors:
        return ": " + "; ".join(f"{e.get('field')}: {e.get('message')}" for e in errors[:5])
    return ""


def json_body(system: str, call: str, response: httpx.Response) -> Any:
    """The response's JSON; a malformed or truncated body is a CrmProtocolError."""
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CrmProtocolError(
            system, call, f"malformed JSON in response ({len(response.content)} bytes): {exc}"
        ) from None


@contextmanager
def transport_errors(system: str, call: str, retry: bool = True) -> Iterator[None]:
    """Map httpx transport failures to CrmUnavailable; retryable unless ``retry`` is False.

    A request that may have reached the server (a read error, a dropped
    connection) is not retried when it is not idempotent: the caller resolves it.
    """
    try:
        yield
    except httpx.TransportError as exc:
        error = CrmUnavailable(system, call, f"{type(exc).__name__}: {exc or 'no answer'}")
        never_sent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
        if retry or never_sent:
            raise _Retryable(error) from None
        error.maybe_applied = True
        raise error from None


#: The largest response body a client reads (decoded bytes), unless told otherwise.
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024
#: ``clock_offset()`` is the median of this many latest ``Date`` samples.
CLOCK_SAMPLES = 20


def read_bounded(system: str, response: httpx.Response, limit: int) -> None:
    """Read a streamed ``response`` into memory, refusing a body above ``limit`` bytes.

    A ``Content-Length`` above the limit is refused before any of the body is read; a body
    without one is read chunk by chunk and refused as soon as it passes the limit. Either
    way a :class:`CrmProtocolError` naming the limit is raised and the rest is never read
    (the response is closed, its connection discarded). The limit applies to the body as
    the caller gets it, after any ``Content-Encoding`` is undone, so a compressed body
    cannot expand past it either.
    """
    call = f"{response.request.method} {response.request.url.path}"
    declared = response.headers.get("Content-Length", "")
    if declared.strip().isdigit() and int(declared) > limit:
        raise CrmProtocolError(
            system,
            call,
            f"response of {int(declared)} bytes (Content-Length) exceeds the "
            f"{limit}-byte limit (max_response_bytes)",
        )
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) > limit:
            raise CrmProtocolError(
                system,
                call,
                f"response body exceeds the {limit}-byte limit (max_response_bytes); "
                f"stopped reading after {len(body)} bytes",
            )
    # What Response.read() stores: the send that called the hook finds the body read.
    response._content = bytes(body)


def date_offset(response: httpx.Response, received: datetime) -> float | None:
    """Server ``Date`` minus ``received`` (local UTC at receipt), seconds; None without one."""
    value = response.headers.get("Date")
    if not value:
        return None
    try:
        server = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if server.tzinfo is None:
        server = server.replace(tzinfo=UTC)
    return (server - received).total_seconds()


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The process's one verifying TLS context (``SSL_CERT_FILE``/``SSL_CERT_DIR`` as httpx
    reads them): httpx otherwise loads the CA bundle anew for every client, about 0.1 s
    each, and a run builds a client per CRM in several of its steps."""
    return httpx.create_ssl_context()


class HttpClient:
    """What every CRM client shares: one pooled httpx client, pacing, retries, closing,
    a bound on response size and a reading of the server's clock.

    Every response (each retry and token call too) passes the client's response hook:
    its ``Date`` header is sampled (:meth:`clock_offset`) and its body read with
    :func:`read_bounded`: a body above ``max_response_bytes`` raises
    :class:`CrmProtocolError` (not retried) without being read whole.
    """

    system = "CRM"

    def __init__(
        self,
        base_url: str,
        headers: dict[str, str],
        timeout: float,
        retry: RetryPolicy | None,
        max_connections: int,
        rate_limit: float | None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        hooks: dict[str, list[Callable[..., Any]]] = {"response": [self._on_response]}
        if rate_limit:
            hooks["request"] = [pace_hook(rate_limit)]
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Accept": "application/json", **headers},
            timeout=timeout,
            limits=httpx.Limits(max_connections=max_connections),
            event_hooks=hooks,
            verify=tls_context(),
        )
        self.retry = retry or RetryPolicy()
        self.max_response_bytes = max_response_bytes
        self._clock_samples: deque[float] = deque(maxlen=CLOCK_SAMPLES)
        self._clock_lock = threading.Lock()

    def _on_response(self, response: httpx.Response) -> None:
        """The response hook: sample the Date header, then read the body within the bound."""
        offset = date_offset(response, datetime.now(UTC))
        if offset is not None:
            with self._clock_lock:
                self._clock_samples.append(offset)
        read_bounded(self.system, response, self.max_response_bytes)

    def clock_offset(self) -> float | None:
        """How far the server's clock is ahead of ours (seconds; negative: behind).

        The median of the last 20 samples of ``Date`` header minus local UTC time at
        receipt; None before any response with a ``Date``. The header has 1 s resolution
        (truncated to the second), so a sample reads up to 1 s low (0.5 s on average)
        plus the network latency: good for spotting a clock that is seconds, minutes or
        hours off, not for sub-second corrections.
        """
        with self._clock_lock:
            samples = list(self._clock_samples)
        return statistics.median(samples) if samples else None

    def close(self) -> None:
        self._http.close()

    def __enter__(self: C) -> C:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_parallel(calls: int, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``fn`` over ``items`` with at most ``calls`` at once, results in order."""
    items = list(items)
    if calls <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(calls, len(items))) as pool:
        return list(pool.map(fn, items))


class BearerClient(HttpClient):
    """A client whose CRM takes one secret as a Bearer token (an API key, a private app's
    token): built from its connector's settings with :meth:`from_settings`."""

    #: calls that may run at once (the connection pool is as large)
    parallel_calls = 16

    def __init__(
        self,
        base_url: str,
        token: str,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        max_connections: int | None = None,
        rate_limit: float | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        super().__init__(
            base_url,
            {"Authorization": f"Bearer {token}"},
            timeout,
            retry,
            max_connections or self.parallel_calls,
            rate_limit,
            max_response_bytes=max_response_bytes,
        )

    @classmethod
    def from_settings(cls, settings: Any) -> Any:
        """A client from its connector's ``ClientSettings`` (the secret is the token)."""
        return cls(
            settings.base_url,
            settings.secret,
            timeout=settings.timeout,
            retry=settings.retry,
            rate_limit=settings.rate_limit,
        )
