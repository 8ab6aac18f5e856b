"""The embedded CRMOffice as a service: its store, routes, OAuth2 token issuer and seeding.

``build_service`` is what the connector names (``Connector.service``); the shared parts
(admin routes, error handlers, middleware) are added by ``crm_assets.embedded.service``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from crm_assets.crm_office import server
from crm_assets.crm_office.seed import demo_records
from crm_assets.embedded.clock import Clock
from crm_assets.embedded.middleware import PUBLIC_PATHS, Faults
from crm_assets.embedded.service import EmbeddedService, closing_lifespan
from crm_assets.embedded.store import Store
from crm_assets.settings import env

__all__ = ["build_service", "demo_records"]


def build_service(
    data_dir: Path,
    faults: Faults,
    *,
    clock: Clock | None = None,
    client_id: str | None = None,
    client_secret: str | None = None,
    token_ttl: int | None = None,
    **_options: Any,
) -> EmbeddedService:
    """CRMOffice over ``data_dir``; batches fail item by item under ``faults``.

    ``clock`` is the service's clock: createdAt/updatedAt come from it (through the store),
    token expiry from its real time. The client id and secret default to
    ``CRM_OFFICE_CLIENT_ID`` / ``CRM_OFFICE_CLIENT_SECRET``, the token lifetime to
    ``CRM_OFFICE_TOKEN_TTL`` (else 3600 s); other options are ignored.
    """
    store = Store(Path(data_dir), server.DB_FILE, server.OBJECTS, clock=clock)
    ttl = token_ttl or int(os.environ.get("CRM_OFFICE_TOKEN_TTL") or server.DEFAULT_TOKEN_TTL)
    issuer = server.TokenIssuer(
        store,
        client_id or env("CRM_OFFICE_CLIENT_ID"),
        client_secret or env("CRM_OFFICE_CLIENT_SECRET"),
        ttl,
    )

    def reseed(n: int) -> None:
        server.seed(store, demo_records(n))

    return EmbeddedService(
        app=server.build_app(store, faults, issuer, lifespan=closing_lifespan(store)),
        store=store,
        check=issuer.check,
        reseed=reseed,
        public_paths=PUBLIC_PATHS | {server.TOKEN_PATH},  # clients get tokens there
    )
