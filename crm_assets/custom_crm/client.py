"""httpx client for the Custom CRM API (PascalCase JSON, API key, cursor paging)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx

from crm_assets.http import (
    CrmProtocolError,
    RetryPolicy,
    check_response,
    json_body,
    pace_hook,
    transport_errors,
)

SYSTEM = "Custom CRM"

#: The objects the API serves, with their fields (flattened names) and types.
FIELDS: dict[str, dict[str, str]] = {
    "contacts": {
        "Id": "string",
        "FirstName": "string",
        "LastName": "string",
        "Email": "string",
        "Phone": "string",
        "MobilePhone": "string",
        "Title": "string",
        "ProductId": "string",
        "Created": "datetime",
        "Modified": "datetime",
        "Version": "integer",
        "Deleted": "boolean",
    },
    "products": {
        "Id": "string",
        "Name": "string",
        "ProductNumber": "integer",
        "Description": "string",
        "Url": "string",
        "Active": "boolean",
        "Street": "string",
        "PostalCode": "string",
        "City": "string",
        "Country": "string",
        "Created": "datetime",
        "Modified": "datetime",
        "Version": "integer",
        "Deleted": "boolean",
    },
}

#: Fields the server manages; never sent in a create or update.
SERVER_FIELDS = frozenset({"Id", "Created", "Modified", "Version", "Deleted"})


def rfc3339(moment: datetime) -> str:
    """An RFC 3339 timestamp in UTC with microseconds, as both APIs take them."""
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


class CustomCrmClient:
    """One Custom CRM account: paging to the end, retries, typed errors.

    Creates carry an ``Idempotency-Key``, so they are retried like reads; the key
    is the caller's (the sync stores it with its create intent).
    """

    system = SYSTEM

    def __init__(
        self,
        base_url: str,
        api_key: str,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        max_connections: int = 16,
        rate_limit: float | None = None,
    ) -> None:
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}", "Accept": "application/json"},
            timeout=timeout,
            limits=httpx.Limits(max_connections=max_connections),
            event_hooks={"request": [pace_hook(rate_limit)]} if rate_limit else None,
        )
        self.retry = retry or RetryPolicy()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CustomCrmClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json: Any = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        call = f"{method} {path}"

        def once() -> httpx.Response:
            with transport_errors(SYSTEM, call):
                response = self._http.request(
                    method, path, params=params, json=json, headers=headers
                )
            return check_response(SYSTEM, call, response)

        return self.retry.call(once)

    def pages(
        self,
        obj: str,
        since: datetime | None = None,
        include_deleted: bool = True,
        limit: int = 500,
    ) -> Iterator[list[dict[str, Any]]]:
        """Every record modified since the moment (inclusive), page by page, to the end."""
        params: dict[str, Any] = {"limit": limit, "includeDeleted": str(include_deleted).lower()}
        if since is not None:
            params["modifiedSince"] = rfc3339(since)
        call = f"GET /api/{obj}"
        while True:
            body = json_body(SYSTEM, call, self._request("GET", f"/api/{obj}", params=params))
            items, cursor = _page(body, call)
            yield items
            if not cursor:
                return
            params["cursor"] = cursor

    def get(self, obj: str, record_id: str) -> dict[str, Any]:
        path = f"/api/{obj}/{record_id}"
        return json_body(SYSTEM, f"GET {path}", self._request("GET", path))

    def create(
        self, obj: str, record: dict[str, Any], idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Create a record; the same idempotency key never creates twice."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        body = {k: v for k, v in record.items() if k not in SERVER_FIELDS}
        path = f"/api/{obj}"
        response = self._request("POST", path, json=body, headers=headers)
        return json_body(SYSTEM, f"POST {path}", response)

    def update(
        self, obj: str, record_id: str, changes: dict[str, Any], version: int | None = None
    ) -> dict[str, Any]:
        """Partial update; with ``version`` a concurrent change answers CrmConflict (412)."""
        headers = {"If-Match": f'"{version}"'} if version is not None else None
        body = {k: v for k, v in changes.items() if k not in SERVER_FIELDS}
        path = f"/api/{obj}/{record_id}"
        response = self._request("PATCH", path, json=body, headers=headers)
        return json_body(SYSTEM, f"PATCH {path}", response)

    def delete(self, obj: str, record_id: str) -> None:
        self._request("DELETE", f"/api/{obj}/{record_id}")


def _page(body: Any, call: str) -> tuple[list[dict[str, Any]], str | None]:
    if not isinstance(body, dict) or not isinstance(body.get("items"), list):
        raise CrmProtocolError(SYSTEM, call, "page without an 'items' list")
    cursor = body.get("nextCursor")
    if cursor is not None and not isinstance(cursor, str):
        raise CrmProtocolError(SYSTEM, call, "'nextCursor' is not a string")
    return body["items"], cursor
