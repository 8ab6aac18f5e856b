"""Incremental runs through the public entry point (``crm-assets sync``, the Dagster job),
against both embedded CRMs: after a confirmed run, a run plans only what changed since;
a full rescan, an edited document or lost snapshots never let it miss anything."""

from __future__ import annotations

import json
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import SyncWorld

from crm_assets.engine import incremental
from crm_assets.engine.state import SCHEMA_VERSION
from crm_assets.headless import SyncOutcome, execute_sync

CONTACTS = 12


def sync(**kwargs: Any) -> SyncOutcome:
    outcome = execute_sync(**kwargs)
    assert outcome.success, outcome.failures
    return outcome


def plan_of(outcome: SyncOutcome, flow: str) -> tuple[str, int]:
    """The plan's kind and how many records it looked at, as its metadata tells them."""
    meta = outcome.of(f"{flow}/reconciled")
    return str(meta["scope"]), int(meta["records_in_scope"])


def written(outcome: SyncOutcome, flow: str) -> int:
    return sum(
        int(meta["created"]) + int(meta["updated"])
        for asset, meta in outcome.metadata.items()
        if asset.startswith(f"{flow}/writes_to_")
    )


def seeded(world: SyncWorld) -> list[dict[str, Any]]:
    """A dozen contacts on Custom CRM, synced until quiet; CRMOffice's copies."""
    with world.custom_client() as a:
        for i in range(CONTACTS):
            a.create("contacts", {"Email": f"p{i}@example.com", "FirstName": f"P{i}"})
    first = sync()
    assert plan_of(first, world.contacts) == ("full", CONTACTS)  # nothing confirmed yet
    sync()  # reads back the copies it made
    with world.office_client() as b:
        copies = [r for page in b.pages("contacts") for r in page]
    assert len(copies) == CONTACTS
    return copies


def test_a_run_after_a_confirmed_one_plans_only_the_edited_pair(
    either_world: SyncWorld, monkeypatch: pytest.MonkeyPatch
):
    copies = seeded(either_world)
    quiet = sync()
    # links written in the minute before the last plan are looked at again (hosts' clocks
    # may differ): here, those of the first sync, and nothing is written
    kind, looked_at = plan_of(quiet, either_world.contacts)
    assert kind == "incremental" and looked_at <= 2 * CONTACTS
    assert written(quiet, either_world.contacts) == 0
    # one host, runs one after another: without that margin, a quiet run looks at nothing
    monkeypatch.setattr(incremental, "CLOCK_MARGIN", timedelta(0))
    assert plan_of(sync(), either_world.contacts) == ("incremental", 0)
    edited = copies[3]
    with either_world.office_client() as b:
        b.replace("contacts", edited["id"], {**edited, "title": "Chief Tester"})
    outcome = sync()
    assert plan_of(outcome, either_world.contacts) == ("incremental", 2)  # the edit, its pair
    with either_world.custom_client() as a:
        titles = {r["Email"]: r["Title"] for page in a.pages("contacts") for r in page}
    assert titles[edited["email"]] == "Chief Tester"
    assert sum(t == "Chief Tester" for t in titles.values()) == 1


def bases_read(outcome: SyncOutcome, flow: str) -> int:
    return int(outcome.of(f"{flow}/reconciled")["base_values_read"])


def test_a_full_rescan_plans_everything(either_world: SyncWorld):
    copies = seeded(either_world)
    outcome = sync(full_rescan=True)
    assert plan_of(outcome, either_world.contacts) == ("full", 2 * CONTACTS)
    assert written(outcome, either_world.contacts) == 0
    # every pair hashes like its base: the full plan reads no base value at all
    assert bases_read(outcome, either_world.contacts) == 0
    with either_world.office_client() as b:
        b.replace("contacts", copies[5]["id"], {**copies[5], "title": "Night Auditor"})
    outcome = sync(full_rescan=True)
    assert bases_read(outcome, either_world.contacts) == 1  # the edited pair's only
    with either_world.custom_client() as a:
        titles = [r["Title"] for page in a.pages("contacts") for r in page]
    assert titles.count("Night Auditor") == 1


def test_a_state_database_from_before_base_digests_syncs_on(either_world: SyncWorld):
    """A state database an earlier version wrote (schema 1: bases without their digests)
    is upgraded in place: the first full plan reads every base, writes nothing to the
    CRMs and saves the digests, so the next reads none."""
    seeded(either_world)
    engine = sa.create_engine(either_world.state_url)
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE links DROP COLUMN base_hash"))
        conn.execute(sa.text("ALTER TABLE links DROP COLUMN deleted_side"))  # schema 3's
        conn.execute(sa.text("DROP TABLE counters"))  # schema 4's
        conn.execute(sa.text("UPDATE schema_version SET version = 1"))
    outcome = sync(full_rescan=True)
    assert bases_read(outcome, either_world.contacts) == CONTACTS
    assert written(outcome, either_world.contacts) == 0
    outcome = sync(full_rescan=True)
    assert bases_read(outcome, either_world.contacts) == 0
    with engine.connect() as conn:
        assert (
            conn.execute(sa.text("SELECT version FROM schema_version")).scalar() == SCHEMA_VERSION
        )
    engine.dispose()


def without_row(document: Path, field: str, out: Path) -> Path:
    """A copy of the document without the property rows naming ``field``."""
    lines = document.read_text().splitlines(keepends=True)
    kept: list[str] = []
    row: list[str] = []
    for line in [*lines, ""]:
        if line.startswith("   * - ") or not line.startswith("     - "):
            if not any(f"- {field}\n" in r for r in row):
                kept += row
            row = []
        (row if line.startswith(("   * - ", "     - ")) else kept).append(line)
    out.write_text("".join(kept))
    return out


def test_an_edited_document_plans_everything_again(
    either_world: SyncWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    copies = seeded(either_world)
    edited = without_row(either_world.document, "directPhone", tmp_path / "edited.rst")
    assert "directPhone" not in edited.read_text()
    monkeypatch.setenv("CRM_SYNC_SPEC", str(edited))
    with either_world.office_client() as b:
        b.replace("contacts", copies[0]["id"], {**copies[0], "givenName": "Renamed"})
    outcome = sync()
    assert plan_of(outcome, either_world.contacts) == ("full", 2 * CONTACTS)
    assert plan_of(sync(), either_world.contacts)[0] == "incremental"
    with either_world.custom_client() as a:
        names = {r["Email"]: r["FirstName"] for page in a.pages("contacts") for r in page}
    assert names[copies[0]["email"]] == "Renamed"


def test_a_release_that_maps_differently_plans_everything_again(
    either_world: SyncWorld, monkeypatch: pytest.MonkeyPatch
):
    """Frames mapped and plans made by an earlier release are not built on once values map
    differently (here: merge keys that now strip the ASCII information separators)."""
    seeded(either_world)
    assert plan_of(sync(), either_world.contacts)[0] == "incremental"
    monkeypatch.setattr(incremental, "MAPPED_FORMAT", incremental.MAPPED_FORMAT + 1)
    assert plan_of(sync(), either_world.contacts) == ("full", 2 * CONTACTS)
    assert plan_of(sync(), either_world.contacts)[0] == "incremental"


def test_lost_snapshots_are_read_anew_and_nothing_is_made_twice(either_world: SyncWorld):
    copies = seeded(either_world)
    shutil.rmtree(either_world.data_dir / "snapshots")
    with either_world.custom_client() as a:
        a.create("contacts", {"Email": "late@example.com", "FirstName": "Late"})
    outcome = sync()
    # every record read anew counts as changed: the plan looks at all of them
    assert plan_of(outcome, either_world.contacts)[1] == 2 * CONTACTS + 1
    assert written(outcome, either_world.contacts) == 1  # only the new contact's copy
    with either_world.office_client() as b:
        emails = sorted(r["email"] for page in b.pages("contacts") for r in page)
    assert emails == sorted([c["email"] for c in copies] + ["late@example.com"])


def deferred(outcome: SyncOutcome, flow: str) -> int:
    """Records a run's writes left waiting on a reference, both CRMs together."""
    return sum(
        int(meta["deferred"])
        for asset, meta in outcome.metadata.items()
        if asset.startswith(f"{flow}/writes_to_")
    )


def test_a_contact_waiting_on_an_ambiguous_company_waits_in_every_run(either_world: SyncWorld):
    """A CRMOffice contact of a company that matches two Custom CRM products cannot be
    created in Custom CRM with its product: every run defers it (an incremental one too,
    not only the first, full one, so the operator keeps seeing it), and once the company
    links it is created with its product, once."""
    with either_world.custom_client() as a:
        product = a.create("products", {"Name": "Nordlys AS"})
        twin = a.create("products", {"Name": "Nordlys AS"})
    with either_world.office_client() as b:
        company = b.create("companies", {"name": "Nordlys AS"})
        b.create("contacts", {"email": "ann@example.com", "company": {"id": company["id"]}})
    contacts = either_world.contacts
    first = sync()
    assert plan_of(first, contacts)[0] == "full" and deferred(first, contacts) == 1
    for _ in range(2):
        again = sync()
        assert plan_of(again, contacts)[0] == "incremental"
        assert deferred(again, contacts) == 1  # still waiting, still reported
    with either_world.custom_client() as a:
        assert [r for page in a.pages("contacts") for r in page] == []
        a.update("products", twin["Id"], {"Name": "Nordlys Holding AS"})
    sync()  # the products link, then the contact goes over with its product
    sync()
    with either_world.custom_client() as a:
        made = [r for page in a.pages("contacts") for r in page]
    assert [(r["Email"], r["ProductId"]) for r in made] == [("ann@example.com", product["Id"])]


def ambiguous(outcome: SyncOutcome, flow: str) -> int:
    return int(outcome.of(f"{flow}/reconciled")["ambiguous"])


def test_a_run_plans_the_ambiguous_groups_its_changes_touch_and_reports_them_all(
    either_world: SyncWorld, monkeypatch: pytest.MonkeyPatch
):
    """An edit elsewhere leaves an ambiguous group out of the plan (a sensor's edit would
    otherwise plan every group the last run left, thousands at a million records), yet
    the run reports it still; a record changing its key away settles its old group in
    the run that reads it, and nothing is made twice."""
    copies = seeded(either_world)
    contacts = either_world.contacts
    with either_world.office_client() as b:
        twins = [
            b.create("contacts", {"email": "twin@example.com", "givenName": f"Twin {i}"})
            for i in range(2)
        ]
    with either_world.custom_client() as a:
        a.create("contacts", {"Email": "twin@example.com", "FirstName": "Twin"})
    monkeypatch.setattr(incremental, "CLOCK_MARGIN", timedelta(0))
    found = sync()
    assert plan_of(found, contacts)[0] == "incremental" and ambiguous(found, contacts) == 3
    edited = copies[3]
    with either_world.office_client() as b:
        b.replace("contacts", edited["id"], {**edited, "title": "Chief Tester"})
    elsewhere = sync()
    assert plan_of(elsewhere, contacts) == ("incremental", 2)  # the edit and its pair only
    assert ambiguous(elsewhere, contacts) == 3  # the group, as the last run left it
    # a mark of the release before, which kept the ambiguous ids only: the group is
    # planned again, as that release did, until the next mark keeps its keys
    engine = sa.create_engine(either_world.state_url)
    with engine.begin() as conn:
        name = f"plan_mark/{contacts}"
        query = sa.text("SELECT value FROM cursors WHERE name = :name")
        mark = json.loads(conn.execute(query, {"name": name}).scalar_one())
        groups = mark.pop("groups").values()
        kept = sorted(list(g) for side in groups for g in zip(*side.values(), strict=True))
        assert kept == [[1, "twin@example.com"]] * 2 + [[2, "twin@example.com"]]  # candidates, key
        update = sa.text("UPDATE cursors SET value = :value WHERE name = :name")
        conn.execute(update, {"name": name, "value": json.dumps(mark)})
    engine.dispose()
    with either_world.office_client() as b:
        b.replace("contacts", edited["id"], {**edited, "title": "Chief Reviewer"})
    upgraded = sync()
    assert plan_of(upgraded, contacts) == ("incremental", 2 + 3)
    assert ambiguous(upgraded, contacts) == 3
    with either_world.office_client() as b:
        b.replace("contacts", twins[0]["id"], {**twins[0], "email": "moved@example.com"})
    settled = sync()
    kind, looked_at = plan_of(settled, contacts)
    assert kind == "incremental" and 3 <= looked_at < CONTACTS  # the group, not everything
    assert ambiguous(settled, contacts) == 0
    sync()
    with either_world.custom_client() as a:
        emails = sorted(r["Email"] for page in a.pages("contacts") for r in page)
    with either_world.office_client() as b:
        office = sorted(r["email"] for page in b.pages("contacts") for r in page)
    assert emails.count("twin@example.com") == office.count("twin@example.com") == 1
    assert emails.count("moved@example.com") == 1  # the twin that moved, made once
    assert len(emails) == len(office) == CONTACTS + 2
