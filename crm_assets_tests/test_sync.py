"""The two-way sync against both embedded CRMs over HTTP, rule by rule (DESIGN section 5)."""

from __future__ import annotations

from typing import Any

import polars as pl
import pytest
from conftest import SyncWorld

from crm_assets.engine.snapshot import SnapshotStore
from crm_assets.headless import SyncOutcome, execute_sync
from crm_assets.sync import FlowVerification, take_snapshot, verify_flow


def sync(**kwargs: Any) -> SyncOutcome:
    outcome = execute_sync(**kwargs)
    assert outcome.success, outcome.failures
    return outcome


def verify(either_world: SyncWorld, flow: str) -> FlowVerification:
    """Read both CRMs afresh (full rescan) and compare every link."""
    store = SnapshotStore(either_world.data_dir / "snapshots")
    mapping = either_world.mappings[flow]
    clients = either_world.clients()
    for obj in (mapping.a, mapping.b):
        with clients[obj.system_key] as client:
            take_snapshot(client, obj, store, full_rescan=True)
    return verify_flow(mapping, store, either_world.state())


def all_records(client: Any, obj: str) -> list[dict[str, Any]]:
    return [r for page in client.pages(obj) for r in page]


def live(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if not r.get("Deleted")]


def flow_total(outcome: SyncOutcome, flow: str, count: str) -> int:
    """A count of a flow's writes, over both CRMs (whichever the document writes first)."""
    return sum(
        int(meta[count])
        for asset, meta in outcome.metadata.items()
        if asset.startswith(f"{flow}/writes_to_")
    )


def writes(outcome: SyncOutcome) -> dict[str, int]:
    """Created + updated per written system, over all flows."""
    total: dict[str, int] = {}
    for asset, meta in outcome.metadata.items():
        if "/writes_to_" in asset:
            side = asset.split("/writes_to_")[1]
            total[side] = total.get(side, 0) + int(meta["created"]) + int(meta["updated"])
    return total


def test_first_sync_links_by_merge_criteria_creates_the_rest_and_second_sync_writes_nothing(
    either_world: SyncWorld,
):
    with either_world.custom_client() as a, either_world.office_client() as b:
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
    assert first.of(f"{either_world.products}/reconciled")["links_new"] == 1
    assert first.of(f"{either_world.contacts}/reconciled")["links_new"] == 1
    assert first.of(f"{either_world.products}/writes_to_crm_office")["created"] == 1
    assert first.of(f"{either_world.products}/writes_to_custom_crm")["created"] == 1
    assert first.of(f"{either_world.contacts}/writes_to_crm_office")["created"] == 1
    assert first.of(f"{either_world.contacts}/writes_to_custom_crm")["created"] == 1

    for flow in (either_world.products, either_world.contacts):
        check = verify(either_world, flow)
        assert check.disagreements.height == 0, check.disagreements
        assert check.unlinked_a.height == 0 and check.unlinked_b.height == 0
        assert check.linked == 3
    with either_world.custom_client() as a, either_world.office_client() as b:
        kari = next(r for r in all_records(a, "contacts") if r["FirstName"] == "Kari")
        assert kari["LastName"] == "Nordmann"  # filled beats empty on the first link
        acme = next(r for r in all_records(b, "companies") if r["name"] == "Acme AS")
        assert acme["orgNr"] == "912345678"  # integer ProductNumber as string orgNr
        assert acme["website"] == "https://acme.example"
        assert len(all_records(b, "contacts")) == 3  # no duplicates

    second = sync()
    assert writes(second) == {"crm_office": 0, "custom_crm": 0}


def test_edits_on_either_side_propagate_and_different_fields_both_survive(either_world: SyncWorld):
    with either_world.custom_client() as a:
        c = a.create("contacts", {"Email": "a@example.com", "FirstName": "Anne", "Title": "CTO"})
    sync()
    with either_world.custom_client() as a, either_world.office_client() as b:
        (office,) = all_records(b, "contacts")
        a.update("contacts", c["Id"], {"Title": "CEO"})
        b.replace("contacts", office["id"], {**office, "mobilePhone": "+47 900 00 000"})
    outcome = sync()
    assert writes(outcome) == {"crm_office": 1, "custom_crm": 1}
    with either_world.custom_client() as a, either_world.office_client() as b:
        (office,) = all_records(b, "contacts")
        custom = a.get("contacts", c["Id"])
    assert office["title"] == custom["Title"] == "CEO"
    assert office["mobilePhone"] == custom["MobilePhone"] == "+47 900 00 000"
    assert writes(sync()) == {"crm_office": 0, "custom_crm": 0}  # no echo


def test_conflicting_edit_newer_wins_and_is_audited(either_world: SyncWorld):
    with either_world.custom_client() as a:
        c = a.create("contacts", {"Email": "c@example.com", "Title": "Engineer"})
    sync()
    with either_world.custom_client() as a, either_world.office_client() as b:
        a.update("contacts", c["Id"], {"Title": "Older edit"})
        (office,) = all_records(b, "contacts")
        b.replace("contacts", office["id"], {**office, "title": "Newer edit"})
    sync()
    with either_world.custom_client() as a:
        assert a.get("contacts", c["Id"])["Title"] == "Newer edit"
    audit = (
        either_world.state().audit_log(either_world.contacts).filter(pl.col("kind") == "conflict")
    )
    row = audit.row(0, named=True)
    assert (row["field"].lower(), row["old_value"], row["new_value"]) == (
        "title",
        "Older edit",
        "Newer edit",
    )
    assert verify(either_world, either_world.contacts).disagreements.height == 0


def test_clear_to_empty_propagates(either_world: SyncWorld):
    with either_world.office_client() as b:
        b.create(
            "contacts",
            {"email": "d@example.com", "title": "Boss", "directPhone": "+47 22 00 00 00"},
        )
    sync()
    with either_world.office_client() as b:
        (office,) = all_records(b, "contacts")
        b.replace("contacts", office["id"], {**office, "title": None})
    sync()
    with either_world.custom_client() as a:
        (custom,) = all_records(a, "contacts")
    assert custom["Title"] in (None, "")
    assert custom["Phone"] == "+47 22 00 00 00"


def test_deleted_record_is_not_recreated(either_world: SyncWorld):
    with either_world.custom_client() as a:
        c = a.create("contacts", {"Email": "e@example.com"})
    sync()
    with either_world.custom_client() as a:
        a.delete("contacts", c["Id"])
    outcome = sync()
    assert flow_total(outcome, either_world.contacts, "tombstoned") == 1
    with either_world.office_client() as b:
        (office,) = all_records(b, "contacts")  # the survivor stays
        b.replace("contacts", office["id"], {**office, "title": "Still here"})
    sync()
    with either_world.custom_client() as a:
        assert len(live(all_records(a, "contacts"))) == 0  # not re-created


def test_ambiguous_duplicates_are_reported_and_left_alone(either_world: SyncWorld):
    with either_world.custom_client() as a, either_world.office_client() as b:
        a.create("contacts", {"Email": "twin@example.com", "FirstName": "One"})
        b.create("contacts", {"email": "twin@example.com", "givenName": "Two"})
        b.create("contacts", {"email": "TWIN@example.com", "givenName": "Three"})
    outcome = sync()
    assert outcome.of(f"{either_world.contacts}/reconciled")["ambiguous"] == 3
    with either_world.custom_client() as a, either_world.office_client() as b:
        assert len(all_records(a, "contacts")) == 1
        assert len(all_records(b, "contacts")) == 2


def test_unresolved_reference_is_deferred_then_resolved(either_world: SyncWorld):
    with either_world.custom_client() as a, either_world.office_client() as b:
        prod = a.create("products", {"Name": "Twin Co"})
        b.create("companies", {"name": "Twin Co"})
        b.create("companies", {"name": "Twin Co"})  # ambiguous: the product stays unlinked
        a.create("contacts", {"Email": "ref@example.com", "ProductId": prod["Id"]})
    outcome = sync()
    assert flow_total(outcome, either_world.contacts, "deferred") == 1
    with either_world.office_client() as b:
        assert all_records(b, "contacts") == []
        first, second = all_records(b, "companies")
        b.replace("companies", second["id"], {**second, "name": "Other Co"})
    sync()
    with either_world.office_client() as b:
        (office,) = all_records(b, "contacts")
    assert office["company"]["id"] == first["id"]


def test_rejected_record_is_dead_lettered_while_the_rest_syncs(either_world: SyncWorld):
    with either_world.custom_client() as a:
        a.create("products", {"Name": "Bad Number", "ProductNumber": 12345})  # orgNr needs 9 digits
        a.create("products", {"Name": "Good Number", "ProductNumber": 987654321})
    outcome = sync()
    writes_b = outcome.of(f"{either_world.products}/writes_to_crm_office")
    assert (writes_b["created"], writes_b["failed"]) == (1, 1)
    letters = either_world.state().dead_letters(either_world.products)
    assert letters.height == 1 and "orgNr" in letters.row(0, named=True)["message"]
    sync()  # retried on the next run, still rejected, counted
    assert (
        either_world.state().dead_letters(either_world.products).row(0, named=True)["attempts"] == 2
    )
    with either_world.office_client() as b:
        assert [c["name"] for c in all_records(b, "companies")] == ["Good Number"]


def test_crash_between_create_and_state_commit_creates_no_duplicate(either_world: SyncWorld):
    with either_world.custom_client() as a:
        c = a.create("contacts", {"Email": "crash@example.com", "FirstName": "Crash"})
    # what a run killed right after CRMOffice confirmed the create leaves behind:
    # a pending intent, the record in CRMOffice, no link
    state = either_world.state()
    state.begin_creates(
        either_world.contacts,
        either_world.side_of("crm_office", either_world.contacts),
        [c["Id"]],
    )
    with either_world.office_client() as b:
        b.create("contacts", {"email": "crash@example.com", "givenName": "Crash"})
    sync()
    with either_world.office_client() as b:
        assert len(all_records(b, "contacts")) == 1
    assert state.pending_creates(either_world.contacts).height == 0
    assert verify(either_world, either_world.contacts).linked == 1


@pytest.mark.parametrize("mode", ["dry_run"])
def test_dry_run_plans_but_writes_nothing(either_world: SyncWorld, mode: str):
    with either_world.custom_client() as a:
        a.create("contacts", {"Email": "dry@example.com"})
    outcome = sync(dry_run=True)
    assert outcome.of(f"{either_world.contacts}/reconciled")["creates_in_crm_office"] == 1
    assert not [asset for asset in outcome.metadata if "/writes_to_" in asset]  # plans only
    with either_world.office_client() as b:
        assert all_records(b, "contacts") == []


def test_a_record_changed_between_plan_and_write_is_reread_and_remerged(either_world: SyncWorld):
    """No lost update: the write carries If-Match; the 412 re-reads and merges again."""
    from crm_assets.engine.snapshot import SnapshotStore
    from crm_assets.sync import map_flow, plan_flow, reference_links, write_flow

    with either_world.custom_client() as a:
        c = a.create("contacts", {"Email": "race@example.com", "Title": "Old", "Phone": "1"})
    sync()
    with either_world.office_client() as b:
        (office,) = all_records(b, "contacts")
        b.replace("contacts", office["id"], {**office, "title": "New from CRMOffice"})
    mapping = either_world.mappings[either_world.contacts]
    store = SnapshotStore(either_world.data_dir / "snapshots")
    state = either_world.state()
    with either_world.custom_client() as a, either_world.office_client() as b:
        clients = {"custom_crm": a, "crm_office": b}
        for source in (mapping.a, mapping.b):
            take_snapshot(clients[source.system_key], source, store)
        refs = reference_links(state, mapping)
        plan = plan_flow(mapping, *map_flow(mapping, store, refs), state)
        custom_side = either_world.side_of("custom_crm", either_world.contacts)
        assert plan.counts[f"updates_{custom_side}"] == 1
        # someone edits another field in Custom CRM after the plan was made
        a.update("contacts", c["Id"], {"Phone": "2"})
        result = write_flow(mapping, plan, state, store, clients, "race-run", refs)[custom_side]
        assert result.retried_412 == 1 and result.failed == 0
        after = a.get("contacts", c["Id"])
    assert after["Title"] == "New from CRMOffice"  # the planned write landed
    assert after["Phone"] == "2"  # and the concurrent edit was not lost
    sync()
    with either_world.office_client() as b:
        (office,) = all_records(b, "contacts")
    assert office["directPhone"] == "2"


def test_a_waiting_reference_does_not_hold_back_the_other_fields(either_world: SyncWorld):
    with either_world.custom_client() as a, either_world.office_client() as b:
        prod = a.create("products", {"Name": "Twin Co"})
        b.create("companies", {"name": "Twin Co"})
        b.create("companies", {"name": "Twin Co"})  # ambiguous: the product stays unlinked
        c = a.create("contacts", {"Email": "wait@example.com", "ProductId": prod["Id"]})
        b.create("contacts", {"email": " WAIT@example.com ", "title": "Boss"})
    sync()
    with either_world.custom_client() as a, either_world.office_client() as b:
        a.update("contacts", c["Id"], {"Phone": "+47 1"})
    sync()
    with either_world.custom_client() as a, either_world.office_client() as b:
        (office,) = all_records(b, "contacts")
        custom = a.get("contacts", c["Id"])
        assert custom["Title"] == "Boss"
        assert office["directPhone"] == "+47 1"  # written although company.id waits
        # one key spelled two ways stays as each CRM has it (neither overwrites the other)
        assert office["email"].strip().lower() == custom["Email"].strip().lower()
        assert office["company"] is None
    check = verify(either_world, either_world.contacts)
    assert check.disagreements.height == 0  # the reference is waiting, not disagreeing
    assert writes(sync()) == {"crm_office": 0, "custom_crm": 0}  # waits without no-op writes
