"""The embedded Custom CRM as a service: its store, routes, API key check and seeding.

``build_service`` is what the connector names (``Connector.service``); the shared parts
(admin routes, error handlers, middleware) are added by ``crm_assets.embedded.service``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from crm_assets.custom_crm import server
from crm_assets.custom_crm.seed import demo_records
from crm_assets.embedded.clock import Clock
from crm_assets.embedded.middleware import Faults
from crm_assets.embedded.service import EmbeddedService, closing_lifespan
from crm_assets.embedded.store import Store
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
    """Custom CRM over ``data_dir``; the API key defaults to ``CUSTOM_CRM_API_KEY``.

    ``faults`` is not used here (the shared middleware applies it); ``clock`` is the
    service's clock (Created/Modified come from it, through the store); other options are
    ignored.
    """
    store = Store(Path(data_dir), server.DB_FILE, server.OBJECTS, clock=clock)

    def reseed(n: int) -> None:
        server.seed(store, demo_records(n))

    return EmbeddedService(
        app=server.build_app(store, lifespan=closing_lifespan(store)),
        store=store,
        check=server.api_key_check(api_key or env("CUSTOM_CRM_API_KEY")),
        reseed=reseed,
    )
