"""Bad input (DESIGN section 8, third bullet): a clear per-record error, everything else syncs.

Records holding what the other CRM refuses or what does not convert (an invalid
e-mail, strings over the limits, wrong JSON types, a non-numeric ``orgNr``, a
missing name) end as dead letters that say which field and why; records with
unicode, emoji, markup, SQL-like text and nulls sync intact, and so does every
other record. Both CRMs validate their input, so the bad values are planted
straight into the embedded services' SQLite files, as data that predates the
validation would be. Then: a truncated JSON page fails the run with a clear
message and writes nothing; oversized pages and batches are refused clearly;
and schemathesis fuzzes both services' OpenAPI operations without ever
getting a 5xx. (Malformed dataflow documents: ``test_document.py``.)
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import SyncWorld
from embedded_fixtures import EmbeddedService, truncated_json_server
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from test_convergence import figure_writer, out  # noqa: F401  (figure_writer: behind out)

from crm_assets.custom_crm.client import CustomCrmClient
from crm_assets.engine.document import read_document
from crm_assets.engine.snapshot import SnapshotStore
from crm_assets.headless import execute_sync
from crm_assets.http import CrmProtocolError, CrmValidationError, RetryPolicy
from crm_assets.settings import packaged_spec_path
from crm_assets.sync import flow_mappings, sync_once

MAPPINGS = flow_mappings(read_document(packaged_spec_path()))
CONTACTS, PRODUCTS = "contact_to_contacts", "product_to_companies"


def plant(service: EmbeddedService, table: str, record_id: str, changes: dict[str, Any]) -> None:
    """Overwrite fields of a stored record as data that never met the validation would be."""
    db = service.data_dir / (
        "custom_crm.sqlite" if service.system == "custom-crm" else "crm_office.sqlite"
    )
    with sqlite3.connect(db, timeout=30) as conn:
        (doc,) = conn.execute(f"select doc from {table} where id = ?", (record_id,)).fetchone()
        record = json.loads(doc)
        record.update(changes)
        conn.execute(
            f"update {table} set doc = ? where id = ?",
            (json.dumps(record, ensure_ascii=False, separators=(",", ":")), record_id),
        )


#: (what, object, planted values, the field the dead letter must name)
BAD_CUSTOM = [
    ("invalid e-mail", "contacts", {"Email": "not-an-email@"}, "email"),
    ("first name over 255 characters", "contacts", {"FirstName": "x" * 256}, "givenName"),
    ("description over 4,000 characters", "products", {"Description": "d" * 4001}, "description"),
    ("ProductNumber of 5 digits", "products", {"ProductNumber": 12345}, "orgNr"),
]
BAD_OFFICE = [
    ("orgNr not numeric", "companies", {"orgNr": "12AB56789"}, "orgNr"),
    ("name missing", "companies", {"name": None}, "Name"),
    ("invalid e-mail", "contacts", {"email": "@@"}, "Email"),
]
#: values of the wrong JSON type: a dead letter naming the field, never read as a cleared field
WRONG_TYPES_CUSTOM = [
    ("title of the wrong JSON type", "contacts", {"Title": {"nested": True}}, "Title"),
    ("ProductNumber not a number", "products", {"ProductNumber": "12-34"}, "ProductNumber"),
    ("Active not a boolean", "products", {"Active": "yes"}, "Active"),
]
GOOD_TEXT = [
    "Ærøskøbing Ålesund 🧭🌍",
    "<script>alert('x')</script> & <b>bold</b>",
    "Robert'); DROP TABLE contacts;--",
    "名前 名字 🙂 \u200b zero-width",
    "  spaces around  ",
    "x" * 255,
]


def test_wrong_json_types_get_a_dead_letter(sync_world: SyncWorld):
    planted = []
    with sync_world.custom_client() as a:
        for i, (_what, obj, values, _field) in enumerate(WRONG_TYPES_CUSTOM):
            body = {"Email": f"t{i}@example.com"} if obj == "contacts" else {"Name": f"T {i}"}
            made = a.create(obj, body)
            plant(sync_world.custom_crm, obj, made["Id"], values)
            planted.append(f"a:{made['Id']}")
    assert execute_sync().success
    letters = {
        r["record_id"]: r["message"]
        for r in sync_world.state().dead_letters().iter_rows(named=True)
    }
    assert set(planted) <= set(letters)
    for record_id, (what, _obj, _values, field) in zip(planted, WRONG_TYPES_CUSTOM, strict=True):
        assert field in letters[record_id], (what, letters[record_id])
    out(
        f"\nwrong JSON types: {len(planted)} records (object for a string, text for an integer, "
        f"text for a boolean) -> {len(planted)} dead letters naming the field"
    )


def test_bad_records_get_a_clear_dead_letter_and_everything_else_syncs(sync_world: SyncWorld):
    a_service, b_service = sync_world.custom_crm, sync_world.crm_office
    bad: dict[str, tuple[str, str, str]] = {}  # dead-letter record id -> (what, flow, field)
    good: list[tuple[str, str, str]] = []  # side, object, text
    with sync_world.custom_client() as a, sync_world.office_client() as b:
        for i, (what, obj, values, field) in enumerate(BAD_CUSTOM):
            body = (
                {"Email": f"bad{i}@example.com", "FirstName": "Bad"}
                if obj == "contacts"
                else {"Name": f"Bad product {i}"}
            )
            made = a.create(obj, body)
            plant(a_service, obj, made["Id"], values)
            bad[f"a:{made['Id']}"] = (what, CONTACTS if obj == "contacts" else PRODUCTS, field)
        for i, (what, obj, values, field) in enumerate(BAD_OFFICE):
            body = (
                {"email": f"office-bad{i}@example.com"}
                if obj == "contacts"
                else {"name": f"Bad company {i}"}
            )
            made = b.create(obj, body)
            plant(b_service, obj, made["id"], values)
            bad[f"b:{made['id']}"] = (what, CONTACTS if obj == "contacts" else PRODUCTS, field)
        for i, text in enumerate(GOOD_TEXT):
            a.create("contacts", {"Email": f"good{i}@example.com", "Title": text, "Phone": None})
            b.create("contacts", {"email": f"office-good{i}@example.com", "title": text})
            a.create("products", {"Name": f"{text[:200]} {i}", "Description": text})
            b.create("companies", {"name": f"{text[:200]} office {i}", "description": text})
            good += [("a", "contacts", text), ("b", "contacts", text)]
        a.create("contacts", {"Email": "nulls@example.com"})  # everything else null
        b.create("companies", {"name": "Only a name"})

    first = execute_sync()
    assert first.success, first.failures
    second = execute_sync()  # retried, still refused, counted again; nothing else to do
    assert second.success, second.failures

    letters = sync_world.state().dead_letters()
    by_id = {r["record_id"]: r for r in letters.iter_rows(named=True)}
    missing = sorted(set(bad) - set(by_id))
    assert not missing, f"bad records without a dead letter: {[bad[m][0] for m in missing]}"
    unexpected = sorted(set(by_id) - set(bad))
    assert not unexpected, [by_id[u] for u in unexpected]
    for record_id, (what, flow, field) in bad.items():
        letter = by_id[record_id]
        assert letter["flow"] == flow and letter["action"] == "create", (what, letter)
        assert field in letter["message"], f"{what}: the message does not name {field}: {letter}"
        assert letter["attempts"] == 2, (what, letter)

    # everything else synced, values intact (unicode, emoji, markup, SQL-like text)
    with sync_world.custom_client() as a, sync_world.office_client() as b:
        titles = {
            "a": {r["Title"] for p in a.pages("contacts") for r in p},
            "b": {r["title"] for p in b.pages("contacts") for r in p},
        }
        counts = {
            "a": sum(len(p) for p in a.pages("contacts"))
            + sum(len(p) for p in a.pages("products")),
            "b": sum(len(p) for p in b.pages("contacts"))
            + sum(len(p) for p in b.pages("companies")),
        }
    for text in GOOD_TEXT:
        assert text in titles["a"] and text in titles["b"], text
    bad_a = sum(1 for k in bad if k.startswith("a:"))
    bad_b = len(bad) - bad_a
    expected_total = 4 * len(GOOD_TEXT) + 2 + bad_a + bad_b  # every good record on both sides
    assert counts["a"] == expected_total - bad_b, counts  # CRMOffice's bad ones stay there
    assert counts["b"] == expected_total - bad_a, counts
    writes = {k: v for k, v in second.metadata.items() if "/writes_to_" in k}
    assert all(int(m["created"]) == 0 and int(m["updated"]) == 0 for m in writes.values())
    out(
        f"\nbad input: {len(bad)} bad records ({len(BAD_CUSTOM)} kinds from Custom CRM, "
        f"{len(BAD_OFFICE)} from CRMOffice) -> {len(by_id)} dead letters naming the field; "
        f"{len(GOOD_TEXT) * 4 + 2} good records (unicode, emoji, markup, SQL-like, nulls) all "
        f"synced intact; second run: nothing else to write"
    )


# -- a truncated page, oversized pages and batches ----------------------------------------------
@pytest.fixture
def truncating_server() -> Iterator[str]:
    """A Custom CRM stand-in whose list answers are cut off mid-JSON."""
    with truncated_json_server(b'{"items": [{"Id": "C-1", "FirstName": "Cut') as url:
        yield url


def test_truncated_page_fails_the_run_clearly_and_writes_nothing(
    sync_world: SyncWorld, truncating_server: str, tmp_path: Path
):
    with sync_world.office_client() as b:
        b.create("contacts", {"email": "waiting@example.com"})
    store = SnapshotStore(tmp_path / "snapshots")
    custom = CustomCrmClient(truncating_server, "key", retry=RetryPolicy(attempts=2, initial=0.01))
    with custom, sync_world.office_client() as office:
        clients = {"custom_crm": custom, "crm_office": office}
        with pytest.raises(CrmProtocolError) as caught:
            sync_once(MAPPINGS, clients, store, sync_world.state())
    message = str(caught.value)
    assert "Custom CRM" in message and "GET /api/" in message and "malformed JSON" in message
    assert store.read("custom_crm", "products") is None  # no half-read snapshot stored
    assert sync_world.state().audit_log().height == 0  # nothing written anywhere
    out(f"\ntruncated page: the run stops before any write: {message}")


def test_oversized_pages_and_batches_are_refused_clearly(sync_world: SyncWorld):
    refused = []
    with sync_world.custom_client() as a, sync_world.office_client() as b:
        with pytest.raises(CrmValidationError) as caught:
            next(a.pages("contacts", size=501))
        assert [e["field"] for e in caught.value.errors] == ["limit"]
        refused.append(str(caught.value))
        with pytest.raises(CrmValidationError) as caught:
            next(b.pages("contacts", size=1001))
        assert [e["field"] for e in caught.value.errors] == ["take"]
        refused.append(str(caught.value))
        with pytest.raises(ValueError, match="at most 100"):
            b.batch("contacts", create=[{"email": f"x{i}@example.com"} for i in range(101)])
    with sync_world.crm_office.client() as raw:
        response = raw.post(
            "/contacts/batch", json={"create": [{"givenName": str(i)} for i in range(101)]}
        )
    assert response.status_code == 422 and "at most 100" in response.text
    refused.append(response.text)
    out(f"\noversized pages and batches refused: {len(refused) + 1} ({refused[0][:90]} ...)")


# -- schemathesis: malformed requests never get a 5xx ---------------------------------------------
FUZZ_EXAMPLES = 12  # per operation and generation mode


def _fuzz(service: EmbeddedService, headers: Callable[[], dict[str, str]]) -> tuple[int, int]:
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{service.base_url}/openapi.json")
    calls, operations = 0, 0
    server_errors: list[str] = []
    session = httpx.Client(base_url=service.base_url, timeout=10)
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        for mode in (GenerationMode.NEGATIVE, GenerationMode.POSITIVE):

            @settings(
                max_examples=FUZZ_EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def call(case: Any) -> None:
                nonlocal calls
                response = case.call(base_url=service.base_url, headers=headers())
                calls += 1
                if response.status_code >= 500:
                    server_errors.append(
                        f"{case.method} {case.formatted_path} -> {response.status_code}: "
                        f"{response.text[:200]} (body {str(case.body)[:200]})"
                    )

            try:
                call()
            except Unsatisfiable:  # e.g. no way to make this operation's input invalid
                continue
    session.close()
    assert not server_errors, server_errors[:5]
    return operations, calls


def test_fuzzed_requests_never_get_a_server_error(embedded_service_factory: Any):
    custom = embedded_service_factory("custom-crm", seed=20)
    office = embedded_service_factory("crm-office", seed=20)
    ops_a, calls_a = _fuzz(custom, custom.auth_headers)
    ops_b, calls_b = _fuzz(office, office.auth_headers)
    out(
        f"\nschemathesis: {ops_a + ops_b} operations ({ops_a} Custom CRM, {ops_b} CRMOffice), "
        f"{calls_a + calls_b} fuzzed authenticated requests (negative and positive), 5xx answers: 0"
    )
