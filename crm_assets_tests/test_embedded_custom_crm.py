"""The embedded Custom CRM keeps the HTTP contract of DESIGN.md section 4 (real HTTP)."""
# ruff: noqa: F811  (the fixtures imported below are parameters of the tests)

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from embedded_fixtures import (  # noqa: F401  (pytest fixtures)
    EmbeddedService,
    _custom_crm_process,
    custom_crm_service,
    embedded_service_factory,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crm_assets.crm_office.seed import demo_records as crm_office_records
from crm_assets.custom_crm.seed import demo_records as custom_crm_records

Factory = Callable[..., EmbeddedService]


def _contact(c: httpx.Client, **fields: Any) -> dict[str, Any]:
    response = c.post("/api/contacts", json={"FirstName": "Ada", "LastName": "Lovelace", **fields})
    assert response.status_code == 201, response.text
    return response.json()


def _all(c: httpx.Client, obj: str, **params: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        body = c.get(f"/api/{obj}", params=query).json()
        items += body["items"]
        cursor = body["nextCursor"]
        if cursor is None:
            return items


def _errors(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 422, response.text
    body = response.json()
    assert set(body) == {"errors"}
    for error in body["errors"]:
        assert set(error) == {"field", "message"} and error["message"]
    return {e["field"]: e["message"] for e in body["errors"]}


# -- authentication ---------------------------------------------------------------------------


def test_openapi_is_public_and_everything_else_needs_the_key(
    custom_crm_service: EmbeddedService,
) -> None:
    base = custom_crm_service.base_url
    spec = httpx.get(f"{base}/openapi.json").json()
    assert "/api/contacts" in spec["paths"] and "/api/products/{Id}" in spec["paths"]
    assert httpx.get(f"{base}/docs").status_code == 200
    wrong = {"Authorization": "Bearer not-the-key"}
    for method, path in [
        ("GET", "/api/contacts"),
        ("GET", "/api/contacts/C-000001"),
        ("POST", "/api/products"),
        ("PATCH", "/api/contacts/C-000001"),
        ("DELETE", "/api/contacts/C-000001"),
        ("POST", "/_admin/reset"),
        ("GET", "/nowhere"),
    ]:
        for headers in ({}, wrong, {"Authorization": "Basic abc"}):
            response = httpx.request(method, base + path, headers=headers, content=b"{bad")
            assert response.status_code == 401, (method, path, headers)
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert custom_crm_service.credentials["api_key"] not in response.text


# -- records ----------------------------------------------------------------------------------


def test_create_get_patch_soft_delete(custom_crm_service: EmbeddedService) -> None:
    with custom_crm_service.client() as c:
        product = c.post(
            "/api/products", json={"Name": "Fjord Analytics", "ProductNumber": 987654321}
        )
        assert product.status_code == 201
        p = product.json()
        assert p["Active"] is True and p["Url"] is None and p["ProductNumber"] == 987654321
        created = _contact(
            c, Email="ada@example.com", ProductId=p["Id"], Id="ignored", Version=99, Deleted=True
        )
        assert isinstance(created["Id"], str) and created["Id"] != "ignored"
        assert created["Version"] == 1 and created["Deleted"] is False
        assert created["Created"] == created["Modified"] and created["Modified"].endswith("Z")
        assert set(created) == {
            "Id", "FirstName", "LastName", "Email", "Phone", "MobilePhone", "Title",
            "ProductId", "Created", "Modified", "Version", "Deleted",
        }  # fmt: skip
        cid = created["Id"]
        got = c.get(f"/api/contacts/{cid}")
        assert got.json() == created and got.headers["ETag"] == '"1"'

        patched = c.patch(f"/api/contacts/{cid}", json={"Title": "Countess", "Phone": None}).json()
        assert patched["Title"] == "Countess" and patched["FirstName"] == "Ada"
        assert patched["Version"] == 2 and patched["Modified"] > created["Modified"]
        assert patched["Created"] == created["Created"]

        assert c.delete(f"/api/contacts/{cid}").status_code == 204
        deleted = c.get(f"/api/contacts/{cid}").json()
        assert deleted["Deleted"] is True and deleted["Version"] == 3
        assert deleted["Modified"] > patched["Modified"]
        assert c.delete(f"/api/contacts/{cid}").status_code == 204  # idempotent, no new write
        assert c.get(f"/api/contacts/{cid}").json() == deleted
        assert c.patch(f"/api/contacts/{cid}", json={"Title": "x"}).status_code == 404

        assert [r["Id"] for r in _all(c, "contacts")] == []
        assert [r["Id"] for r in _all(c, "contacts", includeDeleted="true")] == [cid]
        for path in ("/api/contacts/C-999999", "/api/products/nope"):
            missing = c.get(path)
            assert missing.status_code == 404 and missing.json()["error"] == "not_found"
        assert c.patch("/api/products/P-999999", json={"Name": "x"}).status_code == 404
        assert c.delete("/api/products/P-999999").status_code == 404


def test_if_match(custom_crm_service: EmbeddedService) -> None:
    with custom_crm_service.client() as c:
        cid = _contact(c)["Id"]
        stale = c.patch(f"/api/contacts/{cid}", json={"Title": "A"}, headers={"If-Match": '"7"'})
        assert stale.status_code == 412 and stale.json()["error"] == "precondition_failed"
        assert c.get(f"/api/contacts/{cid}").json()["Version"] == 1  # nothing written
        ok = c.patch(f"/api/contacts/{cid}", json={"Title": "A"}, headers={"If-Match": '"1"'})
        assert ok.status_code == 200 and ok.headers["ETag"] == '"2"'
        for header in ('W/"2"', "3", "*"):  # each write bumps the Version
            response = c.patch(f"/api/contacts/{cid}", json={}, headers={"If-Match": header})
            assert response.status_code == 200, header
        assert (
            c.patch(f"/api/contacts/{cid}", json={}, headers={"If-Match": "junk"}).status_code
            == 412
        )
        assert c.delete(f"/api/contacts/{cid}", headers={"If-Match": '"1"'}).status_code == 412
        assert c.delete(f"/api/contacts/{cid}", headers={"If-Match": '"5"'}).status_code == 204


# -- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/contacts", {"Email": "not-an-email"}, "Email"),
        ("/api/contacts", {"Email": "a@b@c.com"}, "Email"),
        ("/api/contacts", {"FirstName": "x" * 256}, "FirstName"),
        ("/api/contacts", {"FirstName": 42}, "FirstName"),
        ("/api/contacts", {"Title": ["CEO"]}, "Title"),
        ("/api/contacts", {"Shoe": 42}, "Shoe"),
        ("/api/contacts", {"ProductId": "P-424242"}, "ProductId"),
        ("/api/products", {}, "Name"),
        ("/api/products", {"Name": "   "}, "Name"),
        ("/api/products", {"Name": None}, "Name"),
        ("/api/products", {"Name": "x", "ProductNumber": "123"}, "ProductNumber"),
        ("/api/products", {"Name": "x", "ProductNumber": 1.5}, "ProductNumber"),
        ("/api/products", {"Name": "x", "ProductNumber": True}, "ProductNumber"),
        ("/api/products", {"Name": "x", "Active": "yes"}, "Active"),
        ("/api/products", {"Name": "x", "Active": 1}, "Active"),
        ("/api/products", {"Name": "x", "Description": "d" * 4001}, "Description"),
        ("/api/products", {"Name": "x", "Url": "u" * 256}, "Url"),
        ("/api/products", [{"Name": "x"}], "body"),
        ("/api/products", "Name", "body"),
    ],
)
def test_invalid_bodies_are_422_naming_the_field(
    custom_crm_service: EmbeddedService, path: str, body: Any, field: str
) -> None:
    with custom_crm_service.client() as c:
        assert field in _errors(c.post(path, json=body))
        assert _all(c, path.removeprefix("/api/")) == []  # nothing was created


def test_malformed_json_bad_query_and_patch_validation(custom_crm_service: EmbeddedService) -> None:
    with custom_crm_service.client() as c:
        for raw in (b"{bad", b"", b'{"Name": "x",}', b"\xff\xfe"):
            response = c.post(
                "/api/products", content=raw, headers={"Content-Type": "application/json"}
            )
            assert "body" in _errors(response), raw
        assert "body" in _errors(c.post("/api/products", content=b"Name=x"))
        for params, field in [
            ({"limit": 0}, "limit"),
            ({"limit": 501}, "limit"),
            ({"limit": "ten"}, "limit"),
            ({"modifiedSince": "yesterday"}, "modifiedSince"),
            ({"modifiedSince": "2024-13-01T00:00:00Z"}, "modifiedSince"),
            ({"cursor": "not-a-cursor"}, "cursor"),
            ({"cursor": base64.urlsafe_b64encode(b'{"a": 1}').decode()}, "cursor"),
            ({"includeDeleted": "maybe"}, "includeDeleted"),
        ]:
            assert field in _errors(c.get("/api/contacts", params=params)), params
        pid = c.post("/api/products", json={"Name": "Keep"}).json()["Id"]
        assert "Name" in _errors(c.patch(f"/api/products/{pid}", json={"Name": None}))
        assert "Name" in _errors(c.patch(f"/api/products/{pid}", json={"Name": ""}))
        assert "Email" in _errors(
            c.patch(f"/api/contacts/{_contact(c)['Id']}", json={"Email": "x"})
        )
        assert c.get(f"/api/products/{pid}").json()["Version"] == 1
        # the limits are inclusive, unicode and markup are just text, empty e-mail is none
        ok = c.post(
            "/api/products",
            json={"Name": "ø" * 255, "Description": "<b>" + "d" * 3997, "Street": "Å\u0000"},
        )
        assert ok.status_code == 201, ok.text
        assert ok.json()["Name"] == "ø" * 255
        assert _contact(c, Email="", Phone="+47 22 33 44 55")["Email"] == ""
        assert _contact(c, Email=" spaced@example.com ")["Email"] == " spaced@example.com "


# -- listing ----------------------------------------------------------------------------------


def test_cursor_paging_sees_every_record_once_even_while_records_change(
    custom_crm_service: EmbeddedService,
) -> None:
    with custom_crm_service.client() as c:
        ids = [_contact(c, FirstName=f"P{i}")["Id"] for i in range(60)]
        seen: list[str] = []
        cursor = None
        modified_during = ids[40]
        page_no = 0
        while True:
            params: dict[str, Any] = {"limit": 7}
            if cursor:
                params["cursor"] = cursor
            body = c.get("/api/contacts", params=params).json()
            assert len(body["items"]) <= 7
            seen += [r["Id"] for r in body["items"]]
            keys = [(r["Modified"], r["Id"]) for r in body["items"]]
            assert keys == sorted(keys)
            page_no += 1
            if page_no == 2:  # a record not yet paged changes: it moves to the end
                c.patch(f"/api/contacts/{modified_during}", json={"Title": "moved"})
                c.patch(f"/api/contacts/{ids[0]}", json={"Title": "seen already"})
            cursor = body["nextCursor"]
            if cursor is None:
                break
        assert set(seen) == set(ids)
        assert seen.count(modified_during) == 1 and seen[-1] == ids[0]  # re-seen at the end
        assert seen.count(ids[0]) == 2
        full = c.get("/api/contacts", params={"limit": 60}).json()
        assert len(full["items"]) == 60 and full["nextCursor"] is None
        assert len(c.get("/api/contacts").json()["items"]) == 60  # default limit 100


def test_modified_since_is_inclusive_and_timestamps_strictly_increase(
    custom_crm_service: EmbeddedService,
) -> None:
    with custom_crm_service.client() as c:
        first = _contact(c)
        second = _contact(c)
        assert second["Modified"] > first["Modified"]
        at = first["Modified"]
        listed = c.get("/api/contacts", params={"modifiedSince": at}).json()["items"]
        assert [r["Id"] for r in listed] == [first["Id"], second["Id"]]
        after = datetime.fromisoformat(at.replace("Z", "+00:00")) + timedelta(microseconds=1)
        listed = c.get("/api/contacts", params={"modifiedSince": after.isoformat()}).json()
        assert [r["Id"] for r in listed["items"]] == [second["Id"]]
        oslo = datetime.fromisoformat(at.replace("Z", "+00:00")).astimezone(
            timezone(timedelta(hours=2))
        )
        assert oslo.isoformat().endswith("+02:00")
        same = c.get("/api/contacts", params={"modifiedSince": oslo.isoformat()}).json()
        assert len(same["items"]) == 2


def test_concurrent_writes_get_distinct_increasing_timestamps(
    custom_crm_service: EmbeddedService,
) -> None:
    with custom_crm_service.client() as c:
        ids = [_contact(c)["Id"] for _ in range(8)]

        def work(i: int) -> list[str]:
            stamps = []
            with custom_crm_service.client() as own:
                for n in range(5):
                    r = own.patch(f"/api/contacts/{ids[i % 8]}", json={"Title": f"t{n}"})
                    assert r.status_code == 200, r.text
                    stamps.append(r.json()["Modified"])
            return stamps

        with ThreadPoolExecutor(16) as pool:
            stamps = [s for batch in pool.map(work, range(16)) for s in batch]
        assert len(set(stamps)) == len(stamps) == 80
        records = _all(c, "contacts")
        assert sum(r["Version"] - 1 for r in records) == 80


# -- idempotency, persistence -----------------------------------------------------------------


def test_idempotency_key_survives_restart(embedded_service_factory: Factory) -> None:
    service = embedded_service_factory("custom-crm")
    with service.client() as c:
        body = {"FirstName": "Once", "Email": "once@example.com"}
        first = c.post("/api/contacts", json=body, headers={"Idempotency-Key": "k-1"})
        again = c.post("/api/contacts", json=body, headers={"Idempotency-Key": "k-1"})
        assert first.status_code == 201 and again.status_code in (200, 201)
        assert again.json()["Id"] == first.json()["Id"]
        other = c.post("/api/contacts", json=body, headers={"Idempotency-Key": "k-2"})
        assert other.json()["Id"] != first.json()["Id"]
        # keys are per object type
        product = c.post("/api/products", json={"Name": "X"}, headers={"Idempotency-Key": "k-1"})
        assert product.status_code == 201 and product.json()["Id"].startswith("P-")
        assert "idempotency-key" in _errors(
            c.post("/api/contacts", json=body, headers={"Idempotency-Key": "k" * 300})
        )
    service.restart(hard=True)  # kill -9: committed writes and keys survive
    with service.client() as c:
        replay = c.post(
            "/api/contacts", json={"FirstName": "Once"}, headers={"Idempotency-Key": "k-1"}
        )
        assert replay.json()["Id"] == first.json()["Id"]
        assert len(_all(c, "contacts")) == 2
        got = c.get(f"/api/contacts/{first.json()['Id']}").json()
        assert got == first.json()
        newer = _contact(c)
        assert newer["Modified"] > other.json()["Modified"]
        assert newer["Id"] not in {first.json()["Id"], other.json()["Id"]}


# -- rate limit and faults ----------------------------------------------------------------------


def test_rate_limit_answers_429_with_retry_after(embedded_service_factory: Factory) -> None:
    service = embedded_service_factory("custom-crm", rate_limit=5)
    with service.client() as c:
        statuses = [c.get("/api/contacts", params={"limit": 1}) for _ in range(20)]
    limited = [r for r in statuses if r.status_code == 429]
    assert limited and sum(r.status_code == 200 for r in statuses) >= 5
    for response in limited:
        assert int(response.headers["Retry-After"]) >= 1
    assert httpx.get(f"{service.base_url}/openapi.json").status_code == 200
    time.sleep(1.1)
    with service.client() as c:
        assert c.get("/api/contacts").status_code == 200


def test_admin_endpoints_are_404_without_faults(embedded_service_factory: Factory) -> None:
    service = embedded_service_factory("custom-crm")
    with service.client() as c:
        assert c.post("/_admin/faults", json={"error_rate": 1}).status_code == 404
        assert c.post("/_admin/reset").status_code == 404
        assert c.get("/api/contacts").status_code == 200
    assert httpx.post(f"{service.base_url}/_admin/reset").status_code == 401


def test_faults_errors_latency_drops_and_reset(custom_crm_service: EmbeddedService) -> None:
    service = custom_crm_service
    assert httpx.post(f"{service.base_url}/_admin/faults", json={}).status_code == 401
    with service.client() as c:
        assert "error_rate" in _errors(c.post("/_admin/faults", json={"error_rate": 2}))
        assert "nope" in _errors(c.post("/_admin/faults", json={"nope": 1}))
        keep = _contact(c)

        service.set_faults(error_rate=1.0)
        for _ in range(5):
            assert c.post("/api/contacts", json={"FirstName": "x"}).status_code in (500, 503)
        assert c.get("/openapi.json").status_code == 200
        service.set_faults(latency_ms=300)
        start = time.monotonic()
        assert c.get("/api/contacts").status_code == 200
        assert time.monotonic() - start >= 0.3
        service.set_faults(drop_rate=1.0)
        with pytest.raises(httpx.TransportError):
            c.patch(f"/api/contacts/{keep['Id']}", json={"Title": "dropped"})
        service.set_faults(post_write_error_rate=1.0)
        assert c.patch(f"/api/contacts/{keep['Id']}", json={"Phone": "1"}).status_code == 500
        service.set_faults(throttle_rate=1.0)
        throttled = c.get("/api/contacts")
        assert throttled.status_code == 429 and throttled.headers["Retry-After"] == "1"
        assert c.get("/_admin/faults").json()["throttle_rate"] == 1.0
        service.set_faults()  # all off
        after = c.get(f"/api/contacts/{keep['Id']}").json()
        assert after["Title"] == "dropped" and after["Phone"] == "1"  # applied, answer lost
        assert after["Version"] == 3
        assert len(_all(c, "contacts")) == 1  # failed-before-write creates left no trace

        service.set_faults(error_rate=0.5)
        reset = c.post("/_admin/reset", json={"seed": 50})
        assert reset.json()["counts"] == {"contacts": 50, "products": 5}
        assert c.get("/_admin/faults").json()["error_rate"] == 0.0
        c.post("/_admin/reset")
        assert _all(c, "contacts", includeDeleted=True) == []
        fresh = _contact(c)
        assert fresh["Id"] == "C-000001" and fresh["Modified"] > after["Modified"]


# -- persistence and seed -----------------------------------------------------------------------


def test_seeded_service_serves_the_generated_records_and_restart_keeps_them(
    embedded_service_factory: Factory,
) -> None:
    service = embedded_service_factory("custom-crm", seed=1000)
    expected = custom_crm_records(1000)
    with service.client() as c:
        start = time.monotonic()
        page = c.get("/api/contacts", params={"limit": 500})
        assert time.monotonic() - start < 1.0
        assert len(page.json()["items"]) == 500
        contacts = _all(c, "contacts", limit=500)
        products = _all(c, "products", limit=500)
        assert len(contacts) == 1000 and len(products) == 100
        by_id = {r["Id"]: r for r in contacts}
        assert by_id == {r["Id"]: r for r in expected["contacts"]}
        assert {r["Id"]: r for r in products} == {r["Id"]: r for r in expected["products"]}
        assert {r["ProductId"] for r in contacts} - {None} <= {p["Id"] for p in products}
        edited = c.patch("/api/contacts/C-000007", json={"Title": "Edited"}).json()
    service.restart()  # same --seed on existing data: nothing is added
    with service.client() as c:
        assert len(_all(c, "contacts", limit=500)) == 1000
        assert c.get("/api/contacts/C-000007").json() == edited
        assert _contact(c)["Id"] == "C-001001"


def test_seed_is_deterministic_and_the_crms_overlap() -> None:
    n = 2000
    custom = custom_crm_records(n)
    office = crm_office_records(n)
    assert json.dumps(custom) == json.dumps(custom_crm_records(n))
    assert json.dumps(custom) != json.dumps(custom_crm_records(n + 1))
    assert len(custom["contacts"]) == len(office["contacts"]) == n
    assert len(custom["products"]) == len(office["companies"]) == n // 10

    def norm(email: str | None) -> str:
        return (email or "").strip().lower()

    custom_emails = [norm(r["Email"]) for r in custom["contacts"]]
    assert len(set(custom_emails)) == n  # unique on the Custom CRM side
    office_by_email: dict[str, list[dict[str, Any]]] = {}
    for record in office["contacts"]:
        office_by_email.setdefault(norm(record["email"]), []).append(record)
    matched = [e for e in custom_emails if e in office_by_email]
    assert 0.55 * n <= len(matched) <= 0.65 * n
    ambiguous = [e for e in matched if len(office_by_email[e]) > 1]
    assert 1 <= len(ambiguous) <= 0.02 * n
    raw_office = {r["email"] for r in office["contacts"]}
    exact = [r["Email"] for r in custom["contacts"] if r["Email"] in raw_office]
    assert len(exact) < len(matched)  # some differ only in case/whitespace
    conflicting = 0
    for record in custom["contacts"]:
        others = office_by_email.get(norm(record["Email"]), [])
        if len(others) == 1 and (
            others[0]["title"] != record["Title"] or others[0]["directPhone"] != record["Phone"]
        ):
            conflicting += 1
    assert conflicting >= 10

    names = [r["Name"].strip() for r in custom["products"]]
    company_names = [r["name"].strip() for r in office["companies"]]
    shared = [name for name in names if name in company_names]
    assert 0.55 * len(names) <= len(shared) <= 0.65 * len(names)
    assert any(company_names.count(name) > 1 for name in shared)  # ambiguous companies
    assert all(r["orgNr"] is None or len(r["orgNr"]) == 9 for r in office["companies"])
    company_ids = {r["id"] for r in office["companies"]}
    refs = [r["company"]["id"] for r in office["contacts"] if r["company"]]
    assert refs and set(refs) <= company_ids
    assert any(r["Phone"] is None for r in custom["contacts"])  # a few empty fields


def test_seed_of_100k_contacts_is_fast() -> None:
    start = time.monotonic()
    records = custom_crm_records(100_000)
    assert len(records["contacts"]) == 100_000
    assert time.monotonic() - start < 5


def test_concurrent_idempotent_creates_make_one_record(custom_crm_service: EmbeddedService) -> None:
    barrier = threading.Barrier(8)

    def create(_: int) -> str:
        with custom_crm_service.client() as c:
            barrier.wait()
            r = c.post(
                "/api/contacts", json={"FirstName": "Race"}, headers={"Idempotency-Key": "same"}
            )
            assert r.status_code in (200, 201)
            return str(r.json()["Id"])

    with ThreadPoolExecutor(8) as pool:
        ids = set(pool.map(create, range(8)))
    assert len(ids) == 1
    with custom_crm_service.client() as c:
        assert len(_all(c, "contacts")) == 1


# -- robustness: malformed input never gets a 5xx ---------------------------------------------

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=300),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
CONTACT_KEYS = st.sampled_from(["FirstName", "Email", "ProductId", "Title", "Id", "Version", "X"])
PRODUCT_KEYS = st.sampled_from(["Name", "ProductNumber", "Active", "Description", "Url", "Zz"])


def test_edge_inputs_are_4xx(custom_crm_service: EmbeddedService) -> None:
    with custom_crm_service.client() as c:
        deep = c.post(
            "/api/contacts", content=b"[" * 100_000, headers={"Content-Type": "application/json"}
        )
        assert "body" in _errors(deep)
        surrogate = c.post(
            "/api/contacts",
            content=b'{"FirstName": "\\ud800"}',
            headers={"Content-Type": "application/json"},
        )
        assert "FirstName" in _errors(surrogate)
        for since in ("0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "\x00"):
            assert "modifiedSince" in _errors(
                c.get("/api/contacts", params={"modifiedSince": since})
            )
        for since in ("2024-01-01", "2024-01-01T00:00", "2024-01-01T00:00:00.5+01:00"):
            assert c.get("/api/contacts", params={"modifiedSince": since}).status_code == 200
        big = c.post("/api/products", json={"Name": "x", "ProductNumber": 10**30})
        assert "ProductNumber" in _errors(big)
        assert c.get("/api/contacts/" + "x" * 3000).status_code == 404


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    contact=st.dictionaries(CONTACT_KEYS, JSON_VALUES, max_size=4),
    product=st.dictionaries(PRODUCT_KEYS, JSON_VALUES, max_size=4),
    junk=st.binary(max_size=40),
)
def test_random_bodies_never_get_a_5xx(
    _custom_crm_process: EmbeddedService,
    contact: dict[str, Any],
    product: dict[str, Any],
    junk: bytes,
) -> None:
    with _custom_crm_process.client() as c:
        for path, body in (("/api/contacts", contact), ("/api/products", product)):
            response = c.post(path, json=body)
            assert response.status_code in (201, 422), response.text
            if response.status_code == 422:
                assert all(e["field"] for e in response.json()["errors"])
        raw = c.post("/api/products", content=junk, headers={"Content-Type": "application/json"})
        assert raw.status_code in (201, 422)
        patch = c.patch("/api/contacts/C-000001", json=contact)
        assert patch.status_code in (200, 404, 422)
