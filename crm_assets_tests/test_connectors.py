"""Connectors by system: the registry, documents in either direction, honest errors, empty flows.

What a new user tries first: the project's document the other way round, a
document naming a CRM the project has no connector for, and the Sesam Talk
document itself whose property tables are empty.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import DOCUMENTS, SyncWorld

from crm_assets.connectors import CONNECTORS, check_document, connector_for
from crm_assets.engine.document import parse_document, read_document
from crm_assets.headless import execute_sync
from crm_assets.sync import flow_set

SPECS = Path(__file__).parent / "fixtures" / "specs"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "crm_assets.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def all_records(client: Any, obj: str) -> list[dict[str, Any]]:
    return [r for page in client.pages(obj) for r in page]


@pytest.mark.parametrize(
    "spelling", ["CRMOffice", "crmoffice", "CRM Office", " crm  office ", "CRMOFFICE"]
)
def test_system_names_match_ignoring_case_and_spacing(spelling: str):
    found = connector_for(spelling)
    assert found is not None and found.key == "crm_office"
    assert connector_for("Freshteam") is None


def test_every_connector_declares_its_objects_settings_and_secret():
    for connector in CONNECTORS:
        assert connector.objects and all(o.system_key == connector.key for o in connector.objects)
        roles = {s.role for s in connector.settings}
        assert {"base_url", "secret"} <= roles, connector.system
        for obj in connector.objects:
            assert {obj.id_field, obj.modified_field, obj.version_field} <= set(obj.fields)


@pytest.mark.parametrize("orientation", sorted(DOCUMENTS))
def test_each_flow_end_resolves_to_the_object_the_document_names(orientation: str):
    document = read_document(DOCUMENTS[orientation])
    for mapping in flow_set(document).mappings:
        flow = document.flow(mapping.name)
        assert mapping.a.system == flow.source.system
        assert mapping.b.system == flow.target.system
        assert mapping.a.entity == flow.source.entity


def test_a_document_without_connector_fails_sync_in_one_line_naming_the_system(tmp_path: Path):
    result = cli(
        "sync",
        "--dry-run",
        env={
            "CRM_SYNC_SPEC": str(SPECS / "freshteam-crmoffice.rst"),
            "CRM_SYNC_DATA_DIR": str(tmp_path),
        },
    )
    print(f"exit {result.returncode}, stderr: {result.stderr!r}")
    assert result.returncode == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "Freshteam" in lines[0] and "freshteam-crmoffice.rst, line" in lines[0]
    assert "Custom CRM, CRMOffice" in lines[0]
    assert result.stdout.splitlines() == [f"data directory: {tmp_path}"]


def test_spec_check_lists_flows_no_connector_provides():
    bad = cli("spec", str(SPECS / "hubspot-superoffice.rst"), "--check")
    assert bad.returncode == 3
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == len(read_document(SPECS / "hubspot-superoffice.rst").flows)
    assert all("HubSpot" in e for e in errors)
    good = cli("spec", str(DOCUMENTS["crm_office_to_custom_crm"]), "--check")
    assert good.returncode == 0, good.stderr


def test_an_object_the_connector_lacks_is_named_with_the_objects_it_has():
    text = (
        "Custom CRM to CRMOffice Dataflow\n================================\n\n"
        "Custom CRM Invoice to CRMOffice Contacts\n----------------------------------------\n\n"
        "The following properties are synchronized:\n\n"
        ".. list-table::\n   :header-rows: 1\n\n"
        "   * - Custom CRM Invoice Property\n     - CRMOffice Contacts Property\n"
        "     - CRMOffice Data Type\n"
    )
    errors = check_document(parse_document(text, source="invoice.rst"))
    assert len(errors) == 1
    assert "invoice.rst, line" in errors[0] and "'Invoice'" in errors[0]
    assert "Contact, Product" in errors[0]


def test_the_sesam_document_with_empty_tables_syncs_nothing_and_says_so(
    sync_world: SyncWorld, monkeypatch: pytest.MonkeyPatch
):
    """The original input: links by nothing, writes nothing, reports a warning per flow."""
    with sync_world.custom_client() as a, sync_world.office_client() as b:
        a.create("contacts", {"Email": "only@example.com", "FirstName": "Only"})
        b.create("companies", {"name": "Only In Office"})
    monkeypatch.setenv("CRM_SYNC_SPEC", str(SPECS / "customcrm-crmoffice.rst"))
    result = cli("sync")
    print(result.stdout, result.stderr)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("no properties to sync") == 2
    with sync_world.custom_client() as a, sync_world.office_client() as b:
        assert len(all_records(a, "contacts")) == 1 and all_records(a, "products") == []
        assert all_records(b, "contacts") == [] and len(all_records(b, "companies")) == 1
    report = (sync_world.data_dir / "reports" / "qa-report.md").read_text()
    assert report.count("WARN: no properties to sync") == 2


def test_an_empty_flow_with_merge_criteria_links_and_writes_nothing(
    sync_world: SyncWorld, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    text = (SPECS / "customcrm-crmoffice.rst").read_text()
    merge = (
        "A Custom CRM Contact will merge with a CRMOffice Contacts if one of the following "
        "property combinations match:\n\n.. list-table::\n   :header-rows: 1\n\n"
        "   * - Custom CRM Contact Property\n     - CRMOffice Contacts Property\n"
        "   * - Email\n     - email\n\n"
    )
    marker = "Once a link between a Custom CRM Contact"
    doc = tmp_path / "merge-only.rst"
    doc.write_text(text.replace(marker, merge + marker, 1))
    with sync_world.custom_client() as a, sync_world.office_client() as b:
        a.create("contacts", {"Email": "Same@Example.com", "Title": "CEO"})
        b.create("contacts", {"email": "same@example.com", "title": "CTO"})
    monkeypatch.setenv("CRM_SYNC_SPEC", str(doc))
    outcome = execute_sync()
    assert outcome.success, outcome.failures
    assert outcome.of("contact_to_contacts/reconciled")["links_new"] == 1
    for system in ("crm_office", "custom_crm"):
        written = outcome.of(f"contact_to_contacts/writes_to_{system}")
        assert written["created"] == written["updated"] == 0
    with sync_world.custom_client() as a, sync_world.office_client() as b:
        assert all_records(a, "contacts")[0]["Title"] == "CEO"
        assert all_records(b, "contacts")[0]["title"] == "CTO"


def test_a_reversed_document_writes_each_crm_through_its_own_api(either_world: SyncWorld):
    """The probe that found side letters choosing the write path: creates, merges, a
    conflict, a reference, and a second run that writes nothing, in either direction."""
    world = either_world
    with world.custom_client() as a, world.office_client() as b:
        prod = a.create("products", {"Name": "Acme AS", "ProductNumber": 912345678})
        comp = b.create("companies", {"name": "Office Only AS", "orgNr": "987654321"})
        a.create("contacts", {"Email": "ann@example.com", "Title": "CTO", "ProductId": prod["Id"]})
        b.create("contacts", {"email": "bob@example.com", "company": {"id": comp["id"]}})
        kari = a.create("contacts", {"Email": "Kari@Example.com", "FirstName": "Kari"})
        b.create("contacts", {"email": "kari@example.com ", "familyName": "Nordmann"})
    first = execute_sync()
    assert first.success, first.failures
    with world.custom_client() as a, world.office_client() as b:
        office = {c["email"].strip().lower(): c for c in all_records(b, "contacts")}
        custom = {c["Email"].strip().lower(): c for c in all_records(a, "contacts")}
        assert (
            set(office) == set(custom) == {"ann@example.com", "bob@example.com", "kari@example.com"}
        )
        assert len(all_records(b, "contacts")) == 3 and len(all_records(a, "contacts")) == 3
        acme = next(c for c in all_records(b, "companies") if c["name"] == "Acme AS")
        assert office["ann@example.com"]["company"]["id"] == acme["id"]
        office_only = next(p for p in all_records(a, "products") if p["Name"] == "Office Only AS")
        assert custom["bob@example.com"]["ProductId"] == office_only["Id"]
        assert custom["kari@example.com"]["LastName"] == "Nordmann"
        assert office["kari@example.com"]["givenName"] == "Kari"
        # the same field edited on both sides: the later edit wins on both
        a.update("contacts", kari["Id"], {"Title": "Older"})
        k = office["kari@example.com"]
        b.replace("contacts", k["id"], {**k, "title": "Newer"})
    second = execute_sync()
    assert second.success, second.failures
    with world.custom_client() as a, world.office_client() as b:
        assert a.get("contacts", kari["Id"])["Title"] == "Newer"
        assert b.get("contacts", k["id"])["title"] == "Newer"
    quiet = execute_sync()
    for asset, meta in quiet.metadata.items():
        if "/writes_to_" in asset:
            assert meta["created"] == meta["updated"] == 0, (asset, meta)
