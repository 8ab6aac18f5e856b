"""HubSpot: the embedded service as a real process, the client against it, and a real sync
HubSpot <-> CRMOffice through the project's document.

``embedded_fixtures`` knows the credentials of the two first CRMs only (an API key, or a
client id and secret), so the embedded HubSpot is started here with ``crm-assets serve
hubspot`` and its token in the environment.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest
from embedded_fixtures import EmbeddedService, free_port

from crm_assets.connector import Create, Update
from crm_assets.connectors import connector_for
from crm_assets.crm_office.client import CrmOfficeClient
from crm_assets.engine.document import read_document
from crm_assets.engine.snapshot import SnapshotStore, records_to_frame
from crm_assets.engine.state import SyncState
from crm_assets.headless import EXIT, SyncOutcome, execute_sync
from crm_assets.http import CrmValidationError, RetryPolicy
from crm_assets.hubspot import server
from crm_assets.hubspot.client import HubSpotClient
from crm_assets.hubspot.fields import FIELDS
from crm_assets.settings import packaged_spec_path
from crm_assets.sync import flow_mappings, take_snapshot, verify_flow

SPEC = packaged_spec_path().with_name("hubspot-crmoffice.rst")
FAST = RetryPolicy(attempts=3, initial=0.05, maximum=0.5, deadline=20)


@dataclass
class HubSpotService:
    """The embedded HubSpot subprocess, its token and plain HTTP calls to it."""

    port: int
    token: str
    data_dir: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *extra: str) -> HubSpotService:
        env = dict(os.environ, HUBSPOT_ACCESS_TOKEN=self.token, PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "crm_assets.cli", "serve", "hubspot", "--port"]
        cmd += [str(self.port), "--data", str(self.data_dir), *extra]
        with (self.data_dir / "hubspot.log").open("ab") as log:
            self.process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"hubspot exited: {(self.data_dir / 'hubspot.log').read_text()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.base_url}/openapi.json", timeout=1).status_code == 200:
                    return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("the embedded HubSpot did not answer within 60 s")

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def http(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=30,
        )

    def client(self, **kwargs: Any) -> HubSpotClient:
        kwargs.setdefault("retry", FAST)
        return HubSpotClient(self.base_url, self.token, **kwargs)

    def reset(self, seed: int | None = None) -> None:
        with self.http() as c:
            c.post("/_admin/reset", json={"seed": seed} if seed else None).raise_for_status()


def start_hubspot(data_dir: Path, *extra: str) -> HubSpotService:
    data_dir.mkdir(parents=True, exist_ok=True)
    token = f"test-hubspot-{secrets.token_hex(8)}"
    return HubSpotService(free_port(), token, data_dir).start(*extra)


@pytest.fixture(scope="module")
def _hubspot_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubSpotService]:
    service = start_hubspot(tmp_path_factory.mktemp("hubspot"), "--faults")
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture
def hubspot(_hubspot_process: HubSpotService) -> HubSpotService:
    """An empty embedded HubSpot (reset before every test)."""
    _hubspot_process.reset()
    return _hubspot_process


def rows(client: HubSpotClient, obj: str, since: datetime | None = None) -> list[dict]:
    return [r for page in client.pages(obj, since) for r in page]


def create(http: httpx.Client, obj: str, props: dict[str, str], **extra: Any) -> dict:
    response = http.post(f"/crm/v3/objects/{obj}", json={"properties": props, **extra})
    assert response.status_code == 201, response.text
    return response.json()


# -- the service's contract ------------------------------------------------------------------
def test_bearer_token_is_required_and_errors_have_hubspots_shape(hubspot: HubSpotService):
    assert httpx.get(f"{hubspot.base_url}/crm/v3/objects/contacts").status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert (
        httpx.get(f"{hubspot.base_url}/crm/v3/objects/contacts", headers=wrong).status_code == 401
    )
    with hubspot.http() as http:
        missing = http.get("/crm/v3/objects/contacts/123")
        bad = http.post("/crm/v3/objects/companies", json={"properties": {"numberofemployees": 12}})
        unknown = http.post("/crm/v3/objects/companies", json={"properties": {"nope": "x"}})
        too_many = http.get("/crm/v3/objects/contacts", params={"limit": 101})
    assert missing.status_code == 404
    assert set(missing.json()) >= {"status", "message", "correlationId", "category"}
    assert missing.json()["category"] == "OBJECT_NOT_FOUND"
    for answer in (bad, unknown, too_many):
        assert answer.status_code == 400 and answer.json()["category"] == "VALIDATION_ERROR"
    assert "not a string" in bad.json()["message"]  # numbers travel as strings
    assert "PROPERTY_DOESNT_EXIST" in unknown.json()["message"]


def test_property_values_are_strings_on_the_wire_and_typed_for_the_sync(hubspot: HubSpotService):
    with hubspot.http() as http:
        made = create(
            http,
            "companies",
            {"name": "Typed AS", "numberofemployees": "12", "is_public": "true", "phone": "1"},
        )
        assert made["properties"]["numberofemployees"] == "12"
        cleared = http.patch(
            f"/crm/v3/objects/companies/{made['id']}", json={"properties": {"phone": ""}}
        )
        assert cleared.status_code == 200, cleared.text
    with hubspot.client() as client:
        (company,) = rows(client, "companies")
        assert company["properties"]["numberofemployees"] == 12
        assert company["properties"]["is_public"] is True
        assert company["properties"]["phone"] is None  # an empty string cleared it
        frame = records_to_frame([company], FIELDS["companies"], "archived")
        assert frame["_error"].to_list() == [None]
        (outcome,) = client.update_records(
            "companies",
            [
                Update(
                    made["id"],
                    None,
                    {"properties.annualrevenue": 1500000.0, "properties.is_public": False},
                )
            ],
        )
        assert outcome.ok, outcome
    with hubspot.http() as http:
        props = http.get(
            f"/crm/v3/objects/companies/{made['id']}",
            params={"properties": "annualrevenue,is_public"},
        ).json()["properties"]
    assert (props["annualrevenue"], props["is_public"]) == ("1500000", "false")


def test_full_scan_pages_by_id_and_reports_archived_records_as_deletes(hubspot: HubSpotService):
    with hubspot.http() as http:
        made = [create(http, "products", {"name": f"P{i}", "price": str(i)}) for i in range(7)]
        assert http.delete(f"/crm/v3/objects/products/{made[0]['id']}").status_code == 204
        assert http.get(f"/crm/v3/objects/products/{made[0]['id']}").status_code == 404
        archived = http.get(f"/crm/v3/objects/products/{made[0]['id']}?archived=true").json()
        assert archived["archived"] is True and archived["archivedAt"]
    with hubspot.client() as client:
        pages = list(client.pages("products", None, 3))
        everything = [r for page in pages for r in page]
        assert [len(p) for p in pages] == [3, 3, 1]  # 6 live, then the archived one
        assert len({r["id"] for r in everything}) == 7
        gone = [r for r in everything if r["archived"]]
        assert [r["id"] for r in gone] == [made[0]["id"]]
        assert everything[0]["properties"]["price"] == 1.0
        frame = records_to_frame(everything, FIELDS["products"], "archived")
        assert frame.filter(pl.col("_deleted"))["id"].to_list() == [made[0]["id"]]
        # an incremental read is a search, which sees the live records only
        since = datetime.now(UTC) - timedelta(hours=1)
        assert {r["id"] for r in rows(client, "products", since)} == {m["id"] for m in made[1:]}


def test_search_reads_past_the_10000_result_cap_from_the_last_time_seen(hubspot: HubSpotService):
    hubspot.reset(seed=10_500)
    with hubspot.http() as http:
        body = {
            "filterGroups": [
                {"filters": [{"propertyName": "lastmodifieddate", "operator": "GTE", "value": "0"}]}
            ],
            "sorts": [{"propertyName": "lastmodifieddate", "direction": "ASCENDING"}],
            "limit": 200,
        }
        first = http.post("/crm/v3/objects/contacts/search", json=body).json()
        assert first["total"] == 10_500 and first["paging"]["next"]["after"] == "200"
        assert (
            http.post("/crm/v3/objects/contacts/search", json={**body, "limit": 201}).status_code
            == 400
        )
        last = http.post("/crm/v3/objects/contacts/search", json={**body, "after": "9900"}).json()
        assert len(last["results"]) == 100 and last["paging"]["next"]["after"] == "10000"
        past = http.post("/crm/v3/objects/contacts/search", json={**body, "after": "10000"})
        assert past.status_code == 400 and past.json()["category"] == "VALIDATION_ERROR"
    with hubspot.client() as client:
        found = rows(client, "contacts", datetime(1970, 1, 1, tzinfo=UTC))
        ids = [r["id"] for r in found]
        assert len(ids) == len(set(ids)) == 10_500
        times = [r["updatedAt"] for r in found]
        assert times == sorted(times)
        with_company = [r for r in found if r["associations"]["companies"]]
        assert 0.8 * len(found) < len(with_company) < len(found)  # from the v4 batch read
        since = datetime.fromisoformat(times[-100].replace("Z", "+00:00"))
        assert len(rows(client, "contacts", since)) >= 100


def test_a_page_all_at_one_millisecond_is_read_by_id(tmp_path: Path):
    """Seeded directly into the service's database (the API never gives two writes one time):
    450 contacts stamped in one millisecond, read through the client from the service."""
    from crm_assets.embedded.service import create_app

    data_dir = tmp_path / "hubspot"
    app = create_app("hubspot", data_dir, api_key="seeding")
    stamp = "2024-05-01T10:00:00.123Z"
    docs = [
        {
            "id": str(100_000_001 + i),
            "properties": {"email": f"p{i}@example.com"},
            "createdAt": stamp,
            "updatedAt": stamp,
            "archived": False,
            "companies": [],
        }
        for i in range(450)
    ]
    late = {**docs[0], "id": "100009999", "updatedAt": "2024-05-01T10:00:01.000Z"}
    server.seed(app.state.store, {"contacts": [*docs, late]})
    app.state.store.close()
    service = start_hubspot(data_dir)  # the real service over the seeded database
    try:
        found = rows(service.client(), "contacts", datetime(2024, 5, 1, tzinfo=UTC))
    finally:
        service.stop()
    assert sorted(r["id"] for r in found) == sorted(d["id"] for d in [*docs, late])


# -- writes ----------------------------------------------------------------------------------
def test_a_207_batch_answers_each_item_on_its_own(hubspot: HubSpotService):
    with hubspot.http() as http:
        answer = http.post(
            "/crm/v3/objects/products/batch/create",
            json={
                "inputs": [
                    {"properties": {"name": "ok"}, "objectWriteTraceId": "a"},
                    {"properties": {"name": "bad", "price": "ten"}, "objectWriteTraceId": "b"},
                ]
            },
        )
        assert answer.status_code == 207
        body = answer.json()
        assert [r["objectWriteTraceId"] for r in body["results"]] == ["a"]
        assert body["errors"][0]["context"] == {"objectWriteTraceId": ["b"]}
        big = http.post(
            "/crm/v3/objects/products/batch/create",
            json={"inputs": [{"properties": {"name": str(i)}} for i in range(101)]},
        )
        assert big.status_code == 400
    with hubspot.client() as client:
        outcomes = client.create_records(
            "products",
            [
                Create("k1", {"properties.name": "One", "properties.price": 10.5}),
                Create("k2", {"properties.name": "Two", "properties.hs_url": "x" * 70_000}),
                Create("k3", {"properties.name": "Three"}),
            ],
        )
        assert [o.status for o in outcomes] == ["ok", "failed", "ok"]
        assert "TOO_LONG" in (outcomes[1].message or "")
        one, three = outcomes[0].id, outcomes[2].id
        client.delete("products", three)
        updates = client.update_records(
            "products",
            [
                Update(one, None, {"properties.price": 11.0}),
                Update(three, None, {"properties.price": 12.0}),
            ],
        )
        assert [o.status for o in updates] == ["ok", "failed"]
        assert updates[0].stamp and updates[0].stamp > (outcomes[0].stamp or "")
        assert client.get("products", one)["properties"]["price"] == 11.0
        # the embedded API itself: a 207 for the update whose record is archived
    with hubspot.http() as http:
        partial = http.post(
            "/crm/v3/objects/products/batch/update",
            json={
                "inputs": [
                    {"id": one, "properties": {"price": "13"}},
                    {"id": three, "properties": {"price": "13"}},
                ]
            },
        )
    assert partial.status_code == 207
    assert partial.json()["errors"][0]["context"] == {"ids": [three]}


def test_a_create_colliding_with_an_existing_email_links_to_that_contact(hubspot: HubSpotService):
    with hubspot.http() as http:
        existing = create(http, "contacts", {"email": "kari@example.com", "firstname": "Kari"})
        collide = http.post(
            "/crm/v3/objects/contacts/batch/create",
            json={
                "inputs": [
                    {"properties": {"email": "new@example.com"}},
                    {"properties": {"email": " KARI@example.com"}},
                ]
            },
        )
        assert collide.status_code == 409
        assert collide.json()["category"] == "CONFLICT"
        assert collide.json()["message"] == f"Contact already exists. Existing ID: {existing['id']}"
    with hubspot.client() as client:
        assert len(rows(client, "contacts")) == 1  # the batch created nothing
        outcomes = client.create_records(
            "contacts",
            [
                Create("a", {"properties.email": "new@example.com", "properties.firstname": "N"}),
                Create("b", {"properties.email": "Kari@Example.com", "properties.lastname": "X"}),
                Create("c", {"properties.email": "twin@example.com"}),
                Create("d", {"properties.email": "TWIN@example.com"}),
            ],
        )
        assert [o.status for o in outcomes] == ["ok", "ok", "ok", "failed"]
        assert outcomes[1].id == existing["id"] and outcomes[1].stamp is None
        assert "two records with one e-mail" in (outcomes[3].message or "")
        contacts = rows(client, "contacts")
    assert sorted(c["properties"]["email"] for c in contacts) == [
        "kari@example.com",
        "new@example.com",
        "twin@example.com",
    ]
    kari = next(c for c in contacts if c["id"] == existing["id"])
    assert kari["properties"]["lastname"] is None  # linked, not written


def test_an_update_of_a_record_changed_since_it_was_read_is_a_conflict(hubspot: HubSpotService):
    with hubspot.client() as client:
        (made,) = client.create_records(
            "contacts", [Create("k", {"properties.email": "c@example.com"})]
        )
        (read,) = rows(client, "contacts")
        # the version as the sync plans from it: the snapshot's updatedAt cast to text
        planned = str(records_to_frame([read], FIELDS["contacts"], "archived")["updatedAt"][0])
        with hubspot.http() as http:
            http.patch(
                f"/crm/v3/objects/contacts/{made.id}", json={"properties": {"jobtitle": "CEO"}}
            ).raise_for_status()
        (stale,) = client.update_records(
            "contacts", [Update(made.id, planned, {"properties.jobtitle": "CTO"})]
        )
        assert stale.status == "conflict"
        fresh = client.get("contacts", made.id)
        assert fresh["properties"]["jobtitle"] == "CEO"  # nothing written
        (ok,) = client.update_records(
            "contacts", [Update(made.id, fresh["updatedAt"], {"properties.jobtitle": "CTO"})]
        )
        assert ok.ok and ok.stamp != fresh["updatedAt"]
        assert client.get("contacts", made.id)["updatedAt"] == ok.stamp


def test_a_contacts_company_is_its_primary_association_written_through_v4(
    hubspot: HubSpotService,
):
    with hubspot.client() as client:
        acme, beta = (
            o.id
            for o in client.create_records(
                "companies",
                [
                    Create("1", {"properties.name": "Acme"}),
                    Create("2", {"properties.name": "Beta"}),
                ],
            )
        )
        (made,) = client.create_records(
            "contacts",
            [Create("k", {"properties.email": "a@example.com", "associations.companies": acme})],
        )
        assert client.get("contacts", made.id)["associations"] == {"companies": acme}
        before = client.get("contacts", made.id)["updatedAt"]
        (moved,) = client.update_records(
            "contacts", [Update(made.id, before, {"associations.companies": beta})]
        )
        assert moved.ok
        after = client.get("contacts", made.id)
        assert after["associations"] == {"companies": beta}
        assert after["updatedAt"] == moved.stamp and after["updatedAt"] > before
        since = datetime.now(UTC) - timedelta(minutes=5)
        (searched,) = rows(client, "contacts", since)  # search + v4 batch read
        assert searched["associations"] == {"companies": beta}
        (cleared,) = client.update_records(
            "contacts", [Update(made.id, after["updatedAt"], {"associations.companies": None})]
        )
        assert cleared.ok
        assert client.get("contacts", made.id)["associations"] == {"companies": None}
        (bad,) = client.update_records(
            "contacts", [Update(made.id, None, {"associations.companies": "999"})]
        )
        assert bad.status == "failed"
    with hubspot.http() as http:
        v4 = http.get(f"/crm/v4/objects/contacts/{made.id}/associations/companies").json()
    assert v4 == {"results": []}


def test_a_throttled_client_waits_out_retry_after(tmp_path: Path):
    service = start_hubspot(tmp_path, "--rate-limit", "2")
    try:
        with service.client(retry=RetryPolicy(attempts=6, initial=0.05, deadline=30)) as client:
            for _ in range(3):  # 6 calls at 2/s: some are answered 429 and retried
                assert list(client.pages("companies")) == [[], []]
        with service.http() as http:
            answers = [http.get("/crm/v3/objects/companies").status_code for _ in range(6)]
        assert 429 in answers
    finally:
        service.stop()


def test_an_invalid_email_is_refused_as_a_validation_error(hubspot: HubSpotService):
    with hubspot.client() as client, pytest.raises(CrmValidationError) as err:
        client.create("contacts", {"properties.email": "not an e-mail"})
    assert "INVALID_EMAIL" in str(err.value)


def test_the_connector_is_registered_with_its_objects_and_settings():
    connector = connector_for("hub spot")
    assert connector is not None and connector.slug == "hubspot"
    assert [o.entity for o in connector.objects] == ["Contact", "Company", "Product"]
    contact = connector.object_for("Contact")
    assert contact is not None and contact.references == {"associations.companies": "companies"}
    assert contact.deleted_field == "archived" and contact.version_field == "updatedAt"
    settings = connector.client_settings({"HUBSPOT_ACCESS_TOKEN": "x"})
    assert settings.secret == "x" and settings.base_url == "http://127.0.0.1:8103"


# -- a real sync HubSpot <-> CRMOffice -------------------------------------------------------
@dataclass
class World:
    hubspot: HubSpotService
    office: EmbeddedService
    data_dir: Path
    state_url: str

    def office_client(self) -> CrmOfficeClient:
        c = self.office.credentials
        return CrmOfficeClient(self.office.base_url, c["client_id"], c["client_secret"])

    def contact_counts(self) -> tuple[int, int]:
        """(HubSpot contacts, CRMOffice contacts)."""
        with self.hubspot.client() as hs, self.office_client() as office:
            return len(rows(hs, "contacts")), sum(len(p) for p in office.pages("contacts"))

    def verify(self, flow: str) -> Any:
        mapping = {m.name: m for m in flow_mappings(read_document(SPEC))}[flow]
        store = SnapshotStore(self.data_dir / "snapshots")
        with self.hubspot.client() as a, self.office_client() as b:
            take_snapshot(a, mapping.a, store, full_rescan=True)
            take_snapshot(b, mapping.b, store, full_rescan=True)
        return verify_flow(mapping, store, SyncState(self.state_url))


@pytest.fixture
def world(
    hubspot: HubSpotService,
    crm_office_service: EmbeddedService,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> World:
    data_dir = tmp_path / "sync"
    state_url = f"sqlite:///{data_dir / 'state.db'}"
    creds = crm_office_service.credentials
    for name, value in {
        "HUBSPOT_BASE_URL": hubspot.base_url,
        "HUBSPOT_ACCESS_TOKEN": hubspot.token,
        "CRM_OFFICE_BASE_URL": crm_office_service.base_url,
        "CRM_OFFICE_CLIENT_ID": creds["client_id"],
        "CRM_OFFICE_CLIENT_SECRET": creds["client_secret"],
        "CRM_SYNC_DATA_DIR": str(data_dir),
        "CRM_SYNC_STATE_URL": state_url,
        "CRM_SYNC_SPEC": str(SPEC),
    }.items():
        monkeypatch.setenv(name, value)
    return World(hubspot, crm_office_service, data_dir, state_url)


def sync() -> SyncOutcome:
    outcome = execute_sync()
    assert outcome.success, outcome.failures
    return outcome


def writes(outcome: SyncOutcome) -> dict[str, int]:
    total: dict[str, int] = {}
    for asset, meta in outcome.metadata.items():
        if "/writes_to_" in asset:
            side = asset.split("/writes_to_")[1]
            total[side] = total.get(side, 0) + int(meta["created"]) + int(meta["updated"])
    return total


def test_sync_hubspot_and_crm_office_both_ways(world: World):
    with world.hubspot.client() as hs, world.office_client() as office:
        (acme,) = hs.create_records("companies", [Create("1", {"properties.name": "Acme AS"})])
        hs.create_records(
            "contacts",
            [
                Create(
                    "a",
                    {
                        "properties.email": "anne@acme.example",
                        "properties.firstname": "Anne",
                        "associations.companies": acme.id,
                    },
                ),
                Create("s", {"properties.email": "sam@shared.example", "properties.phone": "1"}),
            ],
        )
        beta = office.create("companies", {"name": "Beta AS", "website": "https://beta.example"})
        office.create(
            "contacts",
            {"email": "bo@beta.example", "givenName": "Bo", "company": {"id": beta["id"]}},
        )
        office.create("contacts", {"email": " Sam@Shared.example", "familyName": "Shared"})

    first = sync()
    assert first.of("contact_to_contacts/reconciled")["links_new"] == 1  # Sam, on e-mail
    assert writes(first) == {"crm_office": 3, "hubspot": 3}  # 2 creates and Sam's merge each
    for flow in ("company_to_companies", "contact_to_contacts"):
        check = world.verify(flow)
        assert check.disagreements.height == 0, check.disagreements
        assert check.unlinked_a.height == 0 and check.unlinked_b.height == 0
    with world.hubspot.client() as hs, world.office_client() as office:
        contacts = {c["properties"]["email"]: c for c in rows(hs, "contacts")}
        companies = {c["properties"]["name"]: c["id"] for c in rows(hs, "companies")}
        assert set(contacts) == {"anne@acme.example", "sam@shared.example", "bo@beta.example"}
        assert contacts["bo@beta.example"]["associations"]["companies"] == companies["Beta AS"]
        assert contacts["sam@shared.example"]["properties"]["lastname"] == "Shared"
        people = {c["email"].strip().lower(): c for p in office.pages("contacts") for c in p}
        assert len(people) == 3
        office_acme = next(
            c for p in office.pages("companies") for c in p if c["name"] == "Acme AS"
        )
        assert people["anne@acme.example"]["company"] == {"id": office_acme["id"]}
        assert people["sam@shared.example"]["directPhone"] == "1"

        # an edit each way
        anne = contacts["anne@acme.example"]
        hs.update("contacts", anne["id"], {"properties.jobtitle": "CFO"})
        bo = people["bo@beta.example"]
        office.replace("contacts", bo["id"], {**bo, "familyName": "Berg"})
    second = sync()
    assert writes(second) == {"crm_office": 1, "hubspot": 1}
    with world.hubspot.client() as hs, world.office_client() as office:
        assert (
            hs.get("contacts", contacts["bo@beta.example"]["id"])["properties"]["lastname"]
            == "Berg"
        )
        assert office.get("contacts", people["anne@acme.example"]["id"])["title"] == "CFO"

    third = sync()
    assert writes(third) == {"crm_office": 0, "hubspot": 0}


def test_the_seeded_demo_worlds_overlap_and_converge(world: World):
    world.hubspot.reset(seed=200)
    world.office.reset(seed=200)
    first = sync()
    for asset, meta in sorted(first.metadata.items()):
        if asset.endswith(("/reconciled", "/writes_to_hubspot", "/writes_to_crm_office")):
            print(asset, {k: v for k, v in meta.items() if isinstance(v, int)})
    assert first.of("contact_to_contacts/reconciled")["links_new"] > 50
    assert first.of("company_to_companies/reconciled")["links_new"] > 5
    for flow in ("company_to_companies", "contact_to_contacts"):
        check = world.verify(flow)
        assert check.disagreements.height == 0, check.disagreements
    second = sync()
    assert writes(second) == {"crm_office": 0, "hubspot": 0}


def test_the_public_document_without_merge_criteria_is_stopped_by_the_breaker(world: World):
    """The public HubSpot to CRMOffice document maps contacts but names no merge criteria:
    its first sync could not link a person both CRMs hold and would copy every contact
    into the other CRM. The breaker stops it, naming what to add; a dry run says so."""
    world.hubspot.reset(seed=200)
    world.office.reset(seed=200)
    public = Path(__file__).parent / "fixtures" / "specs" / "hubspot-crmoffice.rst"
    assert not read_document(public).flows[0].merge  # the case at hand
    env = {**os.environ, "CRM_SYNC_SPEC": str(public), "CRM_SYNC_SKIP_UNSUPPORTED": "1"}
    before = world.contact_counts()
    command = [sys.executable, "-m", "crm_assets.cli", "sync"]
    dry = subprocess.run([*command, "--dry-run"], capture_output=True, text=True, env=env)
    print(f"\n{dry.stdout}{dry.stderr}")
    assert "Traceback" not in dry.stderr
    assert "has no merge criteria" in dry.stdout + dry.stderr
    real = subprocess.run(command, capture_output=True, text=True, env=env)
    assert real.returncode == EXIT["breaker"], real.stdout + real.stderr
    (line,) = real.stderr.strip().splitlines()
    assert "contact_to_contacts has no merge criteria" in line and "merge block" in line
    assert world.contact_counts() == before  # nothing copied either way
