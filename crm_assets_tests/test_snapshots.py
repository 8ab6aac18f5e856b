# ruff: noqa: F811  (the fixtures imported below are parameters of the tests)
"""Snapshot assets, materialized through Dagster against the embedded CRMs (real HTTP)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
import pytest
from embedded_fixtures import (  # noqa: F401  (pytest fixtures)
    EmbeddedService,
    _crm_office_process,
    _custom_crm_process,
    crm_office_service,
    custom_crm_service,
)

from crm_assets.crm_office.client import CrmOfficeClient
from crm_assets.custom_crm.client import CustomCrmClient
from crm_assets.defs.resources import CrmResource, SyncStorage
from crm_assets.defs.snapshots import build_snapshot_assets
from crm_assets.engine.document import read_document
from crm_assets.engine.snapshot import SnapshotStore
from crm_assets.http import CrmUnavailable
from crm_assets.settings import packaged_spec_path
from crm_assets.sync import flow_mappings

ASSETS = {
    asset.key.to_user_string(): asset
    for asset in build_snapshot_assets(flow_mappings(read_document(packaged_spec_path())))
}
#: Where a service that is not part of a test would be: nothing listens there.
NOWHERE = "http://127.0.0.1:9"


class Snapshots:
    """Materializes snapshot assets of the two services into one data folder."""

    def __init__(
        self,
        tmp_path: Path,
        custom: EmbeddedService | None = None,
        office: EmbeddedService | None = None,
    ) -> None:
        self.tmp_path = tmp_path
        self.custom, self.office = custom, office
        custom_key = custom.credentials["api_key"] if custom else "unused"
        office_creds = office.credentials if office else {"client_id": "-", "client_secret": "-"}
        self.secrets = [
            *([custom_key] if custom else []),
            *([office_creds["client_secret"]] if office else []),
        ]
        self.resources = {
            "custom_crm": CrmResource(
                connector="custom_crm",
                base_url=custom.base_url if custom else NOWHERE,
                secret=custom_key,
            ),
            "crm_office": CrmResource(
                connector="crm_office",
                base_url=office.base_url if office else NOWHERE,
                account=office_creds["client_id"],
                secret=office_creds["client_secret"],
            ),
            "storage": SyncStorage(
                data_url=str(tmp_path), state_url=f"sqlite:///{tmp_path}/state.db"
            ),
        }

    def run(self, key: str, full_rescan: bool = False) -> dict[str, Any]:
        """Materialize one snapshot asset; its materialization metadata as plain values."""
        op = key.replace("/", "__")
        config = {"ops": {op: {"config": {"full_rescan": True}}}} if full_rescan else None
        result = dg.materialize([ASSETS[key]], resources=self.resources, run_config=config)
        assert result.success
        (materialization,) = result.asset_materializations_for_node(op)
        metadata = {name: value.value for name, value in materialization.metadata.items()}
        shown = repr(metadata)
        assert not any(secret in shown for secret in self.secrets), "a secret in metadata"
        return metadata

    def path(self, key: str) -> Path:
        return self.tmp_path / "snapshots" / f"{key}.parquet"

    def frame(self, key: str) -> pl.DataFrame:
        """The stored snapshot, its base with the delta of later reads."""
        system, obj = key.split("/")
        frame = SnapshotStore(self.tmp_path / "snapshots").read(system, obj)
        assert frame is not None, f"no snapshot of {key}"
        return frame


def custom_client(service: EmbeddedService) -> CustomCrmClient:
    return CustomCrmClient(service.base_url, service.credentials["api_key"])


def office_client(service: EmbeddedService) -> CrmOfficeClient:
    creds = service.credentials
    return CrmOfficeClient(service.base_url, creds["client_id"], creds["client_secret"])


def row(frame: pl.DataFrame, id_field: str, record_id: str) -> dict[str, Any]:
    (found,) = frame.filter(pl.col(id_field) == record_id).to_dicts()
    return found


def test_first_run_stores_every_record_then_an_edit_is_one_change(
    custom_crm_service: EmbeddedService, tmp_path: Path
) -> None:
    custom_crm_service.reset(seed=60)
    snapshots = Snapshots(tmp_path, custom=custom_crm_service)
    with custom_client(custom_crm_service) as client:
        records = [r for page in client.pages("contacts") for r in page]

        first = snapshots.run("custom_crm/contacts")
        assert (first["new"], first["changed"], first["deleted"]) == (len(records), 0, 0)
        assert first["dagster/row_count"] == len(records) == 60
        assert first["read_since"] == "beginning"
        frame = snapshots.frame("custom_crm/contacts")
        assert sorted(frame["Id"]) == sorted(r["Id"] for r in records)
        sample = records[7]
        stored = row(frame, "Id", sample["Id"])
        assert stored["Email"] == sample["Email"] and stored["_deleted"] is False

        edited = client.update("contacts", sample["Id"], {"Title": "Chief Snapshot Officer"})

    second = snapshots.run("custom_crm/contacts")
    assert (second["new"], second["changed"], second["deleted"]) == (0, 1, 0)
    assert second["mode"] == "incremental" and second["read_since"] != "beginning"
    assert second["fetched"] < len(records), "an incremental run reads only what changed"
    frame = snapshots.frame("custom_crm/contacts")
    assert frame.height == len(records)
    stored = row(frame, "Id", sample["Id"])
    assert stored["Title"] == "Chief Snapshot Officer"
    assert stored["Version"] == edited["Version"]
    assert second["cursor"] == stored["Modified"].isoformat()

    # nothing changed since: a run finds nothing new, however much the overlap re-reads
    third = snapshots.run("custom_crm/contacts")
    assert (third["new"], third["changed"], third["deleted"]) == (0, 0, 0)
    assert snapshots.frame("custom_crm/contacts").equals(frame)


def test_custom_crm_soft_delete_is_flagged_after_a_start_from_empty(
    custom_crm_service: EmbeddedService, tmp_path: Path
) -> None:
    snapshots = Snapshots(tmp_path, custom=custom_crm_service)
    empty = snapshots.run("custom_crm/products")  # a first run before there is any data
    assert (empty["dagster/row_count"], empty["new"], empty["cursor"]) == (0, 0, "none")
    with custom_client(custom_crm_service) as client:
        made = [client.create("products", {"Name": f"Product {i}"}) for i in range(3)]
        assert snapshots.run("custom_crm/products")["new"] == 3
        client.delete("products", made[1]["Id"])
    metadata = snapshots.run("custom_crm/products")
    assert (metadata["new"], metadata["changed"], metadata["deleted"]) == (0, 0, 1)
    assert metadata["live_records"] == 2
    frame = snapshots.frame("custom_crm/products")
    assert row(frame, "Id", made[1]["Id"])["_deleted"] is True
    assert row(frame, "Id", made[1]["Id"])["Deleted"] is True
    assert row(frame, "Id", made[0]["Id"])["_deleted"] is False


def test_crm_office_hard_delete_is_found_by_a_full_rescan_only(
    crm_office_service: EmbeddedService, tmp_path: Path
) -> None:
    snapshots = Snapshots(tmp_path, office=crm_office_service)
    with office_client(crm_office_service) as client:
        made = [client.create("contacts", {"givenName": f"P{i}"}) for i in range(4)]
        assert snapshots.run("crm_office/contacts")["new"] == 4
        client.delete("contacts", made[2]["id"])

    incremental = snapshots.run("crm_office/contacts")
    assert incremental["deleted"] == 0, "a hard delete leaves no trace to read incrementally"
    assert row(snapshots.frame("crm_office/contacts"), "id", made[2]["id"])["_deleted"] is False

    rescan = snapshots.run("crm_office/contacts", full_rescan=True)
    assert rescan["mode"] == "full rescan" and rescan["read_since"] == "beginning"
    assert (rescan["new"], rescan["changed"], rescan["deleted"]) == (0, 0, 1)
    assert rescan["live_records"] == 3
    frame = snapshots.frame("crm_office/contacts")
    assert row(frame, "id", made[2]["id"])["_deleted"] is True
    assert frame.filter(~pl.col("_deleted"))["id"].sort().to_list() == sorted(
        r["id"] for i, r in enumerate(made) if i != 2
    )

    # the delete is counted once: the next rescan finds nothing more
    again = snapshots.run("crm_office/contacts", full_rescan=True)
    assert (again["new"], again["changed"], again["deleted"]) == (0, 0, 0)


def test_crm_office_nested_fields_are_flattened(
    crm_office_service: EmbeddedService, tmp_path: Path
) -> None:
    snapshots = Snapshots(tmp_path, office=crm_office_service)
    with office_client(crm_office_service) as client:
        company = client.create(
            "companies",
            {
                "name": "Fjord Fisk AS",
                "orgNr": "912345678",
                "isActive": True,
                "visitAddress": {"streetAddress": "Kaia 1", "postCode": "5003", "country": "NO"},
            },
        )
        bare = client.create("companies", {"name": "No Address AS"})
        contact = client.create("contacts", {"givenName": "Kari", "company": {"id": company["id"]}})

    assert snapshots.run("crm_office/companies")["new"] == 2
    assert snapshots.run("crm_office/contacts")["new"] == 1
    companies = snapshots.frame("crm_office/companies")
    assert {"visitAddress.postCode", "postAddress.streetAddress"} <= set(companies.columns)
    stored = row(companies, "id", company["id"])
    assert stored["visitAddress.postCode"] == "5003"
    assert stored["visitAddress.streetAddress"] == "Kaia 1"
    assert stored["visitAddress.postalArea"] is None
    assert stored["orgNr"] == "912345678" and stored["isActive"] is True
    assert row(companies, "id", bare["id"])["visitAddress.postCode"] is None
    contacts = snapshots.frame("crm_office/contacts")
    assert row(contacts, "id", contact["id"])["company.id"] == company["id"]


def _cursor(frame: pl.DataFrame, modified: str) -> Any:
    return frame[modified].max()


def test_a_failed_run_leaves_the_last_good_snapshot(
    crm_office_service: EmbeddedService, tmp_path: Path
) -> None:
    snapshots = Snapshots(tmp_path, office=crm_office_service)
    with office_client(crm_office_service) as client:
        made = client.create("contacts", {"givenName": "Before"})
        snapshots.run("crm_office/contacts")
        path = snapshots.path("crm_office/contacts")
        good, cursor = (
            path.read_bytes(),
            _cursor(snapshots.frame("crm_office/contacts"), "updatedAt"),
        )
        client.replace("contacts", made["id"], {"givenName": "After"}, made["rowVersion"])
        client.create("contacts", {"givenName": "Newcomer"})

    crm_office_service.stop()
    try:
        with pytest.raises(
            CrmUnavailable, match=r"^CRMOffice: POST /connect/token failed: ConnectError"
        ):
            snapshots.run("crm_office/contacts")
        assert path.read_bytes() == good, "a failed run must not touch the last good snapshot"
        assert _cursor(snapshots.frame("crm_office/contacts"), "updatedAt") == cursor
        assert not list(path.parent.glob("*.tmp")), "no half-written files left behind"
    finally:
        crm_office_service.start()

    # the next good run picks up everything the failed one missed
    metadata = snapshots.run("crm_office/contacts")
    assert (metadata["new"], metadata["changed"]) == (1, 1)
    assert row(snapshots.frame("crm_office/contacts"), "id", made["id"])["givenName"] == "After"


def test_a_truncated_page_is_a_clear_error_and_changes_nothing(
    custom_crm_service: EmbeddedService, tmp_path: Path
) -> None:
    snapshots = Snapshots(tmp_path, custom=custom_crm_service)
    with custom_client(custom_crm_service) as client:
        for i in range(3):
            client.create("contacts", {"FirstName": f"T{i}"})
        snapshots.run("custom_crm/contacts")
        path = snapshots.path("custom_crm/contacts")
        good = path.read_bytes()
        client.create("contacts", {"FirstName": "Late"})

    # every answer is cut off mid-body: {"items": [ and then the connection closes
    custom_crm_service.set_faults(drop_rate=1.0)
    with pytest.raises(CrmUnavailable) as caught:
        snapshots.run("custom_crm/contacts")
    # e.g. "Custom CRM: GET /api/contacts failed: RemoteProtocolError: peer closed
    # connection without sending complete message body (received 11 bytes, expected 4096)"
    message = str(caught.value)
    assert message.startswith("Custom CRM: GET /api/contacts failed: "), message
    assert "complete message body" in message, message
    assert custom_crm_service.credentials["api_key"] not in message
    assert path.read_bytes() == good

    custom_crm_service.set_faults()
    assert snapshots.run("custom_crm/contacts")["new"] == 1
