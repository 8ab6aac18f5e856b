"""Assemble and run an embedded CRM: store, seed, routes, admin, middleware, uvicorn.

``create_app`` gives a ready FastAPI app (tests, ASGI servers); ``run_service`` is what
``crm-assets serve`` calls. Only 127.0.0.1 is ever bound.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from fastapi import Body, FastAPI
from pydantic import BaseModel, ConfigDict, Field

from crm_assets.embedded.errors import install_error_handlers
from crm_assets.embedded.middleware import (
    AuthMiddleware,
    FaultMiddleware,
    Faults,
    RateLimitMiddleware,
)
from crm_assets.embedded.seed import demo_records
from crm_assets.embedded.store import Store
from crm_assets.settings import env

SYSTEMS = ("custom-crm", "crm-office")
HOST = "127.0.0.1"
log = logging.getLogger("crm_assets.embedded")


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
        0.0, ge=0, le=1, description="share of batch items failing with 500 (CRMOffice)"
    )


class ResetIn(BaseModel):
    """Optionally re-seed after wiping (same generator as ``--seed``)."""

    model_config = ConfigDict(extra="forbid")
    seed: int | None = Field(None, ge=0, le=10_000_000)


def _add_admin_routes(
    app: FastAPI, store: Store, faults: Faults, reseed: Callable[[int], None]
) -> None:
    """``/_admin/faults`` and ``/_admin/reset``: only on a service started with faults."""

    @app.get("/_admin/faults", tags=["Admin"], summary="Current fault configuration")
    def get_faults() -> dict[str, Any]:
        return faults.config.as_dict()

    @app.post("/_admin/faults", tags=["Admin"], summary="Set the fault configuration")
    def set_faults(body: FaultsIn) -> dict[str, Any]:
        for name, value in body.model_dump().items():
            setattr(faults.config, name, value)
        log.info("faults set: %s", faults.config.as_dict())
        return faults.config.as_dict()

    @app.post("/_admin/reset", tags=["Admin"], summary="Wipe all data and clear the faults")
    def reset(body: ResetIn | None = Body(None)) -> dict[str, Any]:  # noqa: B008
        faults.clear()
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
) -> FastAPI:
    """Build the embedded ``system`` ("custom-crm" or "crm-office") over ``data_dir``.

    Credentials default to the environment (``CUSTOM_CRM_API_KEY``, ``CRM_OFFICE_CLIENT_ID``,
    ``CRM_OFFICE_CLIENT_SECRET``; token lifetime ``CRM_OFFICE_TOKEN_TTL``, 3600 s). ``seed``
    fills an empty database with demo data (a restart over existing data adds nothing);
    ``rate_limit`` is requests per second (None: unlimited); ``faults`` mounts ``/_admin``.
    """
    data_dir = Path(data_dir)
    fault_state = Faults(enabled=faults, seed=fault_seed)

    if system == "custom-crm":
        from crm_assets.custom_crm import server as custom

        store = Store(data_dir, custom.DB_FILE, custom.OBJECTS)
        check = custom.api_key_check(api_key or env("CUSTOM_CRM_API_KEY"))

        def reseed(n: int) -> None:
            custom.seed(store, demo_records(system, n))

        app = custom.build_app(store, lifespan=_lifespan(store))
    elif system == "crm-office":
        from crm_assets.crm_office import server as office

        store = Store(data_dir, office.DB_FILE, office.OBJECTS)
        ttl = token_ttl or int(os.environ.get("CRM_OFFICE_TOKEN_TTL") or office.DEFAULT_TOKEN_TTL)
        issuer = office.TokenIssuer(
            store,
            client_id or env("CRM_OFFICE_CLIENT_ID"),
            client_secret or env("CRM_OFFICE_CLIENT_SECRET"),
            ttl,
        )
        check = issuer.check

        def reseed(n: int) -> None:
            office.seed(store, demo_records(system, n))

        app = office.build_app(store, fault_state, issuer, lifespan=_lifespan(store))
    else:
        raise ValueError(f"unknown system {system!r}; expected one of {SYSTEMS}")

    if seed and store.is_empty():
        reseed(seed)
    if faults:
        _add_admin_routes(app, store, fault_state, reseed)
    install_error_handlers(app)
    # add_middleware: the last added runs first -> rate limit, then auth, then faults.
    app.add_middleware(FaultMiddleware, faults=fault_state)
    app.add_middleware(AuthMiddleware, check=check, public=_public_paths(system))
    app.add_middleware(RateLimitMiddleware, rate=rate_limit)
    app.state.store = store
    app.state.faults = fault_state
    app.state.system = system
    return app


def _public_paths(system: str) -> frozenset[str]:
    from crm_assets.embedded.middleware import PUBLIC_PATHS

    return PUBLIC_PATHS | {"/connect/token"} if system == "crm-office" else PUBLIC_PATHS


def _lifespan(store: Store) -> Callable[[FastAPI], Any]:
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
) -> None:
    """Serve ``system`` on 127.0.0.1:``port`` until interrupted (SIGINT/SIGTERM)."""
    import uvicorn

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(system, Path(data_dir), seed=seed, rate_limit=rate_limit, faults=faults)
    counts = _counts(app.state.store)
    log.info(
        "%s on http://%s:%d (data %s, records %s, rate limit %s, faults %s)",
        system,
        HOST,
        port,
        Path(data_dir).resolve(),
        counts,
        rate_limit or "off",
        "on" if faults else "off",
    )
    uvicorn.run(
        app,
        host=HOST,
        port=port,
        workers=1,
        log_level="info",
        timeout_keep_alive=65,
        server_header=False,
    )
