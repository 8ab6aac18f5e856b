# ruff: noqa: F811  (the fixtures imported below are parameters of the tests)
"""The CRM clients against the embedded services over real HTTP: paging, retries, errors.

Every test talks to a running embedded CRM (see embedded_fixtures); nothing is mocked.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import pytest
from embedded_fixtures import (  # noqa: F401  (pytest fixtures)
    EmbeddedService,
    _crm_office_process,
    _custom_crm_process,
    crm_office_service,
    custom_crm_service,
    embedded_service_factory,
    free_port,
    truncated_json_server,
)

from crm_assets.crm_office.client import CrmOfficeClient
from crm_assets.crm_office.seed import demo_records as crm_office_records
from crm_assets.custom_crm.client import CustomCrmClient
from crm_assets.custom_crm.seed import demo_records as custom_crm_records
from crm_assets.http import (
    CrmAuthError,
    CrmConflict,
    CrmProtocolError,
    CrmUnavailable,
    CrmValidationError,
    RetryPolicy,
)

Factory = Callable[..., EmbeddedService]

#: Retries quickly and often: for calls under random injected faults that must get through.
PATIENT = RetryPolicy(attempts=25, initial=0.01, maximum=0.05, deadline=20)
#: Gives up quickly: for calls that are meant to fail.
IMPATIENT = RetryPolicy(attempts=2, initial=0.01, maximum=0.05, deadline=2)


def custom_client(service: EmbeddedService, **kwargs: Any) -> CustomCrmClient:
    return CustomCrmClient(service.base_url, service.credentials["api_key"], **kwargs)


def office_client(service: EmbeddedService, **kwargs: Any) -> CrmOfficeClient:
    creds = service.credentials
    return CrmOfficeClient(service.base_url, creds["client_id"], creds["client_secret"], **kwargs)


def ids_of(pages: Iterator[list[dict[str, Any]]], id_field: str) -> list[str]:
    return [item[id_field] for page in pages for item in page]


def reseed(service: EmbeddedService, n: int) -> dict[str, int]:
    """Wipe and seed ``n`` demo records; the record counts per object."""
    with service.client() as c:
        response = c.post("/_admin/reset", json={"seed": n})
        response.raise_for_status()
        counts: dict[str, int] = response.json()["counts"]
        return counts


def stamp(text: str) -> datetime:
    return datetime.fromisoformat(text)


def log_mark(service: EmbeddedService) -> int:
    """Where the service's log ends now (the module's services are shared by tests)."""
    return len(service.log())


def requests_logged(service: EmbeddedService, needle: str, since: int = 0) -> int:
    """How many log lines written after ``since`` contain ``needle`` (e.g. '" 429')."""
    time.sleep(0.2)  # let the access log catch up
    return sum(1 for line in service.log()[since:].splitlines() if needle in line)


# -- paging ---------------------------------------------------------------------------------


def test_custom_crm_paging_returns_every_record_exactly_once(
    custom_crm_service: EmbeddedService,
) -> None:
    reseed(custom_crm_service, 2000)
    expected = custom_crm_records(2000)
    with custom_client(custom_crm_service) as client:
        deleted = expected["contacts"][5]["Id"]
        client.delete("contacts", deleted)
        for obj, limit in (("contacts", 97), ("products", 7)):
            seen = ids_of(client.pages(obj, size=limit), "Id")
            assert len(seen) == len(set(seen)), "a record was returned twice"
            assert set(seen) == {r["Id"] for r in expected[obj]}
        # deleted records are listed (flagged) by default, and left out when asked
        live = ids_of(client.pages("contacts", include_deleted=False, size=500), "Id")
        assert deleted not in live
        assert len(live) == len(expected["contacts"]) - 1


def test_crm_office_paging_returns_every_record_exactly_once(
    crm_office_service: EmbeddedService,
) -> None:
    reseed(crm_office_service, 2000)
    expected = crm_office_records(2000)
    # the seed gives many records one shared updatedAt: pages end inside that group
    with office_client(crm_office_service) as client:
        for obj, take in (("contacts", 89), ("companies", 7)):
            seen = ids_of(client.pages(obj, size=take), "id")
            assert len(seen) == len(set(seen)), "a record was returned twice"
            assert set(seen) == {r["id"] for r in expected[obj]}


def _server_order(service: EmbeddedService, obj: str) -> list[dict[str, Any]]:
    """All records in the server's (updatedAt, id) order, read independently of the client."""
    out: list[dict[str, Any]] = []
    with service.client() as c:
        while True:
            page = c.get(f"/{obj}", params={"skip": len(out), "take": 1000}).json()["items"]
            out += page
            if len(page) < 1000:
                return out


def test_crm_office_records_updated_while_paging_are_neither_missed_nor_lost(
    crm_office_service: EmbeddedService,
) -> None:
    """Offset paging while records move to the end of the order (every update does) or
    leave it (hard deletes): every record is still read, updated ones with their new value."""
    reseed(crm_office_service, 600)
    order = [r["id"] for r in _server_order(crm_office_service, "contacts")]
    updated: dict[str, str] = {}
    deleted: set[str] = set()

    with office_client(crm_office_service) as client:

        def touch(record_id: str) -> None:
            if record_id in updated:
                return
            record = client.get("contacts", record_id)
            title = f"moved-{len(updated)}"
            client.replace(
                "contacts", record_id, {**record, "title": title}, row_version=record["rowVersion"]
            )
            updated[record_id] = title

        seen: dict[str, list[str | None]] = {}
        for number, page in enumerate(client.pages("contacts", size=20)):
            for item in page:
                seen.setdefault(item["id"], []).append(item["title"])
            if not page:
                continue
            # already paged: the first and the last record of this page (the seed gives
            # the last ~25 records one shared updatedAt, so near the end the last record
            # shares it with records not read yet) ...
            touch(page[0]["id"])
            touch(page[-1]["id"])
            # ... and the next record not read yet, and (early on) one far ahead
            unread = [i for i in order if i not in seen and i not in updated]
            if unread:
                touch(unread[0])
                if number < 10:
                    touch(unread[len(unread) // 2])
            # a hard delete of a record already paged shifts the offsets too
            if len(page) > 2 and page[1]["id"] not in deleted | set(updated):
                client.delete("contacts", page[1]["id"])
                deleted.add(page[1]["id"])

    assert len(updated) > 3 * len(order) // 20 and len(deleted) > 20
    missed = set(order) - set(seen)
    assert not missed, f"{len(missed)} records never paged, e.g. {sorted(missed)[:5]}"
    assert set(seen) == set(order)
    stale = [i for i, title in updated.items() if title not in seen[i]]
    assert not stale, f"updated records never seen with their new value: {stale[:5]}"


def test_since_is_inclusive(
    custom_crm_service: EmbeddedService, crm_office_service: EmbeddedService
) -> None:
    with custom_client(custom_crm_service) as client:
        made = [client.create("contacts", {"FirstName": f"N{i}"}) for i in range(3)]
        since = stamp(made[1]["Modified"])
        assert ids_of(client.pages("contacts", since), "Id") == [made[1]["Id"], made[2]["Id"]]
    with office_client(crm_office_service) as client:
        made = [client.create("contacts", {"givenName": f"N{i}"}) for i in range(3)]
        since = stamp(made[1]["updatedAt"])
        assert ids_of(client.pages("contacts", since), "id") == [made[1]["id"], made[2]["id"]]


# -- retries ----------------------------------------------------------------------------------


def test_rate_limited_calls_wait_what_retry_after_asks(embedded_service_factory: Factory) -> None:
    """At 1 request/s every call after the first is answered 429, Retry-After: 1.

    The policy's own backoff is far shorter (at most 0.05 s): the wait comes from the header.
    """
    service = embedded_service_factory("custom-crm", rate_limit=1)
    policy = RetryPolicy(attempts=4, initial=0.01, maximum=0.05, deadline=10)
    with custom_client(service, retry=policy) as client:
        created = client.create("contacts", {"FirstName": "Ada"})
        started = time.monotonic()
        assert client.get("contacts", created["Id"])["FirstName"] == "Ada"
        assert ids_of(client.pages("contacts"), "Id") == [created["Id"]]
        elapsed = time.monotonic() - started
    assert elapsed >= 2.0, f"two Retry-After: 1 answers, but the calls took {elapsed:.2f}s"
    # honouring Retry-After means never asking again before it is over: one 429 per call
    assert requests_logged(service, '" 429') == 2, service.log()


def test_5xx_throttling_and_dropped_connections_are_retried(
    custom_crm_service: EmbeddedService, crm_office_service: EmbeddedService
) -> None:
    with custom_client(custom_crm_service, retry=PATIENT) as client:
        made = {client.create("contacts", {"FirstName": f"C{i}"})["Id"] for i in range(30)}
        custom_crm_service.set_faults(error_rate=0.3, drop_rate=0.2)
        seen = ids_of(client.pages("contacts", size=3), "Id")
    assert sorted(seen) == sorted(made)

    with office_client(crm_office_service, retry=PATIENT) as client:
        made = {client.create("contacts", {"givenName": f"C{i}"})["id"] for i in range(30)}
        crm_office_service.set_faults(error_rate=0.3, drop_rate=0.2)
        seen = ids_of(client.pages("contacts", size=3), "id")
        record = client.get("contacts", seen[0])
        assert client.replace("contacts", seen[0], {**record, "title": "CTO"})["title"] == "CTO"
    assert sorted(seen) == sorted(made)


def test_injected_throttling_is_ridden_out(crm_office_service: EmbeddedService) -> None:
    """A burst of 429s (Retry-After: 1) on every CRMOffice call, the token one included."""
    with office_client(crm_office_service, retry=PATIENT) as client:
        crm_office_service.set_faults(throttle_rate=1.0)
        mark = log_mark(crm_office_service)
        clear = threading.Timer(1.2, crm_office_service.set_faults)
        clear.start()
        try:
            started = time.monotonic()
            created = client.create("companies", {"name": "Widget"})
            elapsed = time.monotonic() - started
        finally:
            clear.join()
        assert client.get("companies", created["id"])["name"] == "Widget"
    assert 1.2 <= elapsed < 3.5
    # in 1.2 s of 429s a client that waits Retry-After: 1 asks at most twice
    assert requests_logged(crm_office_service, '" 429', mark) <= 2


def test_retry_after_beyond_the_deadline_fails_at_once(custom_crm_service: EmbeddedService) -> None:
    """A wait that would outlast the retry deadline is not started: the 429 is raised."""
    policy = RetryPolicy(attempts=10, initial=0.01, maximum=0.05, deadline=0.5)
    with custom_client(custom_crm_service, retry=policy) as client:
        custom_crm_service.set_faults(throttle_rate=1.0)
        started = time.monotonic()
        with pytest.raises(CrmUnavailable, match="429"):
            next(client.pages("contacts"))
    assert time.monotonic() - started < 0.5


def test_crm_office_token_expiry_is_refreshed(embedded_service_factory: Factory) -> None:
    service = embedded_service_factory("crm-office", token_ttl=1)
    with office_client(service) as client:
        made = client.create("contacts", {"givenName": "Tok"})
        deadline = time.monotonic() + 2.5
        calls = 0
        while time.monotonic() < deadline:
            assert client.get("contacts", made["id"])["givenName"] == "Tok"
            assert ids_of(client.pages("contacts"), "id") == [made["id"]]
            calls += 1
            time.sleep(0.15)
    assert calls >= 6
    # the first token expired while in use: the client fetched new ones and carried on
    assert requests_logged(service, "POST /connect/token") >= 3


# -- errors -----------------------------------------------------------------------------------


def test_bad_credentials_raise_auth_error_without_the_secret(
    custom_crm_service: EmbeddedService, crm_office_service: EmbeddedService
) -> None:
    wrong_key = f"wrong-key-{uuid.uuid4().hex}"
    with CustomCrmClient(custom_crm_service.base_url, wrong_key) as client:
        started = time.monotonic()
        with pytest.raises(CrmAuthError) as caught:
            next(client.pages("contacts"))
    assert time.monotonic() - started < 1.0, "a 401 is not worth retrying"
    message = str(caught.value)
    assert "Custom CRM" in message and "401" in message
    assert wrong_key not in message and wrong_key not in repr(caught.value.args)

    creds = crm_office_service.credentials
    wrong_secret = f"wrong-secret-{uuid.uuid4().hex}"
    client = CrmOfficeClient(crm_office_service.base_url, creds["client_id"], wrong_secret)
    with client, pytest.raises(CrmAuthError) as caught:
        client.get("contacts", "1")
    message = str(caught.value)
    assert "CRMOffice" in message and "CRM_OFFICE_CLIENT_SECRET" in message
    assert wrong_secret not in message and creds["client_secret"] not in message


def test_unreachable_base_url_raises_unavailable_quickly() -> None:
    base_url = f"http://127.0.0.1:{free_port()}"
    for client in (
        CustomCrmClient(base_url, "key", retry=IMPATIENT),
        CrmOfficeClient(base_url, "id", "secret", retry=IMPATIENT),
    ):
        with client:
            started = time.monotonic()
            with pytest.raises(CrmUnavailable) as caught:
                next(client.pages("contacts"))
            assert time.monotonic() - started < 2.5
            assert client.system in str(caught.value)
            assert "secret" not in str(caught.value)


def test_rejected_input_names_the_field(
    custom_crm_service: EmbeddedService, crm_office_service: EmbeddedService
) -> None:
    with custom_client(custom_crm_service) as client:
        with pytest.raises(CrmValidationError) as caught:
            client.create("contacts", {"FirstName": "Ada", "Email": "not an address"})
        assert caught.value.status == 422
        assert [e["field"] for e in caught.value.errors] == ["Email"]
        assert "Email" in str(caught.value)
        assert ids_of(client.pages("contacts"), "Id") == []
    with office_client(crm_office_service) as client:
        with pytest.raises(CrmValidationError) as caught:
            client.create("companies", {"name": "Acme", "orgNr": "12-34"})
        assert [e["field"] for e in caught.value.errors] == ["orgNr"]
        assert "orgNr" in str(caught.value)


def test_stale_version_raises_conflict_and_changes_nothing(
    custom_crm_service: EmbeddedService, crm_office_service: EmbeddedService
) -> None:
    with custom_client(custom_crm_service) as client:
        made = client.create("contacts", {"FirstName": "Ada"})
        client.update("contacts", made["Id"], {"Title": "CEO"}, version=made["Version"])
        with pytest.raises(CrmConflict):
            client.update("contacts", made["Id"], {"Title": "CTO"}, version=made["Version"])
        assert client.get("contacts", made["Id"])["Title"] == "CEO"
    with office_client(crm_office_service) as client:
        made = client.create("companies", {"name": "Acme"})
        client.replace("companies", made["id"], {"name": "Acme AS"}, made["rowVersion"])
        with pytest.raises(CrmConflict):
            client.replace("companies", made["id"], {"name": "Acme Ltd"}, made["rowVersion"])
        assert client.get("companies", made["id"])["name"] == "Acme AS"


def test_malformed_json_page_is_a_protocol_error() -> None:
    """A 200 whose body is cut off is a clear CrmProtocolError, not a crash or a retry loop."""
    requests: list[str] = []
    with truncated_json_server(b'{"items": [{"Id": "1"', requests) as base_url:
        client = CustomCrmClient(base_url, "key", retry=IMPATIENT)
        with client, pytest.raises(CrmProtocolError) as caught:
            next(client.pages("contacts"))
    message = str(caught.value)
    assert "Custom CRM" in message and "GET /api/contacts" in message
    assert "malformed JSON" in message
    assert len(requests) == 1


# -- writes: no duplicates --------------------------------------------------------------------


def _count(pages: Iterator[list[dict[str, Any]]], field: str, value: str) -> int:
    return sum(1 for page in pages for item in page if item.get(field) == value)


def test_custom_crm_create_with_the_same_idempotency_key_creates_once(
    custom_crm_service: EmbeddedService,
) -> None:
    with custom_client(custom_crm_service, retry=PATIENT) as client:
        key = str(uuid.uuid4())
        first = client.create("contacts", {"FirstName": "Once"}, idempotency_key=key)
        again = client.create("contacts", {"FirstName": "Once"}, idempotency_key=key)
        assert again["Id"] == first["Id"]
        # answers lost after the write (500 after commit, dropped connections): the
        # retries carry the same key, so each create still makes exactly one record
        custom_crm_service.set_faults(post_write_error_rate=0.4, drop_rate=0.3)
        for i in range(5):
            client.create("contacts", {"FirstName": f"Lost{i}"}, idempotency_key=f"k-{i}")
        custom_crm_service.set_faults()
        assert _count(client.pages("contacts"), "FirstName", "Once") == 1
        for i in range(5):
            assert _count(client.pages("contacts"), "FirstName", f"Lost{i}") == 1


def test_crm_office_batch_reports_each_item(crm_office_service: EmbeddedService) -> None:
    with office_client(crm_office_service) as client:
        stale = client.create("contacts", {"givenName": "Old"})
        client.replace("contacts", stale["id"], {"givenName": "Newer"}, stale["rowVersion"])
        results = client.batch(
            "contacts",
            create=[
                {"givenName": "A", "email": "a@example.com"},
                {"givenName": "B", "email": "not an address"},
                {"givenName": "C"},
            ],
            update=[
                {"id": stale["id"], "givenName": "Lost", "rowVersion": stale["rowVersion"]},
                {"id": "999999999", "givenName": "Nobody"},
            ],
        )
        assert [r["index"] for r in results] == [0, 1, 2, 3, 4]
        assert [r["status"] for r in results] == [201, 422, 201, 412, 404]
        assert [e["field"] for e in results[1]["error"]["errors"]] == ["email"]
        names = sorted(i["givenName"] for p in client.pages("contacts") for i in p)
        assert names == ["A", "C", "Newer"]

        crm_office_service.set_faults(batch_item_error_rate=1.0)
        results = client.batch("contacts", create=[{"givenName": "D"}, {"givenName": "E"}])
        assert [r["status"] for r in results] == [500, 500]
        assert _count(client.pages("contacts"), "givenName", "D") == 0


def test_crm_office_create_is_not_retried_after_a_lost_answer(
    crm_office_service: EmbeddedService,
) -> None:
    """CRMOffice has no idempotency key: a create whose answer is lost must not be repeated."""
    with office_client(crm_office_service, retry=PATIENT) as client:
        next(client.pages("companies"))  # fetch the token before the faults start
        mark = log_mark(crm_office_service)
        crm_office_service.set_faults(drop_rate=1.0)
        with pytest.raises(CrmUnavailable):
            client.create("companies", {"name": "Dropped"})
        with pytest.raises(CrmUnavailable):
            client.batch("companies", create=[{"name": "Dropped batch"}])
        crm_office_service.set_faults(post_write_error_rate=1.0)
        with pytest.raises(CrmUnavailable):
            client.create("companies", {"name": "Late error"})
        crm_office_service.set_faults()
        for name in ("Dropped", "Dropped batch", "Late error"):
            assert _count(client.pages("companies"), "name", name) <= 1, f"{name} duplicated"
    # one request per create: none of them was sent twice
    assert requests_logged(crm_office_service, "POST /companies HTTP", mark) == 2
    assert requests_logged(crm_office_service, "POST /companies/batch HTTP", mark) == 1


def test_clients_keep_unicode_and_nested_values(crm_office_service: EmbeddedService) -> None:
    with office_client(crm_office_service) as client:
        company = client.create(
            "companies",
            {"name": "Ærlig Øl & Søn", "visitAddress": {"postCode": "0150", "postalArea": "Oslo"}},
        )
        page = next(client.pages("companies"))
    assert page == [company]
    assert page[0]["visitAddress"]["postCode"] == "0150"
    assert page[0]["name"] == "Ærlig Øl & Søn"
