"""The embedded HubSpot as a service: its store, routes, private-app token check and seeding.

``build_service`` is what the connector names (``Connector.service``); the shared parts
(admin routes, error handlers, middleware: rate limit, faults, Date header, body limit) are
added by ``crm_assets.embedded.service``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from crm_assets.embedded.clock import Clock
from crm_assets.embedded.middleware import Faults
from crm_assets.embedded.service import EmbeddedService, closing_lifespan
from crm_assets.embedded.store import Store
from crm_assets.hubspot import server
from crm_assets.hubspot.seed import demo_records
from crm_assets.settings import env

__all__ = ["build_service", "demo_records"]


def build_service(
    data_dir: Path,
    faults: Faults,
    *,
    clock: Clock | None = None,
    api_key: str | None = None,
    **_options: Any,
) -> EmbeddedService:
    """HubSpot over ``data_dir``; the bearer token is ``api_key`` or ``HUBSPOT_ACCESS_TOKEN``.

    ``faults`` makes batch items fail under ``batch_item_error_rate`` (the rest of the
    faults are the shared middleware's); ``clock`` is the service's clock (createdAt and
    updatedAt come from it, through the store); other options are ignored.
    """
    store = Store(Path(data_dir), server.DB_FILE, server.OBJECTS, clock=clock)
    server.prepare(store)

    def reseed(n: int) -> None:
        server.seed(store, demo_records(n))

    return EmbeddedService(
        app=server.build_app(store, faults, lifespan=closing_lifespan(store)),
        store=store,
        check=server.token_check(api_key or env("HUBSPOT_ACCESS_TOKEN")),
        reseed=reseed,
    )
