"""Limits of the embedded CRMs and their clients: a wrong clock, oversized bodies both ways.

- ``POST /_admin/clock`` moves every stamp and every ``Date`` header of a service, and the
  clients read the offset back from the ``Date`` headers (``clock_offset()``);
- a request body above the service's limit is refused 413 before it is read (the service
  process's memory figures are printed);
- a response body above a client's limit is refused without being read whole.

Real HTTP throughout (embedded services as processes, stand-in servers for the answers the
services never give). Figures show in the log (``out``).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from email.utils import formatdate, parsedate_to_datetime
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import pytest
from embedded_fixtures import EmbeddedService, stand_in_server
from test_convergence import figure_writer, out  # noqa: F401  (figure_writer: behind out)

from crm_assets.crm_office.client import CrmOfficeClient
from crm_assets.custom_crm.client import CustomCrmClient
from crm_assets.embedded.middleware import DEFAULT_MAX_BODY_BYTES
from crm_assets.embedded.service import create_app
from crm_assets.http import CrmProtocolError, HttpClient, RetryPolicy

Factory = Callable[..., EmbeddedService]
SYSTEMS = ("custom-crm", "crm-office")
HOUR = 3600.0
MB = 1_000_000
MiB = 1024 * 1024
ONCE = RetryPolicy(attempts=1)


def _service(request: pytest.FixtureRequest, system: str) -> EmbeddedService:
    fixture = "custom_crm_service" if system == "custom-crm" else "crm_office_service"
    service: EmbeddedService = request.getfixturevalue(fixture)
    return service


def _client(service: EmbeddedService, **kwargs: Any) -> HttpClient:
    creds = service.credentials
    if service.system == "custom-crm":
        return CustomCrmClient(service.base_url, creds["api_key"], **kwargs)
    return CrmOfficeClient(service.base_url, creds["client_id"], creds["client_secret"], **kwargs)


def _create(c: httpx.Client, system: str) -> tuple[httpx.Response, str, datetime]:
    """Create a contact: the answer, the object path and its modification stamp."""
    if system == "custom-crm":
        response = c.post("/api/contacts", json={"FirstName": "Ada"})
        obj, stamp = "contacts", "Modified"
    else:
        response = c.post("/contacts", json={"givenName": "Ada"})
        obj, stamp = "contacts", "updatedAt"
    assert response.status_code == 201, response.text
    body = response.json()
    return response, f"{obj}/{body.get('Id') or body.get('id')}", _stamp(body[stamp])


def _stamp(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _date_offset(response: httpx.Response) -> float:
    """The answer's one Date header minus local UTC now, seconds."""
    dates = response.headers.get_list("date")
    assert len(dates) == 1, f"{response.status_code}: {dates}"
    return (parsedate_to_datetime(dates[0]) - datetime.now(UTC)).total_seconds()


def _ahead(moment: datetime) -> float:
    return (moment - datetime.now(UTC)).total_seconds()


# -- the clock fault --------------------------------------------------------------------------


@pytest.mark.parametrize("system", SYSTEMS)
def test_clock_offset_moves_stamps_and_date_headers(
    request: pytest.FixtureRequest, system: str
) -> None:
    service = _service(request, system)
    with service.client() as c:
        assert c.get("/_admin/clock").json() == {"offset_seconds": 0.0}
        answer = c.post("/_admin/clock", json={"offset_seconds": HOUR})
        assert answer.status_code == 200 and answer.json() == {"offset_seconds": HOUR}
        assert c.get("/_admin/clock").json() == {"offset_seconds": HOUR}

        created, path, stamp = _create(c, system)
        stamp_ahead, date_ahead = _ahead(stamp), _date_offset(created)
        assert abs(stamp_ahead - HOUR) < 5, stamp_ahead
        assert abs(date_ahead - HOUR) < 5, date_ahead
        # every answer carries exactly one, offset, Date: errors and middleware answers too
        prefix = "/api" if system == "custom-crm" else ""
        answers = [
            (404, c.get(f"{prefix}/contacts/no-such-id")),  # from a handler
            (422, c.post(f"{prefix}/contacts", json={"no such field": 1})),
            (401, httpx.get(f"{service.base_url}{prefix}/contacts", timeout=10)),  # middleware
            (200, c.get("/openapi.json")),
        ]
        service.set_faults(throttle_rate=1.0)
        answers.append((429, c.get(f"{prefix}/contacts")))  # the fault middleware's
        service.set_faults()
        for status, response in answers:
            assert response.status_code == status, response.text
            assert abs(_date_offset(response) - HOUR) < 5, status

        with _client(service, retry=ONCE) as client:
            assert client.clock_offset() is None
            client.get(*path.split("/"))
            seen = client.clock_offset()
        assert seen is not None and abs(seen - HOUR) < 5, seen

        assert c.post("/_admin/reset").status_code == 200
        assert c.get("/_admin/clock").json() == {"offset_seconds": 0.0}
        after, _, stamp_after = _create(c, system)
        assert abs(_ahead(stamp_after)) < 5 and abs(_date_offset(after)) < 5
        with _client(service, retry=ONCE) as client:
            list(client.pages("contacts"))
            seen_after = client.clock_offset()
        assert seen_after is not None and abs(seen_after) < 5, seen_after
    out(
        f"clock fault, {system}: offset +3600 s -> stamp {stamp_ahead:+.2f} s, "
        f"Date {date_ahead:+.2f} s, client clock_offset() {seen:+.2f} s; "
        f"after reset: stamp {_ahead(stamp_after):+.2f} s, clock_offset() {seen_after:+.2f} s"
    )


@pytest.mark.parametrize("system", SYSTEMS)
def test_clock_set_back_stamps_behind_on_an_empty_store(
    request: pytest.FixtureRequest, system: str
) -> None:
    """A negative offset on a wiped store: new stamps are an hour behind; on a store with
    newer stamps they never go back behind those (keyset paging stays sound)."""
    service = _service(request, system)
    with service.client() as c:
        c.post("/_admin/clock", json={"offset_seconds": -HOUR}).raise_for_status()
        created, _, first = _create(c, system)
        assert abs(_ahead(first) + HOUR) < 5 and abs(_date_offset(created) + HOUR) < 5
        c.post("/_admin/clock", json={"offset_seconds": 0}).raise_for_status()
        _, _, later = _create(c, system)
        c.post("/_admin/clock", json={"offset_seconds": -HOUR}).raise_for_status()
        _, _, last = _create(c, system)
        assert first < later < last  # held just after the newest stamp, not an hour back
        assert (last - later).total_seconds() < 1


@pytest.mark.parametrize(
    "body",
    [
        {"offset_seconds": "soon"},
        {"offset_seconds": 1e12},
        {},
        {"offset_seconds": 1, "extra": 2},
    ],
)
def test_clock_offset_input_is_validated(custom_crm_service: EmbeddedService, body: Any) -> None:
    with custom_crm_service.client() as c:
        assert c.post("/_admin/clock", json=body).status_code == 422
        assert c.get("/_admin/clock").json() == {"offset_seconds": 0.0}


def test_a_service_error_500_carries_the_offset_date_too(tmp_path: Path) -> None:
    """Starlette's own 500 (a handler bug) is answered outside the app's middleware: the
    Date header still comes from the service clock, once."""
    app = create_app("custom-crm", tmp_path, faults=True, api_key="k")

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("a bug")

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://embedded") as c:
            return await c.get("/boom", headers={"Authorization": "Bearer k"})

    app.state.clock.set_offset(-HOUR)
    try:
        response = asyncio.run(call())
    finally:
        app.state.store.close()
    assert response.status_code == 500
    assert abs(_date_offset(response) + HOUR) < 5


def test_without_faults_there_is_no_clock_and_the_body_limit_is_configurable(
    embedded_service_factory: Factory,
) -> None:
    service = embedded_service_factory("custom-crm", max_body_bytes=4096)
    with service.client() as c:
        assert c.get("/_admin/clock").status_code == 404
        assert c.post("/_admin/clock", json={"offset_seconds": 5}).status_code == 404
        assert abs(_date_offset(c.get("/openapi.json"))) < 5
        small = c.post("/api/contacts", json={"FirstName": "x" * 200})
        assert small.status_code == 201, small.text
        near = c.post("/api/products", json={"Name": "n", "Description": "x" * 4000})
        assert near.status_code == 201, near.text  # about 4,030 bytes: just under the limit
        over = c.post("/api/products", json={"Name": "n" * 100, "Description": "x" * 4000})
        assert over.status_code == 413, over.text
        assert over.json() == {
            "errors": [{"field": "body", "message": "request body larger than 4096 bytes"}]
        }
        assert abs(_date_offset(over)) < 5  # one Date, on the 413 too


def test_clients_read_the_servers_clock_from_date_headers() -> None:
    """``clock_offset()``: None before any answer, then the median of the Date samples."""
    skew = -7200.0

    def dated(handler: BaseHTTPRequestHandler) -> None:
        body = b'{"Id": "C-1"}'
        handler.send_response_only(200)
        handler.send_header("Date", formatdate(time.time() + skew, usegmt=True))
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    with stand_in_server(dated) as url, CustomCrmClient(url, "key", retry=ONCE) as client:
        assert client.clock_offset() is None
        for _ in range(25):
            client.get("contacts", "C-1")
        seen = client.clock_offset()
    assert seen is not None and skew - 2 < seen <= skew + 0.5, seen
    out(f"stand-in 2 h behind: clock_offset() {seen:+.2f} s (Date has 1 s resolution)")


# -- request bodies: refused before they are read --------------------------------------------


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, bytes."""
    figures = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            figures[name] = int(value.split()[0]) * 1024
    return figures


def _reset_peak(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS (Linux ``clear_refs`` 5)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _chunks(total: int, size: int = MB) -> Iterator[bytes]:
    chunk = b"x" * size
    for _ in range(total // size):
        yield chunk


def _post_measured(
    service: EmbeddedService, path: str, content: Any, headers: dict[str, str]
) -> tuple[int | str, int, int | None, float]:
    """POST ``content``; (status or error, RSS growth, peak growth or None, seconds)."""
    pid = service.pid
    peak_known = _reset_peak(pid)
    before = _status(pid)
    started = time.monotonic()
    try:
        response = httpx.post(service.base_url + path, content=content, headers=headers, timeout=60)
        outcome: int | str = response.status_code
        if response.status_code == 413:
            assert response.json()["errors"][0]["field"] == "body"
            assert response.headers.get("connection") == "close"
    except httpx.TransportError as exc:
        outcome = f"{type(exc).__name__} (connection closed)"
    seconds = time.monotonic() - started
    after = _status(pid)
    peak = after["VmHWM"] - before["VmRSS"] if peak_known else None
    return outcome, after["VmRSS"] - before["VmRSS"], peak, seconds


@pytest.mark.parametrize(
    ("system", "path"), [("crm-office", "/connect/token"), ("custom-crm", "/api/contacts")]
)
def test_a_100_mb_body_is_refused_413_without_the_service_reading_it(
    request: pytest.FixtureRequest, system: str, path: str
) -> None:
    service = _service(request, system)
    # the token endpoint is public; the Custom CRM endpoint gets a valid key
    headers = {"Content-Type": "application/json"}
    if system == "custom-crm":
        headers.update(service.auth_headers())
    figures = []
    for label, content in (
        ("Content-Length", b"x" * (100 * MB)),
        ("chunked", _chunks(100 * MB)),
    ):
        outcome, grown, peak, seconds = _post_measured(service, path, content, headers)
        peak_text = f"{peak / MB:+.1f} MB" if peak is not None else "n/a"
        figures.append(
            f"{label}: {outcome} in {seconds:.2f} s, RSS {grown / MB:+.1f} MB, peak {peak_text}"
        )
        if label == "Content-Length":
            assert outcome == 413
        else:
            assert outcome == 413 or isinstance(outcome, str), outcome
        assert grown < 50 * MB, figures[-1]
        assert peak is None or peak < 50 * MB, figures[-1]
    with service.client() as c:  # still serving
        assert c.get("/openapi.json").status_code == 200
    out(f"100 MB body to {system} {path} (limit {DEFAULT_MAX_BODY_BYTES} B): " + "; ".join(figures))


def test_a_full_crm_office_batch_fits_the_body_limit(crm_office_service: EmbeddedService) -> None:
    """100 companies with every string at its maximum length, in non-ASCII text."""
    text = "ø" * 255
    company = {
        "name": text,
        "orgNr": "987654321",
        "website": text,
        "description": "å" * 4000,
        "isActive": True,
        "postAddress": {k: text for k in ("streetAddress", "postCode", "postalArea", "country")},
        "visitAddress": {k: text for k in ("streetAddress", "postCode", "postalArea", "country")},
    }
    body = json.dumps({"create": [company] * 100}).encode()  # ASCII-escaped: the larger form
    with crm_office_service.client() as c:
        response = c.post(
            "/companies/batch", content=body, headers={"Content-Type": "application/json"}
        )
    assert response.status_code == 200, response.text[:300]
    assert [r["status"] for r in response.json()["results"]] == [201] * 100
    assert len(body) < DEFAULT_MAX_BODY_BYTES / 2
    out(f"largest CRMOffice batch: {len(body) / MB:.2f} MB of a {DEFAULT_MAX_BODY_BYTES} B limit")


# -- response bodies: refused by the client without reading them whole ----------------------


class _Streamer:
    """A stand-in answer of ``total`` bytes, written until the client stops reading."""

    def __init__(self, total: int, declare_length: bool) -> None:
        self.total = total
        self.declare_length = declare_length
        self.sent = 0
        self.done = threading.Event()

    def __call__(self, handler: BaseHTTPRequestHandler) -> None:
        chunk = b" " * (64 * 1024)
        try:
            handler.send_response(200)
            handler.send_header("Content-Type", "application/json")
            if self.declare_length:
                handler.send_header("Content-Length", str(self.total))
            else:  # HTTP/1.0 style: the body runs until the connection closes
                handler.send_header("Connection", "close")
            handler.end_headers()
            while self.sent < self.total:
                handler.wfile.write(chunk)
                self.sent += len(chunk)
        except OSError:
            pass  # the client closed the connection: what we want
        finally:
            handler.close_connection = True
            self.done.set()


@pytest.mark.parametrize("declare_length", [True, False], ids=["content-length", "until-close"])
def test_a_response_above_the_client_limit_is_refused_without_reading_it(
    declare_length: bool,
) -> None:
    limit, total = 1 * MiB, 1024 * MiB
    streamer = _Streamer(total, declare_length)
    with stand_in_server(streamer) as url:
        client = CustomCrmClient(url, "key", retry=ONCE, max_response_bytes=limit)
        tracemalloc.start()
        started = time.monotonic()
        try:
            with client, pytest.raises(CrmProtocolError) as caught:
                client.get("contacts", "C-1")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        seconds = time.monotonic() - started
        assert streamer.done.wait(30), "the stand-in kept writing: the client read on"
    message = str(caught.value)
    assert f"{limit}-byte limit" in message and "max_response_bytes" in message
    assert "GET /api/contacts/C-1" in message
    assert streamer.sent < 64 * MiB, streamer.sent  # far from the 1 GiB offered
    assert peak < 8 * MiB, peak  # never more than the limit (plus a chunk) in memory
    out(
        f"1 GiB answer ({'Content-Length' if declare_length else 'until close'}) to a client "
        f"limited to 1 MiB: refused in {seconds:.2f} s, stand-in wrote "
        f"{streamer.sent / MiB:.1f} MiB, client peak {peak / MiB:.2f} MiB traced: {message}"
    )


def test_a_response_within_the_limit_is_read_as_before() -> None:
    body = json.dumps({"Id": "C-1", "FirstName": "x" * 1000}).encode()

    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    with (
        stand_in_server(answer) as url,
        CustomCrmClient(url, "key", retry=ONCE, max_response_bytes=len(body)) as client,
    ):
        assert client.get("contacts", "C-1")["FirstName"] == "x" * 1000
