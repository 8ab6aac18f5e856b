"""Change sensors start only the affected flows, keep stable cursors, and skip cleanly."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import dagster as dg
import pytest
from conftest import SyncWorld
from embedded_fixtures import free_port

from crm_assets.changes import Watermark, format_cursor, parse_cursor
from crm_assets.definitions import build_definitions
from crm_assets.defs.resources import CrmResource, SyncStorage
from crm_assets.headless import execute_sync
from crm_assets.settings import Settings


def tick(
    sensor_name: str,
    resources: dict[str, Any],
    cursor: str | None = None,
    instance: dg.DagsterInstance | None = None,
) -> Any:
    defs = build_definitions(Settings.from_env())
    sensor = defs.resolve_sensor_def(sensor_name)
    # as the daemon evaluates it: the storage's teardown (a run's leases) needs the scope
    with dg.build_sensor_context(
        cursor=cursor, resources=resources, instance=instance or dg.DagsterInstance.ephemeral()
    ) as context:
        return sensor.evaluate_tick(context), context


def storage(world: SyncWorld) -> SyncStorage:
    return SyncStorage(data_url=str(world.data_dir), state_url=world.state_url)


def custom_resource(world: SyncWorld) -> dict[str, Any]:
    svc = world.custom_crm
    return {
        "custom_crm": CrmResource(
            connector="custom_crm", base_url=svc.base_url, secret=svc.credentials["api_key"]
        ),
        "storage": storage(world),
    }


def office_resource(world: SyncWorld, secret: str | None = None) -> dict[str, Any]:
    svc = world.crm_office
    creds = svc.credentials
    return {
        "crm_office": CrmResource(
            connector="crm_office",
            base_url=svc.base_url,
            account=creds["client_id"],
            secret=secret or creds["client_secret"],
        ),
        "storage": storage(world),
    }


def jobs_of(result: Any) -> list[str]:
    return sorted(r.job_name for r in result.run_requests)


def test_a_change_starts_the_flows_reading_it_and_a_quiet_tick_starts_nothing(
    sync_world: SyncWorld,
):
    result, _ = tick("custom_crm_changes", custom_resource(sync_world))
    assert not result.run_requests and "no Custom CRM record changed" in result.skip_message

    with sync_world.custom_client() as a:
        c = a.create("contacts", {"Email": "s@example.com"})
    result, _ = tick("custom_crm_changes", custom_resource(sync_world))
    assert jobs_of(result) == ["sync_contact_to_contacts"]
    cursor = result.cursor
    assert parse_cursor(cursor)["contacts"].position[1] == c["Id"]
    assert format_cursor(parse_cursor(cursor)) == cursor  # deterministic

    quiet, _ = tick("custom_crm_changes", custom_resource(sync_world), cursor)
    assert not quiet.run_requests and quiet.skip_message

    with sync_world.custom_client() as a:
        a.create("products", {"Name": "New Co"})
        a.update("contacts", c["Id"], {"Title": "Boss"})
    result, _ = tick("custom_crm_changes", custom_resource(sync_world), cursor)
    assert jobs_of(result) == ["sync_contact_to_contacts", "sync_product_to_companies"]
    assert result.cursor != cursor


def test_crm_office_sensor_sees_its_own_objects(sync_world: SyncWorld):
    with sync_world.office_client() as b:
        b.create("companies", {"name": "Office Co"})
    result, _ = tick("crm_office_changes", office_resource(sync_world))
    assert jobs_of(result) == ["sync_product_to_companies"]


def test_unreachable_crm_skips_the_tick_and_keeps_the_cursor(sync_world: SyncWorld):
    closed = f"http://127.0.0.1:{free_port()}"
    resources = {
        "custom_crm": CrmResource(connector="custom_crm", base_url=closed, secret="irrelevant"),
        "storage": storage(sync_world),
    }
    cursor = format_cursor({"contacts": Watermark(("2026-01-01T00:00:00.000000+00:00", "C-1"))})
    result, context = tick("custom_crm_changes", resources, cursor)
    assert not result.run_requests
    assert "Custom CRM is unreachable, cursor kept" in result.skip_message
    assert context.cursor == cursor


def test_nightly_schedule_rescans_every_object_and_plans_every_record(sync_world: SyncWorld):
    defs = build_definitions(Settings.from_env())
    schedule = defs.resolve_schedule_def("nightly_full_rescan")
    assert schedule.cron_schedule == "0 2 * * *"
    (request,) = schedule.evaluate_tick(dg.build_schedule_context()).run_requests
    ops = request.run_config["ops"]
    assert {k for k, v in ops.items() if v["config"].get("full_rescan")} == {
        "custom_crm__contacts",
        "custom_crm__products",
        "crm_office__contacts",
        "crm_office__companies",
    }
    assert {k for k, v in ops.items() if v["config"].get("full_plan")} == {
        f"{flow}__reconciled" for flow in sync_world.mappings
    }


def test_a_change_after_many_records_sharing_the_cursor_moment_is_seen(sync_world: SyncWorld):
    """Regression: a bulk import (the seed) gives many records one modification time; the
    probe must read past them, or every later tick reports 'no change' forever."""
    sync_world.custom_crm.reset(seed=200)  # 9 seeded contacts share the final timestamp
    result, _ = tick("custom_crm_changes", custom_resource(sync_world))
    cursor = result.cursor
    quiet, _ = tick("custom_crm_changes", custom_resource(sync_world), cursor)
    assert not quiet.run_requests
    with sync_world.custom_client() as a:
        (first, *_rest) = [r for page in a.pages("contacts") for r in page]
        a.update("contacts", first["Id"], {"Title": "Changed after the import"})
    result, _ = tick("custom_crm_changes", custom_resource(sync_world), cursor)
    assert jobs_of(result) == ["sync_contact_to_contacts"]


@dataclass
class ContactsOf:
    """One CRM's contacts as the sensor tests edit them, and its change sensor ticked
    directly (built once: a tick then reads the CRM within milliseconds)."""

    world: SyncWorld
    system_key: str

    def __post_init__(self) -> None:
        mapping = self.world.mappings[self.world.contacts]
        self.source = mapping.a if mapping.a.system_key == self.system_key else mapping.b
        custom = self.system_key == "custom_crm"
        self.service = self.world.custom_crm if custom else self.world.crm_office
        self.resources = custom_resource(self.world) if custom else office_resource(self.world)
        self.client = self.world.custom_client if custom else self.world.office_client
        self.email = "Email" if custom else "email"
        self.title = next(f for f in self.source.fields if f.lower() == "title")
        self.sensor = build_definitions(Settings.from_env()).resolve_sensor_def(
            f"{self.system_key}_changes"
        )

    def tick(self, cursor: str | None) -> Any:
        with dg.build_sensor_context(
            cursor=cursor, resources=self.resources, instance=dg.DagsterInstance.ephemeral()
        ) as context:
            return self.sensor.evaluate_tick(context)

    def titles_in_the_other_crm(self) -> set[str | None]:
        other = (
            self.world.office_client
            if self.system_key == "custom_crm"
            else self.world.custom_client
        )
        with other() as crm:
            return {
                r.get("title") or r.get("Title") for page in crm.pages("contacts") for r in page
            }


def commit_late(contacts: ContactsOf, record_id: str, title: str, stamp: str) -> None:
    """An edit that becomes visible only now, stamped ``stamp`` (a long transaction, a
    search index catching up): written into the embedded CRM's database as its commit
    would be."""
    source = contacts.source
    with sqlite3.connect(next(contacts.service.data_dir.glob("*.sqlite"))) as conn:
        table = source.obj
        (doc,) = conn.execute(f"SELECT doc FROM {table} WHERE id = ?", (record_id,)).fetchone()
        doc = {**json.loads(doc), source.modified_field: stamp, contacts.title: title}
        conn.execute(
            f"UPDATE {table} SET modified = ?, version = version + 1, doc = ? WHERE id = ?",
            (stamp, json.dumps(doc), record_id),
        )


@pytest.mark.parametrize("system_key", ["custom_crm", "crm_office"])
def test_an_edit_committed_late_with_an_earlier_stamp_still_starts_its_flow(
    sync_world: SyncWorld, system_key: str
):
    """Regression: a record stamped before the newest one seen, committed after that read
    (within the window the snapshot read reaches back), started no run: the listing from
    the cursor never showed it."""
    contacts = ContactsOf(sync_world, system_key)
    source, email = contacts.source, contacts.email
    with contacts.client() as crm:
        first = crm.create(source.obj, {email: "late@example.com"})
        seen = contacts.tick(None)
        second = crm.create(source.obj, {email: "later@example.com"})
        moved = contacts.tick(seen.cursor)
    assert seen.run_requests and moved.run_requests
    assert execute_sync().success  # both contacts in the other CRM; the snapshots read them
    # stamped just before the newest record seen, as a transaction begun then would be
    stamp = (
        datetime.fromisoformat(second[source.modified_field].replace("Z", "+00:00"))
        - timedelta(milliseconds=1)
    ).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    commit_late(contacts, first[source.id_field], "Committed late", stamp)
    late = contacts.tick(moved.cursor)
    assert jobs_of(late) == [f"sync_{sync_world.contacts}"]
    again = contacts.tick(late.cursor)
    assert not again.run_requests  # seen once, a change once
    assert execute_sync().success  # the run it starts reads the edit too, and syncs it
    assert "Committed late" in contacts.titles_in_the_other_crm()


@pytest.mark.parametrize("system_key", ["custom_crm", "crm_office"])
def test_edits_start_their_flow_while_the_crms_clock_is_ahead_and_after_it_is_set_back(
    sync_world: SyncWorld, system_key: str
):
    """Regression: with the CRM's clock an hour ahead, and after it was set back (its stamps
    stay ahead of its clock then: a stamp never goes back), each edit was "dated after the
    CRM's now" and started no run until the hour had passed."""
    contacts = ContactsOf(sync_world, system_key)
    source, title = contacts.source, contacts.title
    cursor, started = None, []

    def tick_now() -> None:
        nonlocal cursor
        result = contacts.tick(cursor)
        cursor = result.cursor or cursor
        started.append(jobs_of(result))

    def set_clock(offset: float) -> None:
        with contacts.service.client() as c:
            c.post("/_admin/clock", json={"offset_seconds": offset}).raise_for_status()

    flow = [f"sync_{sync_world.contacts}"]
    with contacts.client() as crm:
        record_id = crm.create(source.obj, {contacts.email: "clock@example.com"})[source.id_field]

        def edit(value: str) -> None:
            if system_key == "custom_crm":
                crm.update(source.obj, record_id, {title: value})
            else:  # CRMOffice replaces whole records
                crm.replace(source.obj, record_id, {**crm.get(source.obj, record_id), title: value})

        tick_now()
        set_clock(3600)
        edit("Edited an hour ahead")
        tick_now()
        tick_now()
        set_clock(0)
        edit("Edited after the clock went back")
        tick_now()
        tick_now()
    print(f"\nruns started per tick: {started}")
    assert started == [flow, flow, [], flow, []]
    assert execute_sync().success  # the run it starts syncs the edit, stamp ahead and all
    assert "Edited after the clock went back" in contacts.titles_in_the_other_crm()


def test_a_cursor_of_an_earlier_version_still_reads_from_its_position(sync_world: SyncWorld):
    with sync_world.custom_client() as a:
        a.create("contacts", {"Email": "upgrade@example.com"})
    old = json.dumps({"contacts": ["2026-01-01T00:00:00.000000+00:00", "C-0"]})
    result, _ = tick("custom_crm_changes", custom_resource(sync_world), old)
    assert jobs_of(result) == [f"sync_{sync_world.contacts}"]
    assert parse_cursor(result.cursor)["contacts"].read_at  # the new form from now on


def test_refused_credentials_fail_the_tick_naming_the_setting(sync_world: SyncWorld):
    with pytest.raises(Exception, match="CRM_OFFICE_CLIENT_SECRET") as failed:
        tick("crm_office_changes", office_resource(sync_world, secret="wrong-secret"))
    assert "wrong-secret" not in str(failed.value)


def test_the_syncs_own_writes_start_no_run_but_a_users_edit_does(sync_world: SyncWorld):
    with sync_world.custom_client() as a:
        c = a.create("contacts", {"Email": "own@example.com", "Title": "CTO"})
    first, _ = tick("crm_office_changes", office_resource(sync_world))
    before = first.cursor
    assert execute_sync().success  # creates the contact in CRMOffice
    quiet, _ = tick("crm_office_changes", office_resource(sync_world), before)
    print(f"\nafter the sync's own create: {quiet.skip_message!r}")
    assert not quiet.run_requests and "own writes" in quiet.skip_message
    assert quiet.cursor != before  # moved past the sync's write
    with sync_world.custom_client() as a:
        a.update("contacts", c["Id"], {"Title": "CEO"})
    assert execute_sync().success  # an update the sync makes: still its own
    again, _ = tick("crm_office_changes", office_resource(sync_world), quiet.cursor)
    assert not again.run_requests
    with sync_world.office_client() as b:
        (office,) = [r for page in b.pages("contacts") for r in page]
        b.replace("contacts", office["id"], {**office, "title": "Edited by a user"})
    edited, _ = tick("crm_office_changes", office_resource(sync_world), again.cursor)
    assert jobs_of(edited) == ["sync_contact_to_contacts"]


@pytest.mark.parametrize(
    "status",
    [dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING],
    ids=["queued", "launched and starting"],
)
def test_the_first_sync_takes_one_run_per_flow_whichever_sensor_ticks_first(
    sync_world: SyncWorld, status: dg.DagsterRunStatus
):
    """Both CRMs hold records at the start: each sensor sees both flows changed. The runs the
    first sensor started (queued, or launched and starting, no step begun) read the other
    CRM too, so the second sensor starts none."""
    with sync_world.custom_client() as a, sync_world.office_client() as b:
        a.create("products", {"Name": "Start Co"})
        a.create("contacts", {"Email": "start@example.com"})
        b.create("companies", {"name": "Office Start"})
        b.create("contacts", {"email": "office@example.com"})
    instance = dg.DagsterInstance.ephemeral()
    defs = build_definitions(Settings.from_env())
    first, _ = tick("custom_crm_changes", custom_resource(sync_world), instance=instance)
    for request in first.run_requests:  # submitted, no step begun yet
        job = defs.resolve_job_def(request.job_name)
        instance.create_run_for_job(job, tags={**job.tags, **request.tags}, status=status)
    second, _ = tick("crm_office_changes", office_resource(sync_world), instance=instance)
    runs = instance.get_runs()
    print(f"\nfirst ticks: {jobs_of(first)}, then {jobs_of(second)}: {len(runs)} runs")
    assert jobs_of(first) == ["sync_contact_to_contacts", "sync_product_to_companies"]
    assert not second.run_requests and "starting already" in second.skip_message
    assert second.cursor  # the second sensor moved on: it will not start them later either


def test_a_contact_planned_before_its_products_link_syncs_once_that_flow_linked_it(
    sync_world: SyncWorld,
):
    """The change sensors start each flow in a run of its own, side by side: a contact made
    with its product can be planned before the product is linked, and waits (deferred).
    The product flow's writes are the sync's own and start no run; the follow-up sensor
    starts the contact flow again, and the contact reaches CRMOffice with its company."""
    followups = {"storage": storage(sync_world)}
    assert execute_sync().success  # the first sync: each flow has a confirmed plan
    with sync_world.custom_client() as a:
        product = a.create("products", {"Name": "Follow Co", "ProductNumber": 912345670})
        a.create("contacts", {"Email": "follow@example.com", "ProductId": product["Id"]})
    early = execute_sync(flow="contact_to_contacts")  # before the product flow's run
    assert early.success and early.of("contact_to_contacts/writes_to_crm_office")["deferred"] == 1
    quiet, _ = tick("reference_followups", followups)
    assert not quiet.run_requests, "nothing was linked since the contact flow's plan"

    assert execute_sync(flow="product_to_companies").success  # links the product
    due, _ = tick("reference_followups", followups)
    assert jobs_of(due) == ["sync_contact_to_contacts"]
    print(f"\nfollow-up: {due.run_requests[0].tags['crm_assets/trigger']}")
    assert execute_sync(flow="contact_to_contacts").success
    with sync_world.office_client() as b:
        (company,) = [c for p in b.pages("companies") for c in p if c["name"] == "Follow Co"]
        (contact,) = [
            c for p in b.pages("contacts") for c in p if c["email"] == "follow@example.com"
        ]
    assert (contact.get("company") or {}).get("id") == company["id"]
    settled, _ = tick("reference_followups", followups)
    assert not settled.run_requests
