"""The two-way sync against both embedded CRMs over HTTP, rule by rule (DESIGN section 5)."""

from __future__ import annotations

from typing import Any

import polars as pl
import pytest
from conftest import SyncWorld

from crm_assets.engine.document import read_document
from crm_assets.engine.snapshot import SnapshotStore
from crm_assets.headless import SyncOutcome, execute_sync
from crm_assets.settings import packaged_spec_path
from crm_assets.sources import SOURCES, take_snapshot
from crm_assets.sync import FlowVerification, flow_mappings, verify_flow

MAPPINGS = {m.name: m for m in flow_mappings(read_document(packaged_spec_path()))}
CONTACTS, PRODUCTS = "contact_to_contacts", "product_to_companies"


def sync(**kwargs: Any) -> SyncOutcome:
    outcome = execute_sync(**kwargs)
    assert outcome.success, outcome.failures
    return outcome


def verify(world: SyncWorld, flow: str) -> FlowVerification:
    """Read both CRMs afresh (full rescan) and compare every link."""
    store = SnapshotStore(world.data_dir / "snapshots")
    mapping = MAPPINGS[flow]
    with world.custom_client() as a, world.office_client() as b:
        for source, client in ((mapping.a, a), (mapping.b, b)):
            take_snapshot(client, source, store, full_rescan=True)
    return verify_flow(mapping, store, world.state())


def all_records(client: Any, obj: str) -> list[dict[str, Any]]:
    return [r for page in client.pages(obj) for r in page]


def live(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if not r.get("Deleted")]


def writes(outcome: SyncOutcome) -> dict[str, int]:
    """Created + updated per written system, over all flows."""
    total: dict[str, int] = {}
    for asset, meta in outcome.metadata.items():
        if "/writes_to_" in asset:
            side = asset.split("/writes_to_")[1]
            total[side] = total.get(side, 0) + int(meta["created"]) + int(meta["updated"])
    return total


def test_first_sync_links_by_merge_criteria_creates_the_rest_and_second_sync_writes_nothing(
    sync_world: SyncWorld,
):
    with sync_world.custom_client() as a, sync_world.office_client() as b:
        prod = a.create("products", {"Name": "Acme AS", "ProductNumber": 912345678, "Active": True})
        a.create("products", {"Name": "Only In Custom", "City": "Oslo"})
        comp = b.create("companies", {"name": "Acme AS", "website": "https://acme.example"})
        b.create("companies", {"name": "Only In Office", "isActive": False})
        a.create(
            "contacts", {"Email": "Kari@Example.com ", "FirstName": "Kari", "ProductId": prod["Id"]}
        )
        a.create("contacts", {"Email": "ola@example.com", "FirstName": "Ola"})
        b.create(
            "contacts",
            {"email": "kari@example.com", "familyName": "Nordmann", "company": {"id": comp["id"]}},
        )
        b.create("contacts", {"email": "per@example.com", "givenName": "Per"})

    first = sync()
    assert first.of(f"{PRODUCTS}/reconciled")["links_new"] == 1
    assert first.of(f"{CONTACTS}/reconciled")["links_new"] == 1
    assert first.of(f"{PRODUCTS}/writes_to_crm_office")["created"] == 1
    assert first.of(f"{PRODUCTS}/writes_to_custom_crm")["created"] == 1
    assert first.of(f"{CONTACTS}/writes_to_crm_office")["created"] == 1
    assert first.of(f"{CONTACTS}/writes_to_custom_crm")["created"] == 1

    for flow in (PRODUCTS, CONTACTS):
        check = verify(sync_world, flow)
        assert check.disagreements.height == 0, check.disagreements
        assert check.unlinked_a.height == 0 and check.unlinked_b.height == 0
        assert check.linked == 3
    with sync_world.custom_client() as a, sync_world.office_client() as b:
        kari = next(r for r in all_records(a, "contacts") if r["FirstName"] == "Kari")
        assert kari["LastName"] == "Nordmann"  # filled beats empty on the first link
        acme = next(r for r in all_records(b, "companies") if r["name"] == "Acme AS")
        assert acme["orgNr"] == "912345678"  # integer ProductNumber as string orgNr
        assert acme["website"] == "https://acme.example"
        assert len(all_records(b, "contacts")) == 3  # no duplicates

    second = sync()
    assert writes(second) == {"crm_office": 0, "custom_crm": 0}


def test_edits_on_either_side_propagate_and_different_fields_both_survive(sync_world: SyncWorld):
    with sync_world.custom_client() as a:
        c = a.create("contacts", {"Email": "a@example.com", "FirstName": "Anne", "Title": "CTO"})
    sync()
    with sync_world.custom_client() as a, sync_world.office_client() as b:
        (office,) = all_records(b, "contacts")
        a.update("contacts", c["Id"], {"Title": "CEO"})
        b.replace("contacts", office["id"], {**office, "mobilePhone": "+47 900 00 000"})
    outcome = sync()
    assert writes(outcome) == {"crm_office": 1, "custom_crm": 1}
    with sync_world.custom_client() as a, sync_world.office_client() as b:
        (office,) = all_records(b, "contacts")
        custom = a.get("contacts", c["Id"])
    assert office["title"] == custom["Title"] == "CEO"
    assert office["mobilePhone"] == custom["MobilePhone"] == "+47 900 00 000"
    assert writes(sync()) == {"crm_office": 0, "custom_crm": 0}  # no echo


def test_conflicting_edit_newer_wins_and_is_audited(sync_world: SyncWorld):
    with sync_world.custom_client() as a:
        c = a.create("contacts", {"Email": "c@example.com", "Title": "Engineer"})
    sync()
    with sync_world.custom_client() as a, sync_world.office_client() as b:
        a.update("contacts", c["Id"], {"Title": "Older edit"})
        (office,) = all_records(b, "contacts")
        b.replace("contacts", office["id"], {**office, "title": "Newer edit"})
    sync()
    with sync_world.custom_client() as a:
        assert a.get("contacts", c["Id"])["Title"] == "Newer edit"
    audit = sync_world.state().audit_log(CONTACTS).filter(pl.col("kind") == "conflict")
    row = audit.row(0, named=True)
    assert (row["field"], row["old_value"], row["new_value"]) == (
        "title",
        "Older edit",
        "Newer edit",
    )
    assert verify(sync_world, CONTACTS).disagreements.height == 0


def test_clear_to_empty_propagates(sync_world: SyncWorld):
    with sync_world.office_client() as b:
        b.create(
            "contacts",
            {"email": "d@example.com", "title": "Boss", "directPhone": "+47 22 00 00 00"},
        )
    sync()
    with sync_world.office_client() as b:
        (office,) = all_records(b, "contacts")
        b.replace("contacts", office["id"], {**office, "title": None})
    sync()
    with sync_world.custom_client() as a:
        (custom,) = all_records(a, "contacts")
    assert custom["Title"] in (None, "")
    assert custom["Phone"] == "+47 22 00 00 00"


def test_deleted_record_is_not_recreated(sync_world: SyncWorld):
    with sync_world.custom_client() as a:
        c = a.create("contacts", {"Email": "e@example.com"})
    sync()
    with sync_world.custom_client() as a:
        a.delete("contacts", c["Id"])
    outcome = sync()
    assert outcome.of(f"{CONTACTS}/writes_to_crm_office")["tombstoned"] == 1
    with sync_world.office_client() as b:
        (office,) = all_records(b, "contacts")  # the survivor stays
        b.replace("contacts", office["id"], {**office, "title": "Still here"})
    sync()
    with sync_world.custom_client() as a:
        assert len(live(all_records(a, "contacts"))) == 0  # not re-created


def test_ambiguous_duplicates_are_reported_and_left_alone(sync_world: SyncWorld):
    with sync_world.custom_client() as a, sync_world.office_client() as b:
        a.create("contacts", {"Email": "twin@example.com", "FirstName": "One"})
        b.create("contacts", {"email": "twin@example.com", "givenName": "Two"})
        b.create("contacts", {"email": "TWIN@example.com", "givenName": "Three"})
    outcome = sync()
    assert outcome.of(f"{CONTACTS}/reconciled")["ambiguous"] == 3
    with sync_world.custom_client() as a, sync_world.office_client() as b:
        assert len(all_records(a, "contacts")) == 1
        assert len(all_records(b, "contacts")) == 2


def test_unresolved_reference_is_deferred_then_resolved(sync_world: SyncWorld):
    with sync_world.custom_client() as a, sync_world.office_client() as b:
        prod = a.create("products", {"Name": "Twin Co"})
        b.create("companies", {"name": "Twin Co"})
        b.create("companies", {"name": "Twin Co"})  # ambiguous: the product stays unlinked
        a.create("contacts", {"Email": "ref@example.com", "ProductId": prod["Id"]})
    outcome = sync()
    assert outcome.of(f"{CONTACTS}/writes_to_crm_office")["deferred"] == 1
    with sync_world.office_client() as b:
        assert all_records(b, "contacts") == []
        first, second = all_records(b, "companies")
        b.replace("companies", second["id"], {**second, "name": "Other Co"})
    sync()
    with sync_world.office_client() as b:
        (office,) = all_records(b, "contacts")
    assert office["company"]["id"] == first["id"]


def test_rejected_record_is_dead_lettered_while_the_rest_syncs(sync_world: SyncWorld):
    with sync_world.custom_client() as a:
        a.create("products", {"Name": "Bad Number", "ProductNumber": 12345})  # orgNr needs 9 digits
        a.create("products", {"Name": "Good Number", "ProductNumber": 987654321})
    outcome = sync()
    writes_b = outcome.of(f"{PRODUCTS}/writes_to_crm_office")
    assert (writes_b["created"], writes_b["failed"]) == (1, 1)
    letters = sync_world.state().dead_letters(PRODUCTS)
    assert letters.height == 1 and "orgNr" in letters.row(0, named=True)["message"]
    sync()  # retried on the next run, still rejected, counted
    assert sync_world.state().dead_letters(PRODUCTS).row(0, named=True)["attempts"] == 2
    with sync_world.office_client() as b:
        assert [c["name"] for c in all_records(b, "companies")] == ["Good Number"]


def test_crash_between_create_and_state_commit_creates_no_duplicate(sync_world: SyncWorld):
    with sync_world.custom_client() as a:
        c = a.create("contacts", {"Email": "crash@example.com", "FirstName": "Crash"})
    # what a run killed right after CRMOffice confirmed the create leaves behind:
    # a pending intent, the record in CRMOffice, no link
    state = sync_world.state()
    state.begin_creates(CONTACTS, "b", [c["Id"]])
    with sync_world.office_client() as b:
        b.create("contacts", {"email": "crash@example.com", "givenName": "Crash"})
    sync()
    with sync_world.office_client() as b:
        assert len(all_records(b, "contacts")) == 1
    assert state.pending_creates(CONTACTS).height == 0
    assert verify(sync_world, CONTACTS).linked == 1


@pytest.mark.parametrize("mode", ["dry_run"])
def test_dry_run_plans_but_writes_nothing(sync_world: SyncWorld, mode: str):
    with sync_world.custom_client() as a:
        a.create("contacts", {"Email": "dry@example.com"})
    outcome = sync(dry_run=True)
    assert outcome.of(f"{CONTACTS}/reconciled")["creates_b"] == 1
    assert outcome.of(f"{CONTACTS}/writes_to_crm_office")["skipped"] != "no"
    with sync_world.office_client() as b:
        assert all_records(b, "contacts") == []


def test_sources_cover_the_document():
    assert {(s.system, s.entity) for s in SOURCES} >= {
        (m.a.system, m.a.entity) for m in MAPPINGS.values()
    }


def test_a_record_changed_between_plan_and_write_is_reread_and_remerged(sync_world: SyncWorld):
    """No lost update: the write carries If-Match; the 412 re-reads and merges again."""
    from crm_assets.engine.snapshot import SnapshotStore
    from crm_assets.sync import FlowWriter, map_flow, plan_flow

    with sync_world.custom_client() as a:
        c = a.create("contacts", {"Email": "race@example.com", "Title": "Old", "Phone": "1"})
    sync()
    with sync_world.office_client() as b:
        (office,) = all_records(b, "contacts")
        b.replace("contacts", office["id"], {**office, "title": "New from CRMOffice"})
    mapping = MAPPINGS[CONTACTS]
    store = SnapshotStore(sync_world.data_dir / "snapshots")
    state = sync_world.state()
    with sync_world.custom_client() as a, sync_world.office_client() as b:
        for source, client in ((mapping.a, a), (mapping.b, b)):
            take_snapshot(client, source, store)
        plan = plan_flow(mapping, *map_flow(mapping, store, state), state)
        assert plan.counts["updates_a"] == 1
        # someone edits another field in Custom CRM after the plan was made
        a.update("contacts", c["Id"], {"Phone": "2"})
        result, _ = FlowWriter(mapping, plan, state, store, a, "a", "race-run").run(set())
        assert result.retried_412 == 1 and result.failed == 0
        after = a.get("contacts", c["Id"])
    assert after["Title"] == "New from CRMOffice"  # the planned write landed
    assert after["Phone"] == "2"  # and the concurrent edit was not lost
    sync()
    with sync_world.office_client() as b:
        (office,) = all_records(b, "contacts")
    assert office["directPhone"] == "2"


def test_a_waiting_reference_does_not_hold_back_the_other_fields(sync_world: SyncWorld):
    with sync_world.custom_client() as a, sync_world.office_client() as b:
        prod = a.create("products", {"Name": "Twin Co"})
        b.create("companies", {"name": "Twin Co"})
        b.create("companies", {"name": "Twin Co"})  # ambiguous: the product stays unlinked
        c = a.create("contacts", {"Email": "wait@example.com", "ProductId": prod["Id"]})
        b.create("contacts", {"email": " WAIT@example.com ", "title": "Boss"})
    sync()
    with sync_world.custom_client() as a, sync_world.office_client() as b:
        a.update("contacts", c["Id"], {"Phone": "+47 1"})
    sync()
    with sync_world.custom_client() as a, sync_world.office_client() as b:
        (office,) = all_records(b, "contacts")
        custom = a.get("contacts", c["Id"])
        assert custom["Title"] == "Boss"
        assert office["directPhone"] == "+47 1"  # written although company.id waits
        assert office["email"] == custom["Email"]
        assert office["company"] is None
    check = verify(sync_world, CONTACTS)
    assert check.disagreements.height == 0  # the reference is waiting, not disagreeing
    assert writes(sync()) == {"crm_office": 0, "custom_crm": 0}  # waits without no-op writes
