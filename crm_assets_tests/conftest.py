"""Shared fixtures: the embedded CRMs on free ports, and a sync wired to them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from embedded_fixtures import (  # noqa: F401
    EmbeddedService,
    _crm_office_process,
    _custom_crm_process,
    crm_office_service,
    custom_crm_service,
    embedded_service_factory,
)

from crm_assets.crm_office.client import CrmOfficeClient
from crm_assets.custom_crm.client import CustomCrmClient
from crm_assets.engine.state import SyncState


@dataclass
class SyncWorld:
    """Both embedded CRMs, clients to them, and the sync's configuration pointing at them."""

    custom_crm: EmbeddedService
    crm_office: EmbeddedService
    data_dir: Path
    state_url: str

    def custom_client(self) -> CustomCrmClient:
        return CustomCrmClient(self.custom_crm.base_url, self.custom_crm.credentials["api_key"])

    def office_client(self) -> CrmOfficeClient:
        creds = self.crm_office.credentials
        return CrmOfficeClient(self.crm_office.base_url, creds["client_id"], creds["client_secret"])

    def state(self) -> SyncState:
        return SyncState(self.state_url)


@pytest.fixture
def sync_world(
    custom_crm_service: EmbeddedService,  # noqa: F811
    crm_office_service: EmbeddedService,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[SyncWorld]:
    """Two empty CRMs and a sync configured (through the environment) to use them."""
    data_dir = tmp_path / "sync"
    state_url = f"sqlite:///{data_dir / 'state.db'}"
    monkeypatch.setenv("CUSTOM_CRM_BASE_URL", custom_crm_service.base_url)
    monkeypatch.setenv("CUSTOM_CRM_API_KEY", custom_crm_service.credentials["api_key"])
    monkeypatch.setenv("CRM_OFFICE_BASE_URL", crm_office_service.base_url)
    monkeypatch.setenv("CRM_OFFICE_CLIENT_ID", crm_office_service.credentials["client_id"])
    monkeypatch.setenv("CRM_OFFICE_CLIENT_SECRET", crm_office_service.credentials["client_secret"])
    monkeypatch.setenv("CRM_SYNC_DATA_DIR", str(data_dir))
    monkeypatch.setenv("CRM_SYNC_STATE_URL", state_url)
    yield SyncWorld(custom_crm_service, crm_office_service, data_dir, state_url)
