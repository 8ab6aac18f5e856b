"""Assemble and run an embedded CRM: store, seed, routes, admin, middleware, uvicorn.

Each CRM folder builds its own service (``crm_assets/<crm>/service.py``, ``build_service``:
its store, routes, authentication and seeding, as an :class:`EmbeddedService`); this module
finds it through the connector registry and adds what every CRM shares: the ``/_admin``
routes, error handlers, the service clock (:mod:`crm_assets.embedded.clock`) and the
Date-header, body-limit, rate-limit, authentication and fault middleware.
``create_app`` gives a ready FastAPI app (tests, ASGI servers); ``run_service`` is what
``crm-assets serve`` calls. Only 127.0.0.1 is ever bound.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from fastapi import Body, FastAPI
from pydantic import BaseModel, ConfigDict, Field

from crm_assets.connectors import CONNECTORS, connector_by_key
from crm_assets.embedded.clock import MAX_OFFSET_SECONDS, Clock
from crm_assets.embedded.errors import install_error_handlers
from crm_assets.embedded.middleware import (
    DEFAULT_MAX_BODY_BYTES,
    PUBLIC_PATHS,
    ASGIApp,
    AuthMiddleware,
    BodyLimitMiddleware,
    DateHeaderMiddleware,
    FaultMiddleware,
    Faults,
    RateLimitMiddleware,
)
from crm_assets.embedded.store import Store

#: The CRMs there is an embedded service of, as ``crm-assets serve`` names them.
SYSTEMS = tuple(c.slug for c in CONNECTORS)
HOST = "127.0.0.1"
log = logging.getLogger("crm_assets.embedded")


@dataclass
class EmbeddedService:
    """One CRM's service as its folder builds it, before the shared parts are added.

    ``check`` gets a request's bearer token and returns ``None`` when it is valid, else why
    not (see :class:`AuthMiddleware`); ``reseed(n)`` inserts the ``--seed n`` demo records;
    ``public_paths`` are answered without authentication.
    """

    app: FastAPI
    store: Store
    check: Callable[[str | None], str | None]
    reseed: Callable[[int], None]
    public_paths: frozenset[str] = PUBLIC_PATHS


#: ``build_service(data_dir, faults, *, clock, **options) -> EmbeddedService``: ``clock``
#: is the service's clock, for its :class:`Store` (stamps) and anything else that takes
#: "now"; options a CRM does not know are ignored.
ServiceBuilder = Callable[..., EmbeddedService]


def load_builder(spec: str) -> ServiceBuilder:
    """The builder a connector's ``service`` names (``"package.module:function"``)."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name or "build_service")


class FaultsIn(BaseModel):
    """The fault configuration; fields left out are switched off (0)."""

    model_config = ConfigDict(extra="forbid")
    error_rate: float = Field(0.0, ge=0, le=1, description="share answered 500/503, not applied")
    post_write_error_rate: float = Field(
        0.0, ge=0, le=1, description="share applied and committed, then answered 500"
    )
    latency_ms: int = Field(0, ge=0, le=120_000, description="added to every call")
    drop_rate: float = Field(
        0.0, ge=0, le=1, description="share applied, then the connection is dropped mid-response"
    )
    throttle_rate: float = Field(0.0, ge=0, le=1, description="share answered 429, Retry-After: 1")
    batch_item_error_rate: float = Field(
        0.0, ge=0, le=1, description="share of batch items failing with 500 (batch APIs)"
    )


class ResetIn(BaseModel):
    """Optionally re-seed after wiping (same generator as ``--seed``)."""

    model_config = ConfigDict(extra="forbid")
    seed: int | None = Field(None, ge=0, le=10_000_000)


class ClockIn(BaseModel):
    """How far the service's clock runs off real time (seconds; negative: behind)."""

    model_config = ConfigDict(extra="forbid")
    offset_seconds: float = Field(
        ge=-MAX_OFFSET_SECONDS,
        le=MAX_OFFSET_SECONDS,
        allow_inf_nan=False,
        description="added to every stamp and Date header from now on",
    )


def _add_admin_routes(
    app: FastAPI, store: Store, faults: Faults, clock: Clock, reseed: Callable[[int], None]
) -> None:
    """``/_admin/faults``, ``/_admin/clock`` and ``/_admin/reset``: only with faults."""

    @app.get("/_admin/faults", tags=["Admin"], summary="Current fault configuration")
    def get_faults() -> dict[str, Any]:
        return faults.config.as_dict()

    @app.post("/_admin/faults", tags=["Admin"], summary="Set the fault configuration")
    def set_faults(body: FaultsIn) -> dict[str, Any]:
        for name, value in body.model_dump().items():
            setattr(faults.config, name, value)
        log.info("faults set: %s", faults.config.as_dict())
        return faults.config.as_dict()

    @app.get("/_admin/clock", tags=["Admin"], summary="Current clock offset")
    def get_clock() -> dict[str, float]:
        return {"offset_seconds": clock.offset_seconds}

    @app.post(
        "/_admin/clock",
        tags=["Admin"],
        summary="Run the service's clock off real time",
        description=(
            "Every stamp (Created/Modified, createdAt/updatedAt) and every `Date` header "
            "runs `offset_seconds` off from now on; token expiry stays on the real clock. "
            "Stamps never go back behind the newest stored one: after moving the offset "
            "back they hold just after it until the clock passes it."
        ),
    )
    def set_clock(body: ClockIn) -> dict[str, float]:
        clock.set_offset(body.offset_seconds)
        log.info("clock offset set: %+.3f s", clock.offset_seconds)
        return {"offset_seconds": clock.offset_seconds}

    @app.post(
        "/_admin/reset",
        tags=["Admin"],
        summary="Wipe all data, clear the faults, set the clock offset to 0",
    )
    def reset(body: ResetIn | None = Body(None)) -> dict[str, Any]:  # noqa: B008
        faults.clear()
        clock.reset()
        store.wipe()
        if body is not None and body.seed:
            reseed(body.seed)
        return {"status": "reset", "counts": _counts(store)}


def _counts(store: Store) -> dict[str, int]:
    with store.read() as conn:
        return {
            obj: conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
            for obj, table in store.tables.items()
        }


def create_app(
    system: str,
    data_dir: Path,
    seed: int | None = None,
    rate_limit: float | None = None,
    faults: bool = False,
    *,
    api_key: str | None = None,
    client_id: str | None = None,
    client_secret: str | None = None,
    token_ttl: int | None = None,
    fault_seed: int | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """Build the embedded ``system`` (a connector's slug or key, see ``SYSTEMS``) over ``data_dir``.

    Credentials not given are read by the CRM's folder from the environment (its
    connector's secret settings); ``api_key`` is for an API-key CRM, ``client_id``,
    ``client_secret`` and ``token_ttl`` for an OAuth2 one (a CRM ignores the ones it has no
    use for). ``seed`` fills an empty database with demo data (a restart over existing data
    adds nothing); ``rate_limit`` is requests per second (None: unlimited); ``faults``
    mounts ``/_admin``; request bodies above ``max_body_bytes`` are refused 413.
    """
    try:
        connector = connector_by_key(system)
    except KeyError:
        raise ValueError(f"unknown system {system!r}; expected one of {SYSTEMS}") from None
    fault_state = Faults(enabled=faults, seed=fault_seed)
    options = {
        "api_key": api_key,
        "client_id": client_id,
        "client_secret": client_secret,
        "token_ttl": token_ttl,
    }
    build = load_builder(connector.service)
    service = build(
        Path(data_dir),
        fault_state,
        clock=Clock(),
        **{k: v for k, v in options.items() if v is not None},
    )
    app, store = service.app, service.store
    clock = store.service_clock  # the one passed above, unless a builder made its own

    if seed and store.is_empty():
        service.reseed(seed)
    if faults:
        _add_admin_routes(app, store, fault_state, clock, service.reseed)
    install_error_handlers(app)
    # add_middleware: the last added runs first -> rate limit, then auth, then faults.
    app.add_middleware(FaultMiddleware, faults=fault_state)
    app.add_middleware(AuthMiddleware, check=service.check, public=service.public_paths)
    app.add_middleware(RateLimitMiddleware, rate=rate_limit)
    # Around all of it, Starlette's own error middleware included: the Date header (every
    # answer, from the service clock), then the body limit (before anything reads a body).
    _wrap_outermost(
        app, lambda inner: DateHeaderMiddleware(BodyLimitMiddleware(inner, max_body_bytes), clock)
    )
    app.state.store = store
    app.state.faults = fault_state
    app.state.clock = clock
    app.state.system = connector.slug
    return app


def _wrap_outermost(app: FastAPI, wrap: Callable[[ASGIApp], ASGIApp]) -> None:
    """Put ``wrap`` around the app's whole middleware stack, Starlette's own included.

    ``add_middleware`` places middleware inside Starlette's ServerErrorMiddleware; the Date
    header and the body limit must also cover its 500s, so they wrap what
    ``build_middleware_stack`` returns (built on the first request).
    """
    build = app.build_middleware_stack

    def build_wrapped() -> ASGIApp:
        return wrap(build())

    app.build_middleware_stack = build_wrapped  # type: ignore[method-assign]


def closing_lifespan(store: Store) -> Callable[[FastAPI], Any]:
    """A FastAPI ``lifespan`` that closes ``store`` when the app shuts down."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            store.close()

    return lifespan


def run_service(
    system: str,
    port: int,
    data_dir: Path,
    seed: int | None = None,
    rate_limit: float | None = None,
    faults: bool = False,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> None:
    """Serve ``system`` on 127.0.0.1:``port`` until interrupted (SIGINT/SIGTERM).

    uvicorn adds no ``Date`` header of its own: the app sends one from the service clock.
    """
    import uvicorn

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(
        system,
        Path(data_dir),
        seed=seed,
        rate_limit=rate_limit,
        faults=faults,
        max_body_bytes=max_body_bytes,
    )
    counts = _counts(app.state.store)
    log.info(
        "%s on http://%s:%d (data %s, records %s, rate limit %s, faults %s, max body %d bytes)",
        system,
        HOST,
        port,
        Path(data_dir).resolve(),
        counts,
        rate_limit or "off",
        "on" if faults else "off",
        max_body_bytes,
    )
    uvicorn.run(
        app,
        host=HOST,
        port=port,
        workers=1,
        log_level="info",
        timeout_keep_alive=65,
        server_header=False,
        date_header=False,
    )
