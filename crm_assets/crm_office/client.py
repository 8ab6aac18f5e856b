"""httpx client for the CRMOffice API (camelCase JSON, OAuth2 client credentials, offset paging)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

import httpx

from crm_assets.connector import ClientSettings, Create, Outcome, Update
from crm_assets.crm_office.fields import FIELDS, SERVER_FIELDS, SYSTEM
from crm_assets.engine.snapshot import unflatten
from crm_assets.http import (
    DEFAULT_MAX_RESPONSE_BYTES,
    CrmAuthError,
    CrmError,
    CrmProtocolError,
    CrmUnavailable,
    HttpClient,
    RetryPolicy,
    check_response,
    json_body,
    rfc3339,
    transport_errors,
)

#: Most items one batch call takes.
BATCH_SIZE = 100


class CrmOfficeClient(HttpClient):
    """One CRMOffice tenant: token handling, paging to the end, retries, batches.

    The access token is fetched on first use, refreshed shortly before it expires
    and once more on a 401. Creates have no idempotency key in this API, so a
    create whose answer was lost is not retried here: the sync looks the record up
    by its merge criteria first.
    """

    system = SYSTEM

    @classmethod
    def from_settings(cls, settings: ClientSettings) -> CrmOfficeClient:
        """A client from its connector's settings (API key or client id and secret)."""
        return cls(
            settings.base_url,
            settings.account,
            settings.secret,
            timeout=settings.timeout,
            retry=settings.retry,
            rate_limit=settings.rate_limit,
        )

    def __init__(
        self,
        base_url: str,
        client_id: str,
        client_secret: str,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        max_connections: int = 16,
        rate_limit: float | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        super().__init__(
            base_url,
            {},
            timeout,
            retry,
            max_connections,
            rate_limit,
            max_response_bytes=max_response_bytes,
        )
        self._client_id = client_id
        self._client_secret = client_secret
        self._token: str | None = None
        self._token_expires = 0.0
        self._token_lock = threading.Lock()

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
        self, obj: str, since: datetime | None = None, size: int | None = None
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
        take = size or 1000
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

    # -- the connector protocol's writes: batches of BATCH_SIZE ----------------------------
    def update_records(self, obj: str, updates: Sequence[Update]) -> list[Outcome]:
        """Full replace of each record (as last read, with the changes) through the batch
        endpoint, with its rowVersion so a record changed since it was read answers 412."""
        writable = [f for f in FIELDS[obj] if f not in SERVER_FIELDS]
        items = []
        for u in updates:
            record = {f: u.current.get(f) for f in writable}
            record.update(u.changes)
            item = unflatten(record)
            item["id"] = u.id
            if u.version is not None:
                item["rowVersion"] = u.version
            items.append(item)
        return self._batches(obj, [u.id for u in updates], items, create=False)

    def create_records(self, obj: str, creates: Sequence[Create]) -> list[Outcome]:
        """Creates through the batch endpoint. The API takes no idempotency key: a batch
        whose answer was lost is ``unknown`` (the sync looks the records up before any retry)."""
        items = [unflatten(dict(c.values)) for c in creates]
        return self._batches(obj, [None] * len(items), items, create=True)

    def _batches(
        self, obj: str, ids: list[str | None], items: list[dict[str, Any]], create: bool
    ) -> list[Outcome]:
        out: list[Outcome] = []
        for start in range(0, len(items), BATCH_SIZE):
            chunk, chunk_ids = items[start : start + BATCH_SIZE], ids[start : start + BATCH_SIZE]
            try:
                results = self.batch(obj, **{"create" if create else "update": chunk})
            except CrmUnavailable as exc:
                if not exc.maybe_applied:
                    raise  # unreachable: the run fails, nothing was written
                out += [Outcome("unknown", i, str(exc)) for i in chunk_ids]
                continue
            except CrmError as exc:
                out += [Outcome("failed", i, str(exc)) for i in chunk_ids]
                continue
            for record_id, res in zip(chunk_ids, results, strict=True):
                out.append(_outcome(record_id, res))
        return out


def _outcome(record_id: str | None, result: dict[str, Any]) -> Outcome:
    """One batch item's result as an outcome."""
    status = result.get("status") if isinstance(result, dict) else None
    item = result.get("item") if isinstance(result, dict) else None
    new_id = item.get("id") if isinstance(item, dict) else None
    if status in (200, 201) and (new_id is not None or record_id is not None):
        stamp = item.get("updatedAt") if isinstance(item, dict) else None
        return Outcome(
            "ok", str(new_id if new_id is not None else record_id), stamp=stamp and str(stamp)
        )
    if status == 412:
        return Outcome("conflict", record_id, "HTTP 412: the record changed since it was read")
    error = result.get("error") if isinstance(result, dict) else None
    return Outcome("failed", record_id, f"HTTP {status}: {describe_item_error(error)}")


def describe_item_error(error: Any) -> str:
    """A batch item's error as one readable line: ``orgNr: must be 9 digits``."""
    if isinstance(error, dict):
        fields = error.get("errors")
        if isinstance(fields, list) and fields:
            return "; ".join(
                f"{e.get('field')}: {e.get('message')}" for e in fields if isinstance(e, dict)
            )
        return str(error.get("message") or error)
    return str(error)
