"""Dagster resources: the two CRM clients and the project's storage, configured by EnvVar."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
from pydantic import Field

from crm_assets.crm_office.client import CrmOfficeClient
from crm_assets.custom_crm.client import CustomCrmClient
from crm_assets.engine.snapshot import SnapshotStore
from crm_assets.engine.state import SyncState
from crm_assets.http import RetryPolicy


class CustomCrmResource(dg.ConfigurableResource):
    """A Custom CRM account; the API key comes from the environment only."""

    base_url: str = Field(description="Base URL of the Custom CRM API")
    api_key: str = Field(description="API key (set through CUSTOM_CRM_API_KEY)")
    timeout_seconds: float = 30.0
    rate_limit: float | None = Field(None, description="requests/s to stay under (pacing)")

    def client(self, retry: RetryPolicy | None = None) -> CustomCrmClient:
        return CustomCrmClient(
            self.base_url,
            self.api_key,
            timeout=self.timeout_seconds,
            retry=retry,
            rate_limit=self.rate_limit,
        )


class CrmOfficeResource(dg.ConfigurableResource):
    """A CRMOffice tenant; the client credentials come from the environment only."""

    base_url: str = Field(description="Base URL of the CRMOffice API")
    client_id: str = Field(description="OAuth2 client id (CRM_OFFICE_CLIENT_ID)")
    client_secret: str = Field(description="OAuth2 client secret (CRM_OFFICE_CLIENT_SECRET)")
    timeout_seconds: float = 30.0
    rate_limit: float | None = Field(None, description="requests/s to stay under (pacing)")

    def client(self, retry: RetryPolicy | None = None) -> CrmOfficeClient:
        return CrmOfficeClient(
            self.base_url,
            self.client_id,
            self.client_secret,
            timeout=self.timeout_seconds,
            retry=retry,
            rate_limit=self.rate_limit,
        )


class SyncStorage(dg.ConfigurableResource):
    """Where the project keeps snapshots, plans and reports (``CRM_SYNC_DATA_DIR``) and
    its state database (``CRM_SYNC_STATE_URL``)."""

    data_dir: str
    state_url: str

    def state(self) -> SyncState:
        return SyncState(self.state_url)

    def flow_dir(self, flow: str) -> Path:
        return self.root / "flows" / flow

    @property
    def root(self) -> Path:
        return Path(self.data_dir)

    def snapshots(self) -> SnapshotStore:
        return SnapshotStore(self.root / "snapshots")


def _rate(name: str) -> float | None:
    """A rate limit from the environment (requests/s); unset or 0: no pacing."""
    return float(os.environ.get(name) or 0) or None


def build_resources(data_dir: Path, state_url: str) -> dict[str, dg.ConfigurableResource]:
    """The resources, reading every credential through ``EnvVar``."""
    return {
        "custom_crm": CustomCrmResource(
            base_url=dg.EnvVar("CUSTOM_CRM_BASE_URL"),
            api_key=dg.EnvVar("CUSTOM_CRM_API_KEY"),
            rate_limit=_rate("CUSTOM_CRM_RATE_LIMIT"),
        ),
        "crm_office": CrmOfficeResource(
            base_url=dg.EnvVar("CRM_OFFICE_BASE_URL"),
            client_id=dg.EnvVar("CRM_OFFICE_CLIENT_ID"),
            client_secret=dg.EnvVar("CRM_OFFICE_CLIENT_SECRET"),
            rate_limit=_rate("CRM_OFFICE_RATE_LIMIT"),
        ),
        # a URL from the environment may hold a password: pass it as EnvVar, never as text
        "storage": SyncStorage(
            data_dir=str(data_dir),
            state_url=dg.EnvVar("CRM_SYNC_STATE_URL")
            if os.environ.get("CRM_SYNC_STATE_URL")
            else state_url,
        ),
    }
