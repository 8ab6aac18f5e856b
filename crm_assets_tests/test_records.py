"""The sync's own records (DESIGN section 6): per flow ``conflicts``, ``dead_letters`` and
``unlinked`` as assets (Markdown and Parquet), and ``crm-assets dead-letters`` /
``crm-assets audit`` acting on the same state, against both embedded CRMs.

Everything a user sees names the CRMs: no engine side letter (``a``/``b``) as a
column name, a value or an id prefix.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import polars as pl
from conftest import SyncWorld

from crm_assets.definitions import build_definitions
from crm_assets.defs.sync_assets import flow_key
from crm_assets.engine.snapshot import SnapshotStore
from crm_assets.headless import SyncOutcome, execute_sync
from crm_assets.settings import Settings
from crm_assets.sync import take_snapshot
from crm_assets.sync.records import unlinked_table

ROOT = Path(__file__).resolve().parents[1]
PRODUCTS, CONTACTS = "product_to_companies", "contact_to_contacts"


def sync() -> SyncOutcome:
    outcome = execute_sync()
    assert outcome.success, outcome.failures
    return outcome


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``crm-assets ...`` in a fresh process, configured by the test's environment."""
    return subprocess.run(
        [sys.executable, "-m", "crm_assets.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def no_side_letters(frame: pl.DataFrame) -> None:
    """No column or value a user sees is an engine side letter."""
    for column in frame.columns:
        assert column not in ("a", "b", "side") and not re.match(r"^[ab][._]", column), column
    for row in frame.iter_rows(named=True):
        for column, value in row.items():
            if isinstance(value, str):
                assert value not in ("a", "b") and not re.match(r"^[ab]:", value), (column, row)


def no_side_letters_in_text(text: str) -> None:
    """The same for a CLI table: no cell is ``a``/``b`` or starts ``a:``/``b:``."""
    for line in text.splitlines():
        for cell in re.split(r"\s{2,}", line.strip()):
            assert cell not in ("a", "b") and not re.match(r"^[ab]:", cell), line
        assert not re.search(r"(^|\s)[ab]_id(\s|$)", line), line


def asset_table(outcome: SyncOutcome, key: str) -> tuple[dict[str, Any], pl.DataFrame]:
    """An asset's metadata and the Parquet file it wrote."""
    meta = outcome.of(key)
    frame = pl.read_parquet(meta["path"])
    assert meta["dagster/row_count"] == frame.height
    no_side_letters(frame)
    return meta, frame


def test_refused_record_is_a_dead_letter_then_retried_clear(either_world: SyncWorld):
    sync_world, products = either_world, either_world.products
    with sync_world.custom_client() as a:
        bad = a.create("products", {"Name": "Bad Number", "ProductNumber": 12345})
        a.create("products", {"Name": "Good Number", "ProductNumber": 987654321})
    outcome = sync()

    meta, letters = asset_table(outcome, f"{products}/dead_letters")
    letter_id = f"crm_office:custom_crm:{bad['Id']}:create"
    assert letters.height == 1
    row = letters.row(0, named=True)
    assert (row["id"], row["record"], row["record in"], row["written to"], row["action"]) == (
        letter_id,
        bad["Id"],
        "Custom CRM",
        "CRMOffice",
        "create",
    )
    assert "orgNr" in row["reason"] and row["attempts"] == 1
    assert row["first seen"] is not None and row["last seen"] >= row["first seen"]
    assert letter_id in meta["table"] and "CRMOffice" in meta["table"]
    assert Path(meta["path"]).parent.name == "records"

    listed = cli("dead-letters", "list")
    assert listed.returncode == 0, listed.stderr
    assert letter_id in listed.stdout and "orgNr" in listed.stdout
    assert "written to" in listed.stdout and "CRMOffice" in listed.stdout
    no_side_letters_in_text(listed.stdout)

    with sync_world.custom_client() as a:  # fixed at its source
        a.update("products", bad["Id"], {"ProductNumber": 123456789})
    retried = cli("dead-letters", "retry", "--flow", products, letter_id)
    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert "1 cleared" in retried.stdout
    assert sync_world.state().dead_letters(products).height == 0
    with sync_world.office_client() as b:
        numbers = {c["name"]: c["orgNr"] for p in b.pages("companies") for c in p}
    assert numbers["Bad Number"] == "123456789"
    # the retry run refreshed the asset too; the audit says who asked
    written = pl.read_parquet(Path(meta["path"]))
    assert written.height == 0
    audit = sync_world.state().audit_log(products).filter(pl.col("kind") == "retry")
    assert audit.height == 1 and "retry asked by" in audit.row(0, named=True)["note"]
    assert "no open dead letters" in cli("dead-letters", "list").stdout


def test_still_refused_retry_fails_and_discard_removes_one(sync_world: SyncWorld):
    with sync_world.custom_client() as a:
        first = a.create("products", {"Name": "Bad One", "ProductNumber": 12345})
        second = a.create("products", {"Name": "Bad Two", "ProductNumber": 54321})
    sync()
    ids = [f"crm_office:custom_crm:{p['Id']}:create" for p in (first, second)]

    still = cli("dead-letters", "retry", ids[1])  # nothing fixed: still refused
    assert still.returncode == 1
    assert "0 cleared" in still.stdout and ids[1] in still.stdout
    assert still.stderr.strip().startswith("error:") and len(still.stderr.strip().splitlines()) == 1

    discarded = cli("dead-letters", "discard", ids[0])
    assert discarded.returncode == 0, discarded.stderr
    assert "discarded 1" in discarded.stdout and ids[0] in discarded.stdout
    listed = cli("dead-letters", "list", "--flow", PRODUCTS)
    assert ids[0] not in listed.stdout and ids[1] in listed.stdout
    letters = sync_world.state().dead_letters(PRODUCTS)
    assert letters.height == 1 and letters.row(0, named=True)["attempts"] == 1  # afresh

    audit = cli("audit", "--flow", PRODUCTS, "--kind", "discard")
    assert audit.returncode == 0, audit.stderr
    assert "discarded by" in audit.stdout and first["Id"] in audit.stdout
    assert "CRMOffice" in audit.stdout
    no_side_letters_in_text(audit.stdout)

    for args, says in (
        (("dead-letters", "discard", "crm_office:custom_crm:nope:create"), "no open dead letter"),
        (("dead-letters", "retry", "--no-sync", ids[0]), "no open dead letter"),
        (("dead-letters", "list", "--flow", "no_such_flow"), "no flow 'no_such_flow'"),
        (("dead-letters", "discard"), "--all"),
        (("audit", "--flow", "no_such_flow"), "no flow 'no_such_flow'"),
        (("audit", "--since", "last week"), "not an ISO time"),
    ):
        failed = cli(*args)
        assert failed.returncode != 0, args
        lines = failed.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], (args, lines)
    assert sync_world.state().dead_letters(PRODUCTS).height == 1  # errors changed nothing


def test_conflict_shows_both_values_and_the_winner(either_world: SyncWorld):
    sync_world, contacts = either_world, either_world.contacts
    with sync_world.custom_client() as a:
        c = a.create("contacts", {"Email": "c@example.com", "Title": "Engineer"})
    sync()
    with sync_world.custom_client() as a, sync_world.office_client() as b:
        a.update("contacts", c["Id"], {"Title": "Older edit"})
        (office,) = [r for p in b.pages("contacts") for r in p]
        b.replace("contacts", office["id"], {**office, "title": "Newer edit"})
    outcome = sync()

    meta, conflicts = asset_table(outcome, f"{contacts}/conflicts")
    assert conflicts.height == 1
    row = conflicts.row(0, named=True)
    assert (row["Custom CRM id"], row["CRMOffice id"]) == (c["Id"], office["id"])
    assert (row["field"].lower(), row["Custom CRM value"], row["CRMOffice value"]) == (
        "title -> title",
        "Older edit",
        "Newer edit",
    )
    assert row["winner"] == "CRMOffice" and "won" in row["why"] and row["when"] is not None
    assert "Newer edit" in meta["table"] and "Older edit" in meta["table"]

    audit = cli("audit", "--flow", contacts)
    assert audit.returncode == 0, audit.stderr
    (line,) = [line for line in audit.stdout.splitlines() if " conflict " in line]
    for text in ("Older edit", "Newer edit", "CRMOffice (won)", c["Id"], office["id"]):
        assert text in line, (text, line)
    header = audit.stdout.splitlines()[0]
    assert "Custom CRM id" in header and "CRMOffice id" in header
    no_side_letters_in_text(audit.stdout)

    mine = cli("audit", "--record", office["id"], "--kind", "conflict")
    assert mine.returncode == 0 and len(mine.stdout.strip().splitlines()) == 2  # header, row
    later = cli("audit", "--since", "2999-01-01T00:00:00+00:00")
    assert later.returncode == 0 and "no audit rows" in later.stdout


def test_unlinked_records_are_named_with_why(either_world: SyncWorld):
    sync_world = either_world
    products, contacts = sync_world.products, sync_world.contacts
    with sync_world.custom_client() as a, sync_world.office_client() as b:
        a.create("contacts", {"Email": "twin@example.com", "FirstName": "One"})
        b.create("contacts", {"email": "twin@example.com", "givenName": "Two"})
        b.create("contacts", {"email": "TWIN@example.com", "givenName": "Three"})
        prod = a.create("products", {"Name": "Twin Co"})
        b.create("companies", {"name": "Twin Co"})
        b.create("companies", {"name": "Twin Co"})
        a.create("contacts", {"FirstName": "Ada", "LastName": "Lovelace", "ProductId": prod["Id"]})
        a.create("products", {"Name": "Bad Number", "ProductNumber": 12345})
    outcome = sync()

    _meta, table = asset_table(outcome, f"{contacts}/unlinked")
    why = {(r["CRM"], r["name"]): r["reason"] for r in table.iter_rows(named=True)}
    assert why[("Custom CRM", "twin@example.com")] == "2 candidates"
    assert why[("CRMOffice", "twin@example.com")] == "1 candidate"
    assert why[("CRMOffice", "TWIN@example.com")] == "1 candidate"
    assert why[("Custom CRM", "Ada Lovelace")] == "waiting on a reference"
    assert len(why) == 4

    _meta, table = asset_table(outcome, f"{products}/unlinked")
    rows = {(r["CRM"], r["name"]): r for r in table.iter_rows(named=True)}
    assert rows[("Custom CRM", "Twin Co")]["reason"] == "2 candidates"
    failed = rows[("Custom CRM", "Bad Number")]
    assert failed["reason"] == "not created yet (failed)" and "orgNr" in failed["detail"]

    # the run's table came from its verification's plan; the asset materialized alone,
    # in a run of its own, makes the same table itself
    meta, table = asset_table(outcome, f"{contacts}/unlinked")
    defs = build_definitions(Settings.from_env())
    key = flow_key(sync_world.mappings[contacts], "unlinked")
    alone = defs.resolve_implicit_global_asset_job_def().execute_in_process(asset_selection=[key])
    assert alone.success
    assert pl.read_parquet(meta["path"]).sort(pl.all()).equals(table.sort(pl.all()))

    # a record made after the run has no match yet: the next run creates it
    with sync_world.custom_client() as a:
        a.create("contacts", {"Email": "new@example.com"})
    mapping = sync_world.mappings[contacts]
    store = SnapshotStore(sync_world.data_dir / "snapshots")
    clients = sync_world.clients()
    for obj in (mapping.a, mapping.b):
        with clients[obj.system_key] as client:
            take_snapshot(client, obj, store)
    table = unlinked_table(mapping, store, sync_world.state())
    no_side_letters(table)
    new = table.filter(pl.col("name") == "new@example.com").row(0, named=True)
    assert (new["CRM"], new["reason"]) == ("Custom CRM", "no match")
