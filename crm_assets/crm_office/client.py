"""httpx client for the CRMOffice API (camelCase JSON, OAuth2 client credentials, offset paging)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx

from crm_assets.custom_crm.client import rfc3339
from crm_assets.http import (
    CrmAuthError,
    CrmProtocolError,
    RetryPolicy,
    check_response,
    json_body,
    pace_hook,
    transport_errors,
)

SYSTEM = "CRMOffice"

_ADDRESS = ("streetAddress", "postCode", "postalArea", "country")

#: The objects the API serves, with their fields (flattened, dotted names) and types.
FIELDS: dict[str, dict[str, str]] = {
    "contacts": {
        "id": "string",
        "givenName": "string",
        "familyName": "string",
        "email": "string",
        "directPhone": "string",
        "mobilePhone": "string",
        "title": "string",
        "company.id": "string",
        "createdAt": "datetime",
        "updatedAt": "datetime",
        "rowVersion": "string",
    },
    "companies": {
        "id": "string",
        "name": "string",
        "orgNr": "string",
        "website": "string",
        "description": "string",
        "isActive": "boolean",
        **{f"postAddress.{f}": "string" for f in _ADDRESS},
        **{f"visitAddress.{f}": "string" for f in _ADDRESS},
        "createdAt": "datetime",
        "updatedAt": "datetime",
        "rowVersion": "string",
    },
}

#: Fields the server manages; never sent in a create or replace.
SERVER_FIELDS = frozenset({"id", "createdAt", "updatedAt", "rowVersion"})

#: Most items one batch call takes.
BATCH_SIZE = 100


class CrmOfficeClient:
    """One CRMOffice tenant: token handling, paging to the end, retries, batches.

    The access token is fetched on first use, refreshed shortly before it expires
    and once more on a 401. Creates have no idempotency key in this API, so a
    create whose answer was lost is not retried here: the sync looks the record up
    by its merge criteria first.
    """

    system = SYSTEM

    def __init__(
        self,
        base_url: str,
        client_id: str,
        client_secret: str,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        max_connections: int = 16,
        rate_limit: float | None = None,
    ) -> None:
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Accept": "application/json"},
            timeout=timeout,
            limits=httpx.Limits(max_connections=max_connections),
            event_hooks={"request": [pace_hook(rate_limit)]} if rate_limit else None,
        )
        self._client_id = client_id
        self._client_secret = client_secret
        self._token: str | None = None
        self._token_expires = 0.0
        self._token_lock = threading.Lock()
        self.retry = retry or RetryPolicy()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CrmOfficeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- authentication ---------------------------------------------------------------
    def _access_token(self, stale: str | None = None) -> str:
        """A valid token; ``stale`` is one the server refused, so fetch a new one."""
        with self._token_lock:
            fresh = self._token is not None and time.monotonic() < self._token_expires
            if fresh and self._token != stale:
                return self._token  # type: ignore[return-value]
            call = "POST /connect/token"
            form = {
                "grant_type": "client_credentials",
                "client_id": self._client_id,
                "client_secret": self._client_secret,
                "scope": "crmoffice",
            }

            def once() -> httpx.Response:
                with transport_errors(SYSTEM, call):
                    response = self._http.post("/connect/token", data=form)
                return check_response(SYSTEM, call, response)

            try:
                body = json_body(SYSTEM, call, self.retry.call(once))
            except CrmAuthError:
                raise CrmAuthError(
                    SYSTEM,
                    call,
                    "client credentials not accepted (check CRM_OFFICE_CLIENT_ID "
                    "and CRM_OFFICE_CLIENT_SECRET)",
                    401,
                ) from None
            token = body.get("access_token") if isinstance(body, dict) else None
            if not isinstance(token, str):
                raise CrmProtocolError(SYSTEM, call, "token response without access_token")
            lifetime = float(body.get("expires_in") or 300)
            self._token = token
            # refresh a little early so a token never expires mid-request
            self._token_expires = time.monotonic() + max(1.0, lifetime - min(30.0, lifetime / 10))
            return token

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json: Any = None,
        headers: dict[str, str] | None = None,
        idempotent: bool = True,
    ) -> httpx.Response:
        call = f"{method} {path}"

        def send() -> httpx.Response:
            token = self._access_token()
            for attempt in range(2):
                with transport_errors(SYSTEM, call, retry=idempotent):
                    response = self._http.request(
                        method,
                        path,
                        params=params,
                        json=json,
                        headers={**(headers or {}), "Authorization": f"Bearer {token}"},
                    )
                if response.status_code != 401 or attempt:
                    break
                token = self._access_token(stale=token)
            return check_response(SYSTEM, call, response, retry_server_errors=idempotent)

        return self.retry.call(send)

    # -- reads ------------------------------------------------------------------------
    def pages(
        self, obj: str, since: datetime | None = None, take: int = 1000
    ) -> Iterator[list[dict[str, Any]]]:
        """Every record updated since the moment (inclusive), page by page, to the end.

        Offset paging shifts when records change while we page (an updated record
        moves to the end of the order, a deleted one leaves it). So each page restarts
        from the last ``updatedAt`` seen and overlaps the previous page by one record:
        when that record is not where it was, records before it moved away, and the
        page is read again from further back. A shift can then not hide a record; a
        moved record shows up again at the end (callers dedupe by id). Records read
        twice at the restart moment are left out.
        """
        since_text = rfc3339(since) if since is not None else None
        seen: set[Any] = set()  # ids already yielded whose updatedAt is since_text
        overlap = 1 if take > 1 else 0
        skip = 0
        call = f"GET /{obj}"
        while True:
            params: dict[str, Any] = {"skip": skip, "take": take}
            if since_text is not None:
                params["updatedSince"] = since_text
            body = json_body(SYSTEM, call, self._request("GET", f"/{obj}", params=params))
            if not isinstance(body, dict) or not isinstance(body.get("items"), list):
                raise CrmProtocolError(SYSTEM, call, "page without an 'items' list")
            items: list[dict[str, Any]] = body["items"]
            if overlap and skip and (not items or items[0].get("id") not in seen):
                skip = max(0, skip - take)  # the record we overlap on moved: step back
                continue
            yield [item for item in items if item.get("id") not in seen]
            if len(items) < take:
                return
            last = items[-1].get("updatedAt")
            if not isinstance(last, str):
                raise CrmProtocolError(SYSTEM, call, "record without 'updatedAt'")
            at_last = {item.get("id") for item in items if item.get("updatedAt") == last}
            if last == since_text:
                seen |= at_last
                skip += len(items) - overlap
            else:
                since_text, seen = last, at_last
                skip = len(at_last) - overlap

    def get(self, obj: str, record_id: str) -> dict[str, Any]:
        path = f"/{obj}/{record_id}"
        return json_body(SYSTEM, f"GET {path}", self._request("GET", path))

    # -- writes -----------------------------------------------------------------------
    def create(self, obj: str, record: dict[str, Any]) -> dict[str, Any]:
        """Create one record. Not retried once it may have reached the server."""
        path = f"/{obj}"
        body = {k: v for k, v in record.items() if k not in SERVER_FIELDS}
        response = self._request("POST", path, json=body, idempotent=False)
        return json_body(SYSTEM, f"POST {path}", response)

    def replace(
        self, obj: str, record_id: str, record: dict[str, Any], row_version: str | None = None
    ) -> dict[str, Any]:
        """Full replace; with ``row_version`` a concurrent change answers CrmConflict (412)."""
        headers = {"If-Match": f'"{row_version}"'} if row_version is not None else None
        body = {k: v for k, v in record.items() if k not in SERVER_FIELDS}
        path = f"/{obj}/{record_id}"
        response = self._request("PUT", path, json=body, headers=headers)
        return json_body(SYSTEM, f"PUT {path}", response)

    def delete(self, obj: str, record_id: str) -> None:
        self._request("DELETE", f"/{obj}/{record_id}")

    def batch(
        self,
        obj: str,
        create: list[dict[str, Any]] | None = None,
        update: list[dict[str, Any]] | None = None,
    ) -> list[dict[str, Any]]:
        """One batch call (at most 100 items): per-item results, in create-then-update order.

        A batch holding creates is not retried once it may have reached the server.
        """
        create, update = create or [], update or []
        if len(create) + len(update) > BATCH_SIZE:
            raise ValueError(f"a batch takes at most {BATCH_SIZE} items")
        path = f"/{obj}/batch"
        body = {
            "create": [{k: v for k, v in r.items() if k not in SERVER_FIELDS} for r in create],
            "update": update,
        }
        response = self._request("POST", path, json=body, idempotent=not create)
        results = json_body(SYSTEM, f"POST {path}", response)
        items = results.get("results") if isinstance(results, dict) else None
        if not isinstance(items, list) or len(items) != len(create) + len(update):
            raise CrmProtocolError(
                SYSTEM, f"POST {path}", "batch answer without one result per item"
            )
        return sorted(items, key=lambda r: r.get("index", 0))
