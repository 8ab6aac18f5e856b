"""Never duplicate, never lose: Unicode-safe merge keys, deletes whose side effects stay put.

Probes an operator runs into: the same person typed with a decomposed "Å", a
no-break space or a zero-width space; a company deleted in CRMOffice, which
detaches its contacts there. Each test prints its figures (``pytest -s``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import unicodedata
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from conftest import SyncWorld
from hypothesis import given, settings
from hypothesis import strategies as st

from crm_assets.engine.mapping import canonical_key, canonical_text
from crm_assets.headless import execute_sync

CLEAN = "Åse.Øyen@example.no"
#: Spellings both CRMs store (they refuse e-mails with zero-width characters or a BOM;
#: those spellings are covered where the keys are compared, below).
VARIANTS = {
    "nfd": unicodedata.normalize("NFD", CLEAN),
    "upper": CLEAN.upper(),
    "blanks": f"  {CLEAN} ",
    "no-break space": f"{CLEAN}\u00a0",
}
UNSTORABLE = {
    "zero-width space": "Åse.Øyen\u200b@example.no",
    "byte order mark": f"\ufeff{CLEAN}",
    "zero-width joiner": "Åse\u200d.Øyen@example.no",
    "soft hyphen": "Åse.Ø\u00adyen@example.no",
}


def test_every_spelling_of_a_key_has_one_canonical_form():
    spellings = [CLEAN, *VARIANTS.values(), *UNSTORABLE.values(), "ÅSE.ØYEN@EXAMPLE.NO\t"]
    frame = pl.DataFrame({"key": spellings}).select(canonical_key(pl.col("key")).alias("key"))
    assert frame.get_column("key").unique().to_list() == ["åse.øyen@example.no"]
    # the writer's per-record form agrees with the frames' form
    assert {canonical_text(s) for s in spellings} == {"åse.øyen@example.no"}
    assert pl.select(canonical_key(pl.lit(" \u00a0\u200b "))).item() is None  # blank: no key


#: Any text Python's Unicode tables know (polars may know newer characters' cases).
KNOWN_TEXT = st.text(st.characters(exclude_categories=["Cs", "Cn"]))


@settings(max_examples=400, deadline=None)
@given(st.lists(KNOWN_TEXT, min_size=1, max_size=20))
def test_frames_and_the_writer_read_any_key_alike(values: list[str]):
    """A column mixes pure-ASCII keys (the fast path) with others (the Unicode one): each
    gets the writer's canonical form, so a record the plan links is the one it writes."""
    frame = pl.DataFrame({"key": values}, schema={"key": pl.String})
    keys = frame.select(canonical_key(pl.col("key")).alias("key")).get_column("key").to_list()
    assert keys == [canonical_text(v) for v in values]


def all_records(client: Any, obj: str) -> list[dict[str, Any]]:
    return [r for page in client.pages(obj) for r in page]


def sync() -> None:
    outcome = execute_sync()
    assert outcome.success, outcome.failures


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("clean_in", ["custom_crm", "crm_office"])
def test_spellings_of_one_email_link_as_one_person_and_the_clean_one_stays(
    sync_world: SyncWorld, variant: str, clean_in: str
):
    spelled = VARIANTS[variant]
    custom_mail, office_mail = (CLEAN, spelled) if clean_in == "custom_crm" else (spelled, CLEAN)
    with sync_world.custom_client() as a, sync_world.office_client() as b:
        a.create("contacts", {"Email": custom_mail, "FirstName": "Åse"})
        b.create("contacts", {"email": office_mail, "familyName": "Øyen"})
    sync()
    sync()
    with sync_world.custom_client() as a, sync_world.office_client() as b:
        custom, office = all_records(a, "contacts"), all_records(b, "contacts")
    print(
        f"\n{variant!r} in {'CRMOffice' if clean_in == 'custom_crm' else 'Custom CRM'}: "
        f"{len(custom)} Custom CRM, {len(office)} CRMOffice contacts; "
        f"e-mails {custom[0]['Email']!r} / {office[0]['email']!r}"
    )
    assert len(custom) == 1 and len(office) == 1  # linked: nobody created twice
    assert custom[0]["LastName"] == "Øyen" and office[0]["givenName"] == "Åse"
    clean = custom[0]["Email"] if clean_in == "custom_crm" else office[0]["email"]
    assert clean == CLEAN  # the padded or decomposed spelling never overwrote the clean one


def test_a_company_deleted_in_crm_office_leaves_custom_crm_contacts_their_product(
    sync_world: SyncWorld,
):
    with sync_world.custom_client() as a:
        product = a.create("products", {"Name": "Doomed AS"})
        contacts = [
            a.create("contacts", {"Email": f"emp{i}@example.com", "ProductId": product["Id"]})
            for i in range(3)
        ]
    sync()
    with sync_world.office_client() as b:
        (company,) = all_records(b, "companies")
        assert all(c["company"] == {"id": company["id"]} for c in all_records(b, "contacts"))
        b.delete("companies", company["id"])  # CRMOffice detaches its contacts
        assert all(c["company"] is None for c in all_records(b, "contacts"))
    outcome = execute_sync(full_rescan=True)
    assert outcome.success, outcome.failures
    again = execute_sync()
    with sync_world.custom_client() as a:
        kept = [a.get("contacts", c["Id"])["ProductId"] for c in contacts]
        assert a.get("products", product["Id"])["Deleted"] is False  # deletes do not propagate
    print(f"\nafter the company's delete: Custom CRM contacts' ProductId {kept}")
    assert kept == [product["Id"]] * 3
    audit = sync_world.state().audit_log("contact_to_contacts")
    flagged = audit.filter(pl.col("kind") == "kept_ref")
    assert flagged.height == 3  # flagged once per contact, not once per run
    check = again.checks["contact_to_contacts/verified:no_delete_side_effects"]
    assert check[0] is False and check[2]["references_kept"] == 3
    for asset, meta in again.metadata.items():
        if "/writes_to_" in asset:
            assert meta["updated"] == meta["created"] == 0, (asset, meta)
    with sync_world.custom_client() as a:  # a later edit of such a contact still syncs
        a.update("contacts", contacts[0]["Id"], {"FirstName": "Edited"})
    outcome = execute_sync()
    assert outcome.success, outcome.failures
    with sync_world.office_client() as b:
        edited = [c for c in all_records(b, "contacts") if c["givenName"] == "Edited"]
    assert len(edited) == 1 and edited[0]["company"] is None
    assert sync_world.state().dead_letters("contact_to_contacts").height == 0


@pytest.mark.parametrize("deleted_in", ["crm_office", "custom_crm"])
def test_a_new_contact_of_a_deleted_company_is_created_without_it_and_flagged(
    either_world: SyncWorld, deleted_in: str
):
    """A contact added in one CRM, pointing at a product/company whose counterpart was
    deleted in the other, is created there without that reference (it has nothing to
    point to), flagged, and not left as a refusal retried on every run."""
    world = either_world
    with world.custom_client() as a:
        product = a.create("products", {"Name": "Doomed AS"})
    sync()
    with world.custom_client() as a, world.office_client() as b:
        (company,) = all_records(b, "companies")
        if deleted_in == "crm_office":
            b.delete("companies", company["id"])
        else:
            a.delete("products", product["Id"])
    sync()
    with world.custom_client() as a, world.office_client() as b:
        if deleted_in == "crm_office":
            a.create("contacts", {"Email": "late@example.com", "ProductId": product["Id"]})
        else:
            b.create("contacts", {"email": "late@example.com", "company": {"id": company["id"]}})
    outcome = execute_sync()
    assert outcome.success, outcome.failures
    again = execute_sync()
    with world.custom_client() as a, world.office_client() as b:
        custom = [c for c in all_records(a, "contacts") if c["Email"] == "late@example.com"]
        office = [c for c in all_records(b, "contacts") if c["email"] == "late@example.com"]
    print(f"\ndeleted in {deleted_in}: Custom CRM {custom}, CRMOffice {office}")
    assert len(custom) == 1 and len(office) == 1  # created once, not refused run after run
    if deleted_in == "crm_office":
        assert office[0]["company"] is None and custom[0]["ProductId"] == product["Id"]
    else:
        assert custom[0]["ProductId"] is None and office[0]["company"] == {"id": company["id"]}
    assert world.state().dead_letters(world.contacts).height == 0
    check = again.checks[f"{world.contacts}/verified:no_delete_side_effects"]
    assert check[0] is False and check[2]["references_kept"] == 1
    for asset, meta in again.metadata.items():
        if "/writes_to_" in asset:  # the kept reference is not written again
            assert meta["updated"] == meta["created"] == 0, (asset, meta)


def cli_sync(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "crm_assets.cli", "sync", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def counts(world: SyncWorld) -> dict[str, int]:
    with world.custom_client() as a, world.office_client() as b:
        live = [r for r in all_records(a, "contacts") if not r["Deleted"]]
        return {"custom_crm": len(live), "crm_office": len(all_records(b, "contacts"))}


def seed_without_emails(world: SyncWorld) -> None:
    """Contacts only merge keys could link; five of them have no e-mail at all."""
    with world.custom_client() as a, world.office_client() as b:
        for i in range(5):
            a.create("contacts", {"FirstName": f"NoMail{i}", "LastName": "Custom"})
            b.create("contacts", {"givenName": f"Office{i}", "familyName": "NoMail"})
        for i in range(5):
            a.create("contacts", {"Email": f"has{i}@example.com", "FirstName": f"Has{i}"})


@pytest.mark.parametrize("lost", ["emptied state.db", "another data directory"])
def test_a_lost_state_refuses_then_rebuild_links_relinks_without_creating(
    sync_world: SyncWorld, tmp_path: Path, lost: str
):
    seed_without_emails(sync_world)
    first = cli_sync()
    assert first.returncode == 0, first.stderr
    synced = counts(sync_world)
    assert synced == {"custom_crm": 15, "crm_office": 15}
    env: dict[str, str] = {}
    if lost == "emptied state.db":
        for suffix in ("", "-wal", "-shm"):
            Path(f"{sync_world.state_url.removeprefix('sqlite:///')}{suffix}").unlink(
                missing_ok=True
            )
    else:  # started from another working directory: a new data dir with a new state
        env = {"CRM_SYNC_DATA_DIR": str(tmp_path / "elsewhere"), "CRM_SYNC_STATE_URL": ""}
    refused = cli_sync(env=env)
    print(f"\n{lost}: sync exit {refused.returncode}: {refused.stderr.strip()}")
    assert refused.returncode == 5
    assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr
    assert "--rebuild-links" in refused.stderr
    assert counts(sync_world) == synced  # nothing written
    rebuilt = cli_sync("--rebuild-links", env=env)
    assert rebuilt.returncode == 0, rebuilt.stderr
    linked = sum(
        int(line.split("links_new=")[1].split(",")[0])
        for line in rebuilt.stdout.splitlines()
        if "/reconciled" in line and "links_new=" in line
    )
    print(f"--rebuild-links linked {linked} pairs, created nothing: {counts(sync_world)}")
    assert counts(sync_world) == synced
    assert linked >= 15
    normal = cli_sync(env=env)
    assert normal.returncode == 0, normal.stderr
    after = counts(sync_world)
    print(f"a normal sync afterwards: {after}")
    assert after == synced  # 0 duplicates


def set_clock(service: Any, seconds: float) -> None:
    with service.client() as http:
        assert http.post("/_admin/clock", json={"offset_seconds": seconds}).status_code == 200
        assert http.get("/_admin/clock").json()["offset_seconds"] == seconds


def test_a_clock_an_hour_ahead_neither_stalls_incremental_sync_nor_decides_conflicts(
    sync_world: SyncWorld,
):
    """Custom CRM's clock runs an hour ahead for a while, then is put right."""
    with sync_world.custom_client() as a:
        anne = a.create("contacts", {"Email": "anne@example.com", "Title": "CTO"})
    sync()
    set_clock(sync_world.custom_crm, 3600)
    with sync_world.custom_client() as a:
        a.update("contacts", anne["Id"], {"Phone": "+47 1"})  # stamped an hour ahead
        a.create("contacts", {"Email": "bob@example.com"})  # and stays dated an hour ahead
    ahead = execute_sync()
    assert ahead.success, ahead.failures
    sync()  # a few reads: the offset estimate is the median of the last ones
    offset = ahead.of("custom_crm/contacts")["clock_offset_seconds"]
    # the conflict: Custom CRM edits first (stamped +1 h), CRMOffice 5 s later in real time
    with sync_world.custom_client() as a, sync_world.office_client() as b:
        a.update("contacts", anne["Id"], {"Title": "Earlier edit"})
        time.sleep(5)
        office = next(c for c in all_records(b, "contacts") if c["email"] == "anne@example.com")
        b.replace("contacts", office["id"], {**office, "title": "Later edit"})
    conflict = execute_sync()
    assert conflict.success, conflict.failures
    with sync_world.custom_client() as a:
        title = a.get("contacts", anne["Id"])["Title"]
    audit = sync_world.state().audit_log("contact_to_contacts").filter(pl.col("kind") == "conflict")
    clock = conflict.checks["custom_crm/contacts:clock_in_step"]
    print(
        f"\nCustom CRM clock +3600 s: measured offset {clock[2]['clock_offset_seconds']} s "
        f"(first read {offset} s); conflict won by {title!r}; audit: {audit['note'].to_list()}"
    )
    assert title == "Later edit"  # the later edit in real time won on both sides
    assert clock[0] is False  # the offset is shown, as a warning
    assert "Later edit" in audit["new_value"].to_list()
    # the clock is put right: the records stamped an hour ahead must not stall later edits
    set_clock(sync_world.custom_crm, 0)
    with sync_world.custom_client() as a:
        a.update("contacts", anne["Id"], {"MobilePhone": "+47 2"})
    outcome = execute_sync()  # incremental: no full rescan
    assert outcome.success, outcome.failures
    snapshot = outcome.of("custom_crm/contacts")
    future = outcome.checks["custom_crm/contacts:no_future_dated_records"]
    with sync_world.office_client() as b:
        office = next(c for c in all_records(b, "contacts") if c["email"] == "anne@example.com")
    print(
        f"clock put right: snapshot mode {snapshot['mode']}, read since {snapshot['read_since']}, "
        f"future-dated records {snapshot['future_dated']}; CRMOffice mobilePhone "
        f"{office['mobilePhone']!r}"
    )
    assert snapshot["mode"] == "incremental" and snapshot["future_dated"] >= 1
    assert future[0] is False  # counted and shown as a warning
    assert office["mobilePhone"] == "+47 2"
