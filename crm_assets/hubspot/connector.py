"""The HubSpot connector: everything the sync and the demo need to know of HubSpot."""

from __future__ import annotations

from crm_assets.connector import Connector, Setting, WriteCapabilities
from crm_assets.hubspot.client import BATCH_SIZE, HubSpotClient
from crm_assets.hubspot.fields import KEY, OBJECTS, SYSTEM

CONNECTOR = Connector(
    system=SYSTEM,
    key=KEY,
    slug="hubspot",
    objects=OBJECTS,
    settings=(
        Setting(
            "HUBSPOT_BASE_URL",
            "http://127.0.0.1:8103",
            "HubSpot API (the real one: https://api.hubapi.com)",
            "base_url",
        ),
        Setting(
            "HUBSPOT_ACCESS_TOKEN",
            "demo-hubspot-token",
            "HubSpot private app access token (sent as a Bearer token)",
            "secret",
        ),
        Setting(
            "HUBSPOT_RATE_LIMIT",
            "",
            "requests/s the HubSpot client stays under, so it is not throttled (429); "
            "HubSpot allows a private app 100 to 190 requests per 10 s by plan",
            "rate_limit",
        ),
    ),
    capabilities=WriteCapabilities(
        batch_size=BATCH_SIZE,
        parallel_calls=1,
        partial_update=True,
        concurrency_token=None,  # updatedAt is re-read and compared before each update
        idempotent_creates=False,
    ),
    client=HubSpotClient.from_settings,
    service="crm_assets.hubspot.service:build_service",
)
