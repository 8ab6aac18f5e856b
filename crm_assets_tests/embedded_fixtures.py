"""Fixtures that run the embedded CRMs as real subprocesses on free 127.0.0.1 ports.

Import into a test module or conftest.py::

    from embedded_fixtures import (  # noqa: F401
        crm_office_service, custom_crm_service, embedded_service_factory,
    )

- ``custom_crm_service`` / ``crm_office_service``: a service with fault injection enabled,
  one process per test module, wiped (``/_admin/reset``) before every test, so each test
  starts from an empty CRM with no faults. Yields an :class:`EmbeddedService`.
- ``embedded_service_factory``: ``start(system, seed=..., rate_limit=..., faults=...,
  token_ttl=..., max_body_bytes=..., data_dir=...)`` for a service with other options;
  all stopped afterwards.
- :func:`start_service` does the same outside pytest.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import pytest

STARTUP_TIMEOUT = 60.0


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_credentials(system: str) -> dict[str, str]:
    """Fresh credentials per service (never the demo defaults, so a mix-up shows)."""
    if system == "custom-crm":
        return {"api_key": f"test-key-{secrets.token_hex(8)}"}
    return {
        "client_id": f"test-client-{secrets.token_hex(4)}",
        "client_secret": secrets.token_hex(16),
    }


@dataclass
class EmbeddedService:
    """A running embedded CRM subprocess and what a test needs to talk to it."""

    system: str
    port: int
    data_dir: Path
    credentials: dict[str, str]
    seed: int | None = None
    rate_limit: float | None = None
    faults: bool = False
    token_ttl: int | None = None
    max_body_bytes: int | None = None
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    _token: str | None = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        """The service's own process id (the Popen runs the Python server directly)."""
        if self.process is None:
            raise RuntimeError(f"{self.system} is not running")
        return self.process.pid

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self, timeout: float = STARTUP_TIMEOUT) -> EmbeddedService:
        """Start the process and wait until ``/openapi.json`` answers."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.system == "custom-crm":
            env["CUSTOM_CRM_API_KEY"] = self.credentials["api_key"]
        else:
            env["CRM_OFFICE_CLIENT_ID"] = self.credentials["client_id"]
            env["CRM_OFFICE_CLIENT_SECRET"] = self.credentials["client_secret"]
            if self.token_ttl is not None:
                env["CRM_OFFICE_TOKEN_TTL"] = str(self.token_ttl)
        cmd = [
            sys.executable,
            "-m",
            "crm_assets.embedded",
            self.system,
            "--port",
            str(self.port),
            "--data",
            str(self.data_dir),
        ]
        if self.seed is not None:
            cmd += ["--seed", str(self.seed)]
        if self.rate_limit is not None:
            cmd += ["--rate-limit", str(self.rate_limit)]
        if self.faults:
            cmd.append("--faults")
        if self.max_body_bytes is not None:
            cmd += ["--max-body-bytes", str(self.max_body_bytes)]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir / f"{self.system}.log"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.system} exited {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.base_url}/openapi.json", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.system} did not answer within {timeout}s:\n{self.log()}")

    def stop(self) -> None:
        """Terminate (SIGTERM, then SIGKILL) this service's process only."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def kill(self) -> None:
        """``kill -9``: no shutdown handlers run."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

    def restart(self, *, hard: bool = False, **options: Any) -> EmbeddedService:
        """Stop (or kill -9) and start again on the same port and data dir."""
        self.kill() if hard else self.stop()
        for name, value in options.items():
            setattr(self, name, value)
        self._token = None
        return self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    # -- talking to it ------------------------------------------------------------------------
    def token(self, refresh: bool = False) -> str:
        """A CRMOffice bearer token (client credentials)."""
        if self._token is None or refresh:
            response = httpx.post(
                f"{self.base_url}/connect/token",
                data={
                    "grant_type": "client_credentials",
                    "client_id": self.credentials["client_id"],
                    "client_secret": self.credentials["client_secret"],
                    "scope": "crmoffice",
                },
                timeout=10,
            )
            response.raise_for_status()
            self._token = str(response.json()["access_token"])
        return self._token

    def auth_headers(self) -> dict[str, str]:
        if self.system == "custom-crm":
            return {"Authorization": f"Bearer {self.credentials['api_key']}"}
        return {"Authorization": f"Bearer {self.token()}"}

    def client(self, **kwargs: Any) -> httpx.Client:
        """An authenticated ``httpx.Client`` on the service (close it, or use ``with``)."""
        kwargs.setdefault("timeout", 10)
        return httpx.Client(base_url=self.base_url, headers=self.auth_headers(), **kwargs)

    def reset(self, seed: int | None = None) -> None:
        """Wipe all data and clear faults (needs ``faults=True``)."""
        body = {"seed": seed} if seed else None
        with self.client() as c:
            c.post("/_admin/reset", json=body).raise_for_status()

    def set_faults(self, **config: Any) -> dict[str, Any]:
        """``POST /_admin/faults`` (needs ``faults=True``); omitted settings are 0."""
        with self.client() as c:
            response = c.post("/_admin/faults", json=config)
            response.raise_for_status()
            result: dict[str, Any] = response.json()
            return result


def start_service(
    system: str,
    data_dir: Path,
    *,
    seed: int | None = None,
    rate_limit: float | None = None,
    faults: bool = False,
    token_ttl: int | None = None,
    max_body_bytes: int | None = None,
    port: int | None = None,
    credentials: dict[str, str] | None = None,
) -> EmbeddedService:
    """Start an embedded CRM subprocess and wait until it answers (caller stops it)."""
    service = EmbeddedService(
        system=system,
        port=port or free_port(),
        data_dir=Path(data_dir),
        credentials=credentials or make_credentials(system),
        seed=seed,
        rate_limit=rate_limit,
        faults=faults,
        token_ttl=token_ttl,
        max_body_bytes=max_body_bytes,
    )
    return service.start()


@pytest.fixture
def embedded_service_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., EmbeddedService]]:
    """``start(system, **options)`` -> a running :class:`EmbeddedService`, stopped afterwards."""
    started: list[EmbeddedService] = []

    def start(system: str, data_dir: Path | None = None, **options: Any) -> EmbeddedService:
        directory = data_dir or tmp_path_factory.mktemp(system)
        service = start_service(system, directory, **options)
        started.append(service)
        return service

    yield start
    for service in started:
        with contextlib.suppress(Exception):
            service.stop()


def _module_service(
    system: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedService]:
    service = start_service(system, tmp_path_factory.mktemp(system), faults=True)
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="module")
def _custom_crm_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedService]:
    yield from _module_service("custom-crm", tmp_path_factory)


@pytest.fixture(scope="module")
def _crm_office_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedService]:
    yield from _module_service("crm-office", tmp_path_factory)


@pytest.fixture
def custom_crm_service(_custom_crm_process: EmbeddedService) -> EmbeddedService:
    """An empty Custom CRM with no faults active (faults can be set; it is reset per test)."""
    _ensure_running(_custom_crm_process)
    _custom_crm_process.reset()
    return _custom_crm_process


@pytest.fixture
def crm_office_service(_crm_office_process: EmbeddedService) -> EmbeddedService:
    """An empty CRMOffice with no faults active (faults can be set; it is reset per test)."""
    _ensure_running(_crm_office_process)
    _crm_office_process.reset()
    return _crm_office_process


def _ensure_running(service: EmbeddedService) -> None:
    """A test may have stopped or killed the shared process: bring it back."""
    if service.process is None or service.process.poll() is not None:
        service.process = None
        service.start()


@contextlib.contextmanager
def stand_in_server(
    answer: Callable[[BaseHTTPRequestHandler], None], requests: list[str] | None = None
) -> Iterator[str]:
    """A stand-in CRM on 127.0.0.1 whose GET calls ``answer(handler)`` to write the response.

    Real HTTP, for answers the embedded services never give (malformed, oversized). Yields
    the base URL; ``requests`` collects the paths asked for.
    """
    import threading
    from http.server import ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if requests is not None:
                requests.append(self.path)
            answer(self)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def truncated_json_server(body: bytes, requests: list[str] | None = None) -> Iterator[str]:
    """A stand-in CRM on 127.0.0.1 whose GET answers are ``200`` with ``body`` cut mid-JSON.

    Real HTTP, for the one answer the embedded services never give: a malformed page.
    """

    def truncated(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    with stand_in_server(truncated, requests) as url:
        yield url
