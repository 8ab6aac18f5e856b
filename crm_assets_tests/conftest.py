"""Shared fixtures: the embedded CRMs on free ports, and a sync wired to them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
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
from crm_assets.engine.document import read_document
from crm_assets.engine.mapping import FlowMapping
from crm_assets.engine.state import SyncState
from crm_assets.settings import packaged_spec_path

#: The project's document in both directions: the sync must not care which CRM is the source.
DOCUMENTS = {
    "custom_crm_to_crm_office": packaged_spec_path(),
    "crm_office_to_custom_crm": packaged_spec_path().with_name("crmoffice-customcrm.rst"),
}


@dataclass
class SyncWorld:
    """Both embedded CRMs, clients to them, and the sync's configuration pointing at them."""

    custom_crm: EmbeddedService
    crm_office: EmbeddedService
    data_dir: Path
    state_url: str
    document: Path = field(default_factory=packaged_spec_path)

    @property
    def mappings(self) -> dict[str, FlowMapping]:
        from crm_assets.sync import flow_mappings

        return {m.name: m for m in flow_mappings(read_document(self.document))}

    def flow_of(self, custom_crm_object: str) -> str:
        """The flow that syncs one Custom CRM object, whichever direction the document has."""
        return next(
            name
            for name, m in self.mappings.items()
            if ("custom_crm", custom_crm_object) in ((o.system_key, o.obj) for o in (m.a, m.b))
        )

    @property
    def contacts(self) -> str:
        return self.flow_of("contacts")

    @property
    def products(self) -> str:
        return self.flow_of("products")

    def side_of(self, system_key: str, flow: str) -> str:
        """The engine's side letter of a CRM in a flow (for tests that reach into the state)."""
        return "a" if self.mappings[flow].a.system_key == system_key else "b"

    def clients(self) -> dict[str, CustomCrmClient | CrmOfficeClient]:
        return {"custom_crm": self.custom_client(), "crm_office": self.office_client()}

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


@pytest.fixture(params=sorted(DOCUMENTS))
def either_world(
    request: pytest.FixtureRequest, sync_world: SyncWorld, monkeypatch: pytest.MonkeyPatch
) -> SyncWorld:
    """``sync_world`` once with the project's document and once with it reversed."""
    document = DOCUMENTS[request.param]
    monkeypatch.setenv("CRM_SYNC_SPEC", str(document))
    sync_world.document = document
    return sync_world
