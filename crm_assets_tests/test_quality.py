"""The QA checklist: asset checks read both CRMs after the writes; the QA report renders them."""

from __future__ import annotations

from conftest import SyncWorld

from crm_assets.engine.checks import check_catalog
from crm_assets.engine.document import read_document
from crm_assets.headless import execute_sync
from crm_assets.settings import packaged_spec_path
from crm_assets.sync import flow_mappings

DOC = read_document(packaged_spec_path())
CONTACTS = "contact_to_contacts/verified"


def test_every_document_row_has_agreement_and_type_checks_plus_flow_checks():
    for mapping in flow_mappings(DOC):
        names = list(check_catalog(mapping))
        flow = DOC.flow(mapping.name)
        references = any(c.reference for c in mapping.columns)  # + the delete side-effect check
        assert len(names) == 2 * len(flow.properties) + 5 + references
        assert "email_agrees" in names or "name_agrees" in names
        assert {"links_one_to_one", "no_failed_writes", "no_ambiguous_matches"} <= set(names)


def test_checks_pass_after_a_clean_sync_and_the_report_is_green(sync_world: SyncWorld):
    with sync_world.custom_client() as a, sync_world.office_client() as b:
        p = a.create("products", {"Name": "Acme", "ProductNumber": 123456789, "Active": True})
        a.create("contacts", {"Email": "x@example.com", "Title": "CTO", "ProductId": p["Id"]})
        b.create("contacts", {"email": "y@example.com", "givenName": "Yngve"})
    outcome = execute_sync()
    assert outcome.success, outcome.failures
    assert outcome.failed_checks() == []
    assert outcome.checks[f"{CONTACTS}:title_agrees"][0] is True
    assert outcome.checks["contact_to_contacts/reconciled:circuit_breaker"][0] is True
    report = (sync_world.data_dir / "reports" / "qa-report.md").read_text()
    assert "| `Title` | `title` | string | ✅ PASS | ✅ PASS |" in report
    assert "| `ProductId` | `company.id` | string | ✅ PASS | ✅ PASS |" in report
    assert "| ❌ FAIL" not in report and "| ⚠️ WARN" not in report
    qa = outcome.of("qa/qa_report")
    assert qa["failed"] == 0 and qa["checks"] == 2 * (7 + 9) + 10 + 1


def test_failing_checks_name_the_offenders_with_both_values(sync_world: SyncWorld):
    with sync_world.custom_client() as a, sync_world.office_client() as b:
        a.create("contacts", {"Email": "twin@example.com"})
        b.create("contacts", {"email": "twin@example.com"})
        b.create("contacts", {"email": "twin@example.com"})
        a.create("products", {"Name": "Bad", "ProductNumber": 42})  # orgNr needs 9 digits
    outcome = execute_sync()
    failed = outcome.failed_checks()
    assert f"{CONTACTS}:no_ambiguous_matches" in failed
    passed, severity, meta = outcome.checks[f"{CONTACTS}:no_ambiguous_matches"]
    assert severity == "WARN" and meta["ambiguous"] == 3
    passed, severity, meta = outcome.checks["product_to_companies/verified:no_failed_writes"]
    assert not passed and severity == "ERROR" and meta["dead_letters"] == 1
    assert "orgNr" in meta["sample"]
    report = (sync_world.data_dir / "reports" / "qa-report.md").read_text()
    assert "| ❌ FAIL" in report and "| ⚠️ WARN" in report


def test_checks_on_empty_systems_do_not_crash(sync_world: SyncWorld):
    outcome = execute_sync()
    assert outcome.success, outcome.failures
    assert outcome.failed_checks() == []
