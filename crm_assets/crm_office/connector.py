"""The CRMOffice connector: everything the sync and the demo need to know of CRMOffice."""

from __future__ import annotations

from crm_assets.connector import Connector, Setting, WriteCapabilities
from crm_assets.crm_office.client import BATCH_SIZE, CrmOfficeClient
from crm_assets.crm_office.fields import KEY, OBJECTS, SYSTEM

CONNECTOR = Connector(
    system=SYSTEM,
    key=KEY,
    slug="crm-office",
    objects=OBJECTS,
    settings=(
        Setting("CRM_OFFICE_BASE_URL", "http://127.0.0.1:8102", "CRMOffice API", "base_url"),
        Setting("CRM_OFFICE_CLIENT_ID", "demo-client", "CRMOffice OAuth2 client id", "account"),
        Setting(
            "CRM_OFFICE_CLIENT_SECRET",
            "demo-client-secret",
            "CRMOffice OAuth2 client secret",
            "secret",
        ),
        Setting(
            "CRM_OFFICE_RATE_LIMIT",
            "",
            "requests/s the CRMOffice client stays under, so it is not throttled (429)",
            "rate_limit",
        ),
    ),
    capabilities=WriteCapabilities(
        batch_size=BATCH_SIZE,
        parallel_calls=1,
        partial_update=False,
        concurrency_token="rowVersion",
        idempotent_creates=False,
    ),
    client=CrmOfficeClient.from_settings,
    service="crm_assets.crm_office.service:build_service",
)
