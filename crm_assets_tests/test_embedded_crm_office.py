"""The embedded CRMOffice keeps the HTTP contract of DESIGN.md section 4 (real HTTP)."""
# ruff: noqa: F811  (the fixtures imported below are parameters of the tests)

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from embedded_fixtures import (  # noqa: F401  (pytest fixtures)
    EmbeddedService,
    _crm_office_process,
    crm_office_service,
    embedded_service_factory,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crm_assets.crm_office.seed import demo_records as crm_office_records

Factory = Callable[..., EmbeddedService]

COMPANY = {
    "name": "Fjord Analytics AS",
    "orgNr": "987654321",
    "website": "https://fjord.example",
    "description": "A company",
    "isActive": True,
    "postAddress": {"streetAddress": "Postboks 1", "postCode": "0101", "postalArea": "Oslo"},
    "visitAddress": {
        "streetAddress": "Storgata 1",
        "postCode": "0155",
        "postalArea": "Oslo",
        "country": "Norway",
    },
}


def _token_form(service: EmbeddedService, **overrides: str) -> dict[str, str]:
    form = {
        "grant_type": "client_credentials",
        "client_id": service.credentials["client_id"],
        "client_secret": service.credentials["client_secret"],
        "scope": "crmoffice",
    }
    form.update(overrides)
    return {k: v for k, v in form.items() if v is not None}


def _errors(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 422, response.text
    body = response.json()
    assert set(body) == {"errors"}
    for error in body["errors"]:
        assert set(error) == {"field", "message"} and error["message"]
    return {e["field"]: e["message"] for e in body["errors"]}


def _company(c: httpx.Client, **fields: Any) -> dict[str, Any]:
    response = c.post("/companies", json={**COMPANY, **fields})
    assert response.status_code == 201, response.text
    return response.json()


def _contact(c: httpx.Client, **fields: Any) -> dict[str, Any]:
    response = c.post("/contacts", json={"givenName": "Ada", "familyName": "Lovelace", **fields})
    assert response.status_code == 201, response.text
    return response.json()


def _all(c: httpx.Client, obj: str, take: int = 1000, **params: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    while True:
        body = c.get(f"/{obj}", params={**params, "skip": len(items), "take": take}).json()
        items += body["items"]
        if len(items) >= body["totalCount"] or not body["items"]:
            return items


# -- OAuth2 -------------------------------------------------------------------------------------


def test_token_flow_and_401s(crm_office_service: EmbeddedService) -> None:
    service = crm_office_service
    url = f"{service.base_url}/connect/token"
    spec = httpx.get(f"{service.base_url}/openapi.json").json()
    assert {"/connect/token", "/contacts", "/contacts/{id}", "/companies/batch"} <= set(
        spec["paths"]
    )

    for bad in (
        _token_form(service, client_secret="wrong"),
        _token_form(service, client_id="someone-else"),
        _token_form(service, client_secret=""),
    ):
        refused = httpx.post(url, data=bad)
        assert refused.status_code == 401 and refused.json()["error"] == "invalid_client"
        assert service.credentials["client_secret"] not in refused.text
    assert httpx.post(url, data=_token_form(service, grant_type="password")).status_code == 400
    assert httpx.post(url, data=_token_form(service, scope="admin")).status_code == 400
    assert httpx.post(url, content=b"\xff\x00garbage").status_code in (400, 401)
    granted = httpx.post(url, data=_token_form(service))
    assert granted.status_code == 200
    body = granted.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 3600
    assert isinstance(body["access_token"], str) and len(body["access_token"]) >= 32
    basic = base64.b64encode(
        f"{service.credentials['client_id']}:{service.credentials['client_secret']}".encode()
    ).decode()
    via_basic = httpx.post(
        url, data={"grant_type": "client_credentials"}, headers={"Authorization": f"Basic {basic}"}
    )
    assert via_basic.status_code == 200

    ok = httpx.get(
        f"{service.base_url}/contacts", headers={"Authorization": f"Bearer {body['access_token']}"}
    )
    assert ok.status_code == 200 and ok.json() == {"items": [], "totalCount": 0}
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": body["access_token"]}):
        for method, path in [
            ("GET", "/contacts"),
            ("POST", "/companies"),
            ("POST", "/companies/batch"),
            ("PUT", "/contacts/1"),
            ("DELETE", "/contacts/1"),
            ("POST", "/_admin/faults"),
        ]:
            response = httpx.request(method, service.base_url + path, headers=headers, content=b"{")
            assert response.status_code == 401, (method, path)


def test_tokens_expire(embedded_service_factory: Factory) -> None:
    service = embedded_service_factory("crm-office", token_ttl=1)
    granted = httpx.post(f"{service.base_url}/connect/token", data=_token_form(service)).json()
    assert granted["expires_in"] == 1
    headers = {"Authorization": f"Bearer {granted['access_token']}"}
    assert httpx.get(f"{service.base_url}/contacts", headers=headers).status_code == 200
    time.sleep(1.2)
    expired = httpx.get(f"{service.base_url}/contacts", headers=headers)
    assert expired.status_code == 401 and "expired" in expired.json()["message"]
    assert granted["access_token"] not in expired.text
    fresh = httpx.post(f"{service.base_url}/connect/token", data=_token_form(service)).json()
    headers = {"Authorization": f"Bearer {fresh['access_token']}"}
    assert httpx.get(f"{service.base_url}/contacts", headers=headers).status_code == 200


def test_tokens_survive_restart(crm_office_service: EmbeddedService) -> None:
    token = crm_office_service.token(refresh=True)
    crm_office_service.restart()
    headers = {"Authorization": f"Bearer {token}"}
    assert httpx.get(f"{crm_office_service.base_url}/contacts", headers=headers).status_code == 200


# -- records ------------------------------------------------------------------------------------


def test_create_get_put_full_replace_and_hard_delete(crm_office_service: EmbeddedService) -> None:
    with crm_office_service.client() as c:
        company = _company(c, id="ignored", rowVersion=42)
        assert isinstance(company["id"], str) and company["id"].isdigit()
        assert company["rowVersion"] == 1 and company["createdAt"] == company["updatedAt"]
        assert company["postAddress"]["country"] is None
        contact = _contact(c, email="ada@example.com", company={"id": company["id"]})
        assert contact["company"] == {"id": company["id"]}
        assert set(contact) == {
            "id", "givenName", "familyName", "email", "directPhone", "mobilePhone", "title",
            "company", "createdAt", "updatedAt", "rowVersion",
        }  # fmt: skip
        got = c.get(f"/contacts/{contact['id']}")
        assert got.json() == contact and got.headers["ETag"] == '"1"'

        replaced = c.put(
            f"/contacts/{contact['id']}", json={"givenName": "Augusta", "title": "Countess"}
        )
        assert replaced.status_code == 200
        r = replaced.json()
        assert r["givenName"] == "Augusta" and r["title"] == "Countess"
        assert r["familyName"] is None and r["email"] is None and r["company"] is None
        assert r["rowVersion"] == 2 and r["updatedAt"] > contact["updatedAt"]
        assert r["createdAt"] == contact["createdAt"]

        stale = c.put(
            f"/contacts/{contact['id']}", json={"givenName": "X"}, headers={"If-Match": '"1"'}
        )
        assert stale.status_code == 412
        fresh = c.put(
            f"/contacts/{contact['id']}",
            json={"givenName": "X", "company": {"id": company["id"]}},
            headers={"If-Match": '"2"'},
        )
        assert fresh.status_code == 200 and fresh.json()["rowVersion"] == 3
        assert c.put("/contacts/999", json={}).status_code == 404
        assert c.get("/companies/999").status_code == 404

        # deleting the company detaches its contacts (a change they report)
        assert (
            c.delete(f"/companies/{company['id']}", headers={"If-Match": '"9"'}).status_code == 412
        )
        assert c.delete(f"/companies/{company['id']}").status_code == 204
        assert c.get(f"/companies/{company['id']}").status_code == 404
        assert c.delete(f"/companies/{company['id']}").status_code == 404
        detached = c.get(f"/contacts/{contact['id']}").json()
        assert detached["company"] is None and detached["rowVersion"] == 4
        assert c.delete(f"/contacts/{contact['id']}").status_code == 204
        assert c.get("/contacts").json() == {"items": [], "totalCount": 0}
        again = _company(c)
        assert int(again["id"]) > int(company["id"])  # ids are never reused


@pytest.mark.parametrize(
    ("obj", "body", "field"),
    [
        ("contacts", {"email": "nope"}, "email"),
        ("contacts", {"givenName": "x" * 256}, "givenName"),
        ("contacts", {"givenName": 7}, "givenName"),
        ("contacts", {"company": {"id": "424242"}}, "company.id"),
        ("contacts", {"company": {"id": 1001}}, "company.id"),
        ("contacts", {"company": "1001"}, "company"),
        ("contacts", {"company": {"id": "1", "name": "x"}}, "company.name"),
        ("contacts", {"phone": "1"}, "phone"),
        ("companies", {}, "name"),
        ("companies", {"name": ""}, "name"),
        ("companies", {"name": "x", "orgNr": "12345678"}, "orgNr"),
        ("companies", {"name": "x", "orgNr": "12345678a"}, "orgNr"),
        ("companies", {"name": "x", "orgNr": "١٢٣٤٥٦٧٨٩"}, "orgNr"),
        ("companies", {"name": "x", "orgNr": 123456789}, "orgNr"),
        ("companies", {"name": "x", "isActive": "true"}, "isActive"),
        ("companies", {"name": "x", "description": "d" * 4001}, "description"),
        ("companies", {"name": "x", "visitAddress": {"street": "x"}}, "visitAddress.street"),
        ("companies", {"name": "x", "visitAddress": {"postCode": 1234}}, "visitAddress.postCode"),
        ("companies", {"name": "x", "postAddress": "Oslo"}, "postAddress"),
    ],
)
def test_invalid_bodies_are_422_naming_the_field(
    crm_office_service: EmbeddedService, obj: str, body: dict[str, Any], field: str
) -> None:
    with crm_office_service.client() as c:
        assert field in _errors(c.post(f"/{obj}", json=body))
        assert c.get(f"/{obj}").json()["totalCount"] == 0


def test_malformed_json_and_bad_query(crm_office_service: EmbeddedService) -> None:
    with crm_office_service.client() as c:
        for raw in (b"{", b"[1,", b'{"name": "x"} trailing'):
            response = c.post(
                "/companies", content=raw, headers={"Content-Type": "application/json"}
            )
            assert "body" in _errors(response)
        company = _company(c)
        put = c.put(
            f"/companies/{company['id']}",
            content=b"{",
            headers={"Content-Type": "application/json"},
        )
        assert "body" in _errors(put)
        assert "name" in _errors(c.put(f"/companies/{company['id']}", json={"orgNr": None}))
        for params, field in [
            ({"take": 0}, "take"),
            ({"take": 1001}, "take"),
            ({"skip": -1}, "skip"),
            ({"skip": "x"}, "skip"),
            ({"updatedSince": "soon"}, "updatedSince"),
        ]:
            assert field in _errors(c.get("/companies", params=params)), params
        ok = _company(c, name="Ærlig & <Sønn>", orgNr=None, postAddress=None, visitAddress=None)
        assert ok["name"] == "Ærlig & <Sønn>" and ok["visitAddress"] is None


# -- listing ------------------------------------------------------------------------------------


def test_offset_paging_updated_since_inclusive(crm_office_service: EmbeddedService) -> None:
    with crm_office_service.client() as c:
        created = [_company(c, name=f"C{i}") for i in range(25)]
        seen: list[str] = []
        skip = 0
        while True:
            body = c.get("/companies", params={"skip": skip, "take": 10}).json()
            assert body["totalCount"] == 25
            seen += [r["id"] for r in body["items"]]
            keys = [(r["updatedAt"], r["id"]) for r in body["items"]]
            assert keys == sorted(keys)
            skip += 10
            if skip >= body["totalCount"]:
                break
        assert seen == [r["id"] for r in created]
        at = created[10]["updatedAt"]
        since = c.get("/companies", params={"updatedSince": at, "take": 1000}).json()
        assert since["totalCount"] == 15 and since["items"][0]["id"] == created[10]["id"]
        assert c.get("/companies").json()["totalCount"] == 25
        assert len(c.get("/companies").json()["items"]) == 25  # default take 100
        later = c.put(f"/companies/{created[0]['id']}", json={"name": "moved"}).json()
        tail = c.get("/companies", params={"updatedSince": later["updatedAt"]}).json()
        assert [r["id"] for r in tail["items"]] == [created[0]["id"]]


# -- batch --------------------------------------------------------------------------------------


def test_batch_partial_failures(crm_office_service: EmbeddedService) -> None:
    with crm_office_service.client() as c:
        company = _company(c)
        target = _contact(c, email="t@example.com")
        other = _contact(c)
        body = {
            "create": [
                {"givenName": "A", "email": "a@example.com", "company": {"id": company["id"]}},
                {"givenName": "B", "email": "broken"},
                {"givenName": "C", "company": {"id": "404404"}},
                "not an object",
            ],
            "update": [
                {**target, "title": "Updated", "rowVersion": 1},
                {**other, "title": "Stale", "rowVersion": 7},
                {"id": "999999", "givenName": "Ghost"},
                {"givenName": "No id"},
                {"id": other["id"], "email": "x"},
                {"id": other["id"], "title": "Quoted", "rowVersion": '"1"'},
            ],
        }
        response = c.post("/contacts/batch", json=body)
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert [r["index"] for r in results] == list(range(10))
        assert [r["status"] for r in results] == [201, 422, 422, 422, 200, 412, 404, 422, 422, 200]
        assert results[0]["item"]["company"] == {"id": company["id"]}
        assert "email" in {e["field"] for e in results[1]["error"]["errors"]}
        assert "company.id" in {e["field"] for e in results[2]["error"]["errors"]}
        assert "id" in {e["field"] for e in results[7]["error"]["errors"]}
        assert results[4]["item"]["title"] == "Updated" and results[4]["item"]["rowVersion"] == 2
        assert results[4]["item"]["email"] == "t@example.com"  # full record sent back as is
        assert results[9]["item"]["title"] == "Quoted"
        for r in results:
            assert ("item" in r) != ("error" in r)
        assert c.get("/contacts").json()["totalCount"] == 3

        companies = c.post(
            "/companies/batch", json={"create": [{"name": f"B{i}"} for i in range(100)]}
        )
        assert [r["status"] for r in companies.json()["results"]] == [201] * 100
        too_many = c.post(
            "/companies/batch",
            json={"create": [{"name": "x"}] * 60, "update": [{"id": "1", "name": "y"}] * 41},
        )
        assert "body" in _errors(too_many)
        assert c.get("/companies").json()["totalCount"] == 101
        assert "create" in _errors(c.post("/companies/batch", json={"create": {"name": "x"}}))
        assert "delete" in _errors(c.post("/companies/batch", json={"delete": []}))
        assert c.post("/companies/batch", json={}).json() == {"results": []}


def test_batch_item_faults(crm_office_service: EmbeddedService) -> None:
    service = crm_office_service
    service.set_faults(batch_item_error_rate=0.5)
    with service.client() as c:
        results = c.post(
            "/companies/batch", json={"create": [{"name": f"N{i}"} for i in range(60)]}
        ).json()["results"]
        failed = [r for r in results if r["status"] == 500]
        assert 5 <= len(failed) <= 55
        assert all(r["status"] in (201, 500) for r in results)
        assert c.get("/companies").json()["totalCount"] == 60 - len(failed)


# -- faults, rate limit, persistence, seed ------------------------------------------------------


def test_faults_and_reset(crm_office_service: EmbeddedService) -> None:
    service = crm_office_service
    with service.client() as c:
        company = _company(c)
        service.set_faults(error_rate=1.0)
        assert c.get("/companies").status_code in (500, 503)
        service.set_faults(drop_rate=1.0)
        with pytest.raises(httpx.TransportError):
            c.put(f"/companies/{company['id']}", json={"name": "dropped"})
        service.set_faults(latency_ms=250)
        start = time.monotonic()
        assert c.get(f"/companies/{company['id']}").json()["name"] == "dropped"
        assert time.monotonic() - start >= 0.25
        reset = c.post("/_admin/reset", json={"seed": 30})
        assert reset.json()["counts"] == {"contacts": 30, "companies": 3}
        assert c.get("/_admin/faults").json()["latency_ms"] == 0
        assert c.get("/contacts").json()["totalCount"] == 30


def test_rate_limit_and_no_admin_without_faults(embedded_service_factory: Factory) -> None:
    service = embedded_service_factory("crm-office", rate_limit=4)
    with service.client() as c:
        responses = [c.get("/companies") for _ in range(15)]
        limited = [r for r in responses if r.status_code == 429]
        assert limited and all(int(r.headers["Retry-After"]) >= 1 for r in limited)
        time.sleep(1.1)
        assert c.post("/_admin/faults", json={"error_rate": 1}).status_code == 404
        assert c.post("/_admin/reset").status_code == 404


def test_seeded_service_restart_keeps_data(embedded_service_factory: Factory) -> None:
    service = embedded_service_factory("crm-office", seed=1000)
    expected = crm_office_records(1000)
    with service.client() as c:
        contacts = _all(c, "contacts")
        companies = _all(c, "companies")
        assert {r["id"]: r for r in contacts} == {r["id"]: r for r in expected["contacts"]}
        assert {r["id"]: r for r in companies} == {r["id"]: r for r in expected["companies"]}
        start = time.monotonic()
        page = c.get("/contacts", params={"take": 1000, "skip": 0})
        assert len(page.json()["items"]) == 1000 and time.monotonic() - start < 1.0
        edited = c.put("/companies/1001", json={"name": "Edited"}).json()
        created = _contact(c, company={"id": "1001"})
    service.restart(hard=True)
    with service.client() as c:
        assert c.get("/contacts").json()["totalCount"] == 1001
        assert c.get("/companies/1001").json() == edited
        assert c.get(f"/contacts/{created['id']}").json() == created
        newer = _company(c)
        assert newer["id"] == str(1001 + 100) and newer["updatedAt"] > created["updatedAt"]


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
COMPANY_KEYS = st.sampled_from(
    ["name", "orgNr", "isActive", "description", "visitAddress", "postAddress", "id", "zz"]
)
CONTACT_KEYS = st.sampled_from(["givenName", "email", "company", "title", "rowVersion", "id"])


def test_edge_inputs_are_4xx(crm_office_service: EmbeddedService) -> None:
    with crm_office_service.client() as c:
        assert "skip" in _errors(c.get("/companies", params={"skip": 10**20}))
        assert c.get("/companies", params={"skip": 2**62}).json()["items"] == []
        deep = c.post(
            "/companies/batch", content=b"[" * 100_000, headers={"Content-Type": "application/json"}
        )
        assert "body" in _errors(deep)
    url = f"{crm_office_service.base_url}/connect/token"
    for headers in ({"Authorization": "Basic !!!"}, {"Authorization": b"Basic \xff"}):
        response = httpx.post(url, data={"grant_type": "client_credentials"}, headers=headers)
        assert response.status_code == 401
    assert (
        httpx.post(url, content=b"grant_type=client_credentials&client_id=\xff").status_code == 401
    )


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    company=st.dictionaries(COMPANY_KEYS, JSON_VALUES, max_size=4),
    contact=st.dictionaries(CONTACT_KEYS, JSON_VALUES, max_size=4),
    update=st.lists(st.dictionaries(CONTACT_KEYS, JSON_VALUES, max_size=4), max_size=3),
)
def test_random_bodies_never_get_a_5xx(
    _crm_office_process: EmbeddedService,
    company: dict[str, Any],
    contact: dict[str, Any],
    update: list[dict[str, Any]],
) -> None:
    with _crm_office_process.client() as c:
        assert c.post("/companies", json=company).status_code in (201, 422)
        assert c.post("/contacts", json=contact).status_code in (201, 422)
        assert c.put("/companies/1001", json=company).status_code in (200, 404, 422)
        batch = c.post("/contacts/batch", json={"create": [contact], "update": update})
        assert batch.status_code == 200, batch.text
        assert {r["status"] for r in batch.json()["results"]} <= {200, 201, 404, 412, 422}
