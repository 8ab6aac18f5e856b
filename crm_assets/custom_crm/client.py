"""httpx client for the Custom CRM API (PascalCase JSON, API key, cursor paging)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

import httpx

from crm_assets.connector import Create, Outcome, Update
from crm_assets.custom_crm.fields import SERVER_FIELDS, SYSTEM
from crm_assets.http import (
    BearerClient,
    CrmConflict,
    CrmError,
    CrmProtocolError,
    CrmUnavailable,
    check_response,
    json_body,
    rfc3339,
    run_parallel,
    transport_errors,
)

#: Calls that run at once (the client's connection pool is as large).
PARALLEL_CALLS = 16


class CustomCrmClient(BearerClient):
    """One Custom CRM account: paging to the end, retries, typed errors.

    Creates carry an ``Idempotency-Key``, so they are retried like reads; the key
    is the caller's (the sync stores it with its create intent). The API has no
    batch endpoint: writes are single calls, run concurrently.
    """

    system = SYSTEM

    parallel_calls = PARALLEL_CALLS

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
        size: int | None = None,
        include_deleted: bool = True,
    ) -> Iterator[list[dict[str, Any]]]:
        """Every record modified since the moment (inclusive), page by page, to the end."""
        params: dict[str, Any] = {
            "limit": size or 500,
            "includeDeleted": str(include_deleted).lower(),
        }
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

    # -- the connector protocol's writes: concurrent single calls --------------------------
    def update_records(self, obj: str, updates: Sequence[Update]) -> list[Outcome]:
        """PATCH just the changed fields of each record, with If-Match on its Version."""

        def one(u: Update) -> Outcome:
            try:
                done = self.update(obj, u.id, dict(u.changes), _int(u.version))
                return Outcome("ok", u.id, stamp=_stamp(done))
            except CrmConflict as exc:
                return Outcome("conflict", u.id, str(exc))
            except CrmUnavailable:
                raise
            except CrmError as exc:
                return Outcome("failed", u.id, str(exc))

        return run_parallel(PARALLEL_CALLS, one, updates)

    def create_records(self, obj: str, creates: Sequence[Create]) -> list[Outcome]:
        """One POST per record with its intent key as Idempotency-Key (safe to retry)."""

        def one(c: Create) -> Outcome:
            try:
                made = self.create(obj, dict(c.values), idempotency_key=c.key)
                return Outcome("ok", str(made["Id"]), stamp=_stamp(made))
            except CrmUnavailable:
                raise
            except CrmError as exc:
                return Outcome("failed", None, str(exc))

        return run_parallel(PARALLEL_CALLS, one, creates)


def _stamp(record: Any) -> str | None:
    modified = record.get("Modified") if isinstance(record, dict) else None
    return str(modified) if modified else None


def _int(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _page(body: Any, call: str) -> tuple[list[dict[str, Any]], str | None]:
    if not isinstance(body, dict) or not isinstance(body.get("items"), list):
        raise CrmProtocolError(SYSTEM, call, "page without an 'items' list")
    cursor = body.get("nextCursor")
    if cursor is not None and not isinstance(cursor, str):
        raise CrmProtocolError(SYSTEM, call, "'nextCursor' is not a string")
    return body["items"], cursor
