"""The Custom CRM connector: everything the sync and the demo need to know of Custom CRM."""

from __future__ import annotations

from crm_assets.connector import Connector, Setting, WriteCapabilities
from crm_assets.custom_crm.client import PARALLEL_CALLS, CustomCrmClient
from crm_assets.custom_crm.fields import KEY, OBJECTS, SYSTEM

CONNECTOR = Connector(
    system=SYSTEM,
    key=KEY,
    slug="custom-crm",
    objects=OBJECTS,
    settings=(
        Setting("CUSTOM_CRM_BASE_URL", "http://127.0.0.1:8101", "Custom CRM API", "base_url"),
        Setting("CUSTOM_CRM_API_KEY", "demo-custom-crm-key", "Custom CRM API key", "secret"),
        Setting(
            "CUSTOM_CRM_RATE_LIMIT",
            "",
            "requests/s the Custom CRM client stays under, so it is not throttled (429)",
            "rate_limit",
        ),
    ),
    capabilities=WriteCapabilities(
        batch_size=1,
        parallel_calls=PARALLEL_CALLS,
        partial_update=True,
        concurrency_token="Version",
        idempotent_creates=True,
    ),
    client=CustomCrmClient.from_settings,
    service="crm_assets.custom_crm.service:build_service",
)
