"""Dagster resources: one per CRM connector, and the project's storage, configured by EnvVar."""

from __future__ import annotations

import os
from collections.abc import Iterable

import dagster as dg
from pydantic import Field

from crm_assets.connector import ClientSettings, Connector, CrmClient
from crm_assets.connectors import connector_by_key
from crm_assets.engine.lease import release_held
from crm_assets.engine.link_copies import copies_folder
from crm_assets.engine.snapshot import SnapshotStore
from crm_assets.engine.state import SyncState
from crm_assets.engine.storage import Storage
from crm_assets.http import RetryPolicy
from crm_assets.sync.files import FlowFiles


class CrmResource(dg.ConfigurableResource):
    """One CRM account, through its connector; the secret comes from the environment only."""

    connector: str = Field(description="connector key, e.g. crm_office")
    base_url: str = Field(description="Base URL of the CRM's API")
    account: str = Field("", description="account or client id, where the CRM has one")
    secret: str = Field(description="API key, token or client secret (set through its EnvVar)")
    timeout_seconds: float = 30.0
    rate_limit: float | None = Field(None, description="requests/s to stay under (pacing)")

    def client(self, retry: RetryPolicy | None = None) -> CrmClient:
        return connector_by_key(self.connector).client(
            ClientSettings(
                base_url=self.base_url,
                account=self.account,
                secret=self.secret,
                rate_limit=self.rate_limit,
                timeout=self.timeout_seconds,
                retry=retry,
            )
        )


class SyncStorage(dg.ConfigurableResource):
    """Where the project keeps snapshots, plans and reports (``CRM_SYNC_DATA_URL``, a
    local path or ``s3://bucket/prefix``) and its state database (``CRM_SYNC_STATE_URL``)."""

    data_url: str
    state_url: str
    link_copies: bool = Field(
        True, description="keep each flow's links as a Parquet copy in the data folder"
    )

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        """A run's steps have ended, however they ended (done, failed, interrupted from
        the UI or by Ctrl-C): give back the flows the run holds before Dagster reports it
        finished, so that the next sync, started on that report, takes them at once."""
        if context.run is not None:  # a sensor's evaluation holds nothing
            release_held(context.run.run_id)

    def state(self) -> SyncState:
        copies = copies_folder(self.data()) if self.link_copies else None
        return SyncState(self.state_url, copies)

    def data(self) -> Storage:
        """The data folder."""
        return Storage.at(self.data_url)

    def flow_dir(self, flow: str) -> Storage:
        """The flow's own folder (its definition and its latest check results)."""
        return self.data().child("flows", flow)

    def synced_before(self, flow: str) -> bool:
        """Whether the data folder says a sync of the flow completed with it."""
        return self.flow_dir(flow).exists("synced")

    def mark_synced(self, flow: str, run_id: str) -> None:
        """Leave the marker :meth:`synced_before` reads: a state lost later then refuses."""
        self.flow_dir(flow).write_text(run_id, "synced")

    def flow_files(self, flow: str, run_id: str) -> FlowFiles:
        """One run's files of the flow."""
        return FlowFiles.of_run(self.data(), flow, run_id)

    def snapshots(self) -> SnapshotStore:
        return SnapshotStore(self.data().child("snapshots"))

    def verification(self) -> SnapshotStore:
        """The snapshots the checks read after the writes (their own cursors)."""
        return SnapshotStore(self.data().child("verification"))


def crm_resource(connector: Connector) -> CrmResource:
    """A connector's resource, every setting read through ``EnvVar``."""

    def setting(role: str) -> str:
        s = connector.setting(role)
        return dg.EnvVar(s.name) if s else ""  # type: ignore[return-value]

    rate = connector.setting("rate_limit")
    return CrmResource(
        connector=connector.key,
        base_url=setting("base_url"),
        account=setting("account"),
        secret=setting("secret"),
        rate_limit=float(os.environ.get(rate.name) or 0) or None if rate else None,
    )


def build_resources(
    connectors: Iterable[Connector], data_url: str, state_url: str
) -> dict[str, dg.ConfigurableResource]:
    """The resources of the connectors in use and the storage."""
    resources: dict[str, dg.ConfigurableResource] = {c.key: crm_resource(c) for c in connectors}
    # a URL from the environment may hold a password: pass it as EnvVar, never as text
    resources["storage"] = SyncStorage(
        data_url=data_url,
        state_url=dg.EnvVar("CRM_SYNC_STATE_URL")
        if os.environ.get("CRM_SYNC_STATE_URL")
        else state_url,
    )
    return resources
