"""httpx client for HubSpot's CRM v3 objects API (private-app token, properties as strings).

Reads: a full scan lists every record by id (``GET /crm/v3/objects/{object}``), the live ones
and then the archived ones (flagged ``archived``: deletes); an incremental read searches on
the modification time (``lastmodifieddate`` / ``hs_lastmodifieddate`` ``GTE`` the cursor,
ascending). A search query returns at most 10,000 results and shifts when records change
while it is paged, so every page is a search of its own from the last time seen (the ids
already read at that millisecond are skipped); a page all at one millisecond is read by id
within that millisecond. Search results carry no associations: a contact's companies are
read with the v4 batch read.

Writes: batches of 100 (``batch/create``, ``batch/update``); a ``207`` answer says which
items failed. HubSpot has no optimistic-concurrency token: before an update the records are
re-read (``batch/read``) and one whose ``updatedAt`` moved since the version the sync
planned from is answered ``conflict`` (the sync re-reads and re-merges it, as after a 412).
The check and the write are two calls: an edit landing between them is overwritten, the
window is one round trip. A contact create whose e-mail an existing contact has (``409``,
"Existing ID: <id>") links to that contact instead of failing. A contact's company is the
primary company association, written through the v4 endpoints.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import httpx

from crm_assets.connector import Create, Outcome, Update
from crm_assets.http import (
    BearerClient,
    CrmError,
    CrmNotFound,
    CrmProtocolError,
    CrmUnavailable,
    CrmValidationError,
    check_response,
    json_body,
    run_parallel,
    transport_errors,
)
from crm_assets.hubspot.fields import ASSOCIATIONS, MODIFIED_PROPERTY, PROPERTIES, SYSTEM

#: Most inputs one batch call takes.
BATCH_SIZE = 100
#: Page sizes: the list endpoint takes at most 100, a search at most 200.
LIST_LIMIT = 100
SEARCH_LIMIT = 200
#: Association calls (one per contact) that run at once.
PARALLEL_CALLS = 8
PRIMARY_TYPE = 1  # contact_to_company: the primary company
_EXISTING = re.compile(r"Existing ID:\s*(\d+)")


class CrmDuplicate(CrmValidationError):
    """409: a contact with this e-mail exists already (``existing_id``, when HubSpot said)."""

    def __init__(self, call: str, reason: str, existing_id: str | None) -> None:
        super().__init__(SYSTEM, call, reason, 409, [])
        self.existing_id = existing_id


class HubSpotClient(BearerClient):
    """One HubSpot account (a private app's token): paging, search windows, batches."""

    system = SYSTEM

    parallel_calls = PARALLEL_CALLS

    # -- calls ------------------------------------------------------------------------------
    def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json: Any = None,
        idempotent: bool = True,
    ) -> httpx.Response:
        call = f"{method} {path}"

        def once() -> httpx.Response:
            with transport_errors(SYSTEM, call, retry=idempotent):
                response = self._http.request(method, path, params=params, json=json)
            return _check(call, response, idempotent)

        return self.retry.call(once)

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        return json_body(SYSTEM, f"{method} {path}", self._request(method, path, **kwargs))

    # -- reads ------------------------------------------------------------------------------
    def pages(
        self, obj: str, since: datetime | None = None, size: int | None = None
    ) -> Iterator[list[dict[str, Any]]]:
        """Every record modified since the moment (inclusive), page by page, to the end.

        Without ``since``: every record, the archived ones too (flagged ``archived``).
        With it: a search, which sees no archived records (a full rescan finds them).
        """
        _known(obj)
        if since is None:
            yield from self._list(obj, False, size)
            yield from self._list(obj, True, size)
        else:
            yield from self._search(obj, since, size)

    def _list(self, obj: str, archived: bool, size: int | None) -> Iterator[list[dict[str, Any]]]:
        path = f"/crm/v3/objects/{obj}"
        params: dict[str, Any] = {
            "limit": min(size or LIST_LIMIT, LIST_LIMIT),
            "properties": ",".join(PROPERTIES[obj]),
            "archived": str(archived).lower(),
        }
        if obj in ASSOCIATIONS and not archived:
            params["associations"] = "companies"
        while True:
            body = self._call("GET", path, params=params)
            results = _results(body, f"GET {path}")
            yield [_record(obj, r, _primary_v3(r)) for r in results]
            after = ((body.get("paging") or {}).get("next") or {}).get("after")
            if not after:
                return
            params["after"] = str(after)

    def _search(
        self, obj: str, since: datetime, size: int | None
    ) -> Iterator[list[dict[str, Any]]]:
        limit = min(size or SEARCH_LIMIT, SEARCH_LIMIT)
        prop = MODIFIED_PROPERTY[obj]
        start = _epoch_ms(since)
        seen: set[str] = set()  # ids already read whose modification time is `start`
        while True:
            results = self._search_page(obj, [_filter(prop, "GTE", start)], prop, limit)
            fresh = [r for r in results if str(r.get("id")) not in seen]
            if fresh:
                yield self._with_companies(obj, fresh)
            if len(results) < limit:
                return
            last = _modified_ms(results[-1], prop)
            if last == start:  # a whole page at one millisecond: read it by id
                seen |= {str(r.get("id")) for r in results}
                yield from self._one_moment(obj, prop, start, limit, seen)
                start, seen = start + 1, set()
                continue
            if last < start:
                raise CrmProtocolError(SYSTEM, f"POST /crm/v3/objects/{obj}/search", "unsorted")
            seen = {str(r.get("id")) for r in results if _modified_ms(r, prop) == last}
            start = last

    def _one_moment(
        self, obj: str, prop: str, moment: int, limit: int, seen: set[str]
    ) -> Iterator[list[dict[str, Any]]]:
        """Every record modified at one millisecond, in id order."""
        last_id = 0
        while True:
            filters = [_filter(prop, "EQ", moment), _filter("hs_object_id", "GT", last_id)]
            results = self._search_page(obj, filters, "hs_object_id", limit)
            fresh = [r for r in results if str(r.get("id")) not in seen]
            if fresh:
                yield self._with_companies(obj, fresh)
            if len(results) < limit:
                return
            last_id = int(results[-1]["id"])

    def _search_page(
        self, obj: str, filters: list[dict[str, Any]], sort: str, limit: int
    ) -> list[dict[str, Any]]:
        """One search (never past its first page: see the module doc)."""
        path = f"/crm/v3/objects/{obj}/search"
        body = {
            "filterGroups": [{"filters": filters}],
            "sorts": [{"propertyName": sort, "direction": "ASCENDING"}],
            "properties": [*PROPERTIES[obj], MODIFIED_PROPERTY[obj]],
            "limit": limit,
        }
        return _results(self._call("POST", path, json=body), f"POST {path}")

    def _with_companies(self, obj: str, raws: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if obj not in ASSOCIATIONS:
            return [_record(obj, r) for r in raws]
        companies = self.primary_companies([str(r.get("id")) for r in raws])
        return [_record(obj, r, companies.get(str(r.get("id")))) for r in raws]

    def primary_companies(self, contact_ids: Sequence[str]) -> dict[str, str | None]:
        """Each contact's primary company (v4 batch read; None: no company)."""
        out: dict[str, str | None] = dict.fromkeys(contact_ids)
        path = "/crm/v4/associations/contacts/companies/batch/read"
        for start in range(0, len(contact_ids), BATCH_SIZE):
            chunk = contact_ids[start : start + BATCH_SIZE]
            body = self._call("POST", path, json={"inputs": [{"id": i} for i in chunk]})
            for result in _results(body, f"POST {path}"):
                source = (result.get("from") or {}).get("id")
                if source is not None:
                    out[str(source)] = _primary_v4(result.get("to"))
        return out

    def get(self, obj: str, record_id: str) -> dict[str, Any]:
        _known(obj)
        params: dict[str, Any] = {"properties": ",".join(PROPERTIES[obj])}
        if obj in ASSOCIATIONS:
            params["associations"] = "companies"
        raw = self._call("GET", f"/crm/v3/objects/{obj}/{record_id}", params=params)
        if not isinstance(raw, dict):
            raise CrmProtocolError(SYSTEM, f"GET /crm/v3/objects/{obj}/{record_id}", "no record")
        return _record(obj, raw, _primary_v3(raw))

    def versions(self, obj: str, ids: Sequence[str]) -> dict[str, str]:
        """The live records' ``updatedAt`` (batch read); an id missing is gone (archived)."""
        out: dict[str, str] = {}
        path = f"/crm/v3/objects/{obj}/batch/read"
        for start in range(0, len(ids), BATCH_SIZE):
            chunk = list(dict.fromkeys(ids[start : start + BATCH_SIZE]))
            body = {"inputs": [{"id": i} for i in chunk], "properties": [MODIFIED_PROPERTY[obj]]}
            for r in _results(self._call("POST", path, json=body), f"POST {path}"):
                out[str(r.get("id"))] = str(r.get("updatedAt"))
        return out

    # -- writes -----------------------------------------------------------------------------
    def create(self, obj: str, values: dict[str, Any]) -> dict[str, Any]:
        """Create one record (flat fields, typed). Not retried once it may have landed."""
        path = f"/crm/v3/objects/{obj}"
        raw = self._call("POST", path, json=_create_input(obj, values), idempotent=False)
        return _record(obj, raw, values.get("associations.companies"))

    def update(self, obj: str, record_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        """Change some properties of one record (no concurrency check: see update_records)."""
        path = f"/crm/v3/objects/{obj}/{record_id}"
        raw = self._call("PATCH", path, json={"properties": _wire_properties(obj, changes)})
        return _record(obj, raw)

    def delete(self, obj: str, record_id: str) -> None:
        """Archive the record (HubSpot's delete)."""
        self._request("DELETE", f"/crm/v3/objects/{obj}/{record_id}")

    def set_company(self, contact_id: str, old: str | None, new: str | None) -> None:
        """Make ``new`` the contact's company in place of ``old`` (v4 associations)."""
        base = f"/crm/v4/objects/contacts/{contact_id}/associations"
        if old == new:
            return
        if old is not None:
            with contextlib.suppress(CrmNotFound):  # gone already
                self._request("DELETE", f"{base}/companies/{old}")
        if new is not None:
            self._request("PUT", f"{base}/default/companies/{new}")

    # -- the connector protocol's writes ----------------------------------------------------
    def update_records(self, obj: str, updates: Sequence[Update]) -> list[Outcome]:
        """Batches of 100, each checked against ``updatedAt`` right before it is written."""
        out: list[Outcome] = []
        for start in range(0, len(updates), BATCH_SIZE):
            out += self._update_chunk(obj, updates[start : start + BATCH_SIZE])
        return out

    def _update_chunk(self, obj: str, chunk: Sequence[Update]) -> list[Outcome]:
        current = self.versions(obj, [u.id for u in chunk])
        outcomes: dict[int, Outcome] = {}
        go: list[int] = []
        for i, u in enumerate(chunk):
            now = current.get(u.id)
            if now is None:
                outcomes[i] = Outcome("failed", u.id, "HTTP 404: not found (archived in HubSpot)")
            elif u.version is not None and not _same_instant(u.version, now):
                outcomes[i] = Outcome(
                    "conflict", u.id, f"updatedAt moved since it was read ({u.version} -> {now})"
                )
            else:
                go.append(i)
        stamps = {chunk[i].id: current[chunk[i].id] for i in go}
        props = {i: _wire_properties(obj, chunk[i].changes) for i in go}
        failed, written = self._write_properties(
            obj, [(chunk[i].id, props[i]) for i in go if props[i]]
        )
        stamps |= written
        refs = ASSOCIATIONS.get(obj, {})
        moves = [
            (chunk[i].id, chunk[i].changes[field])
            for i in go
            for field in refs
            if field in chunk[i].changes and chunk[i].id not in failed
        ]
        if moves:
            failed |= self._write_companies(moves)
            moved = [cid for cid, _ in moves if cid not in failed]
            stamps |= self.versions(obj, moved)
        for i in go:
            u = chunk[i]
            problem = failed.get(u.id)
            if problem is not None:
                outcomes[i] = Outcome("failed", u.id, problem)
            else:
                outcomes[i] = Outcome("ok", u.id, stamp=stamps.get(u.id))
        return [outcomes[i] for i in range(len(chunk))]

    def _write_properties(
        self, obj: str, items: list[tuple[str, dict[str, str]]]
    ) -> tuple[dict[str, str], dict[str, str]]:
        """batch/update: the ids that failed (with why) and the stamps of those written.

        A batch refused whole (400: HubSpot validates some batches all at once) is written
        record by record, so one bad value fails one record.
        """
        failed: dict[str, str] = {}
        stamps: dict[str, str] = {}
        if not items:
            return failed, stamps
        path = f"/crm/v3/objects/{obj}/batch/update"
        inputs = [{"id": record_id, "properties": props} for record_id, props in items]
        try:
            body = self._call("POST", path, json={"inputs": inputs})
        except CrmValidationError:
            for record_id, props in items:
                try:
                    raw = self._call(
                        "PATCH", f"/crm/v3/objects/{obj}/{record_id}", json={"properties": props}
                    )
                    stamps[record_id] = str(raw.get("updatedAt"))
                except (CrmValidationError, CrmNotFound) as exc:
                    failed[record_id] = str(exc)
            return failed, stamps
        for r in _results(body, f"POST {path}"):
            stamps[str(r.get("id"))] = str(r.get("updatedAt"))
        for error in _errors(body):
            for record_id in (error.get("context") or {}).get("ids") or ():
                failed[str(record_id)] = _item_message(error)
        for record_id, _props in items:
            if record_id not in failed and record_id not in stamps:
                failed[record_id] = "HubSpot answered no result for this record"
        return failed, stamps

    def _write_companies(self, moves: list[tuple[str, Any]]) -> dict[str, str]:
        """Each contact's primary company set as planned; the contacts that failed, with why."""
        current = self.primary_companies([cid for cid, _ in moves])

        def one(move: tuple[str, Any]) -> str | None:
            contact_id, new = move
            try:
                self.set_company(contact_id, current.get(contact_id), _text(new))
            except (CrmValidationError, CrmNotFound) as exc:
                return str(exc)
            return None

        problems = run_parallel(PARALLEL_CALLS, one, moves)
        return {cid: p for (cid, _), p in zip(moves, problems, strict=True) if p is not None}

    def create_records(self, obj: str, creates: Sequence[Create]) -> list[Outcome]:
        """batch/create in batches of 100. HubSpot takes no idempotency key: a batch whose
        answer was lost is ``unknown`` (the sync looks the records up before any retry). A
        batch refused whole (409: a contact's e-mail is taken; or a 400) is created record by
        record: a taken e-mail then links to the contact that has it."""
        _known(obj)
        out: list[Outcome] = []
        taken: set[str] = set()  # ids created or linked by this call
        path = f"/crm/v3/objects/{obj}/batch/create"
        for start in range(0, len(creates), BATCH_SIZE):
            chunk = creates[start : start + BATCH_SIZE]
            inputs = [
                {**_create_input(obj, c.values), "objectWriteTraceId": str(i)}
                for i, c in enumerate(chunk)
            ]
            try:
                body = self._call("POST", path, json={"inputs": inputs}, idempotent=False)
            except CrmUnavailable as exc:
                if not exc.maybe_applied:
                    raise  # unreachable: the run fails, nothing was written
                out += [Outcome("unknown", None, str(exc)) for _ in chunk]
                continue
            except CrmValidationError:
                out += [self._create_one(obj, item, taken) for item in inputs]
                continue
            out += _created(body, len(inputs), taken)
        return out

    def _create_one(self, obj: str, item: dict[str, Any], taken: set[str]) -> Outcome:
        body = {k: v for k, v in item.items() if k != "objectWriteTraceId"}
        path = f"/crm/v3/objects/{obj}"
        try:
            raw = self._call("POST", path, json=body, idempotent=False)
        except CrmDuplicate as exc:
            existing = exc.existing_id
            if existing is None:
                return Outcome("failed", None, str(exc))
            if existing in taken:
                return Outcome(
                    "failed",
                    None,
                    f"{exc.reason}: that contact was created or linked for another record "
                    "in this run (two records with one e-mail)",
                )
            taken.add(existing)
            return Outcome("ok", existing)  # a link: the sync did not write the contact
        except CrmUnavailable as exc:
            if not exc.maybe_applied:
                raise
            return Outcome("unknown", None, str(exc))
        except (CrmValidationError, CrmNotFound) as exc:
            return Outcome("failed", None, str(exc))
        record_id = str(raw.get("id")) if isinstance(raw, dict) else None
        if record_id is None:
            return Outcome("unknown", None, "HubSpot answered no id")
        taken.add(record_id)
        return Outcome("ok", record_id, stamp=_stamp_of(raw))


# -- answers ---------------------------------------------------------------------------------
def _check(call: str, response: httpx.Response, idempotent: bool) -> httpx.Response:
    """check_response, with HubSpot's error message kept for the 4xx a record causes."""
    status = response.status_code
    if status < 400 or status in (401, 403, 404, 412, 429) or status >= 500:
        return check_response(SYSTEM, call, response, retry_server_errors=idempotent)
    message = _message(response)
    if status == 409:
        found = _EXISTING.search(message)
        raise CrmDuplicate(call, f"HTTP 409: {message}", found.group(1) if found else None)
    raise CrmValidationError(SYSTEM, call, f"HTTP {status}: {message}", status, [])


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.reason_phrase or "error"
    if isinstance(body, dict):
        text = str(body.get("message") or body.get("error") or "error")
        category = body.get("category")
        return f"{category}: {text}" if category else text
    return "error"


def _results(body: Any, call: str) -> list[dict[str, Any]]:
    results = body.get("results") if isinstance(body, dict) else None
    if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
        raise CrmProtocolError(SYSTEM, call, "answer without a 'results' list")
    return results


def _errors(body: Any) -> list[dict[str, Any]]:
    errors = body.get("errors") if isinstance(body, dict) else None
    return [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []


def _item_message(error: dict[str, Any]) -> str:
    category = error.get("category")
    message = str(error.get("message") or "failed")
    return f"{category}: {message}" if category else message


def _created(body: Any, count: int, taken: set[str]) -> list[Outcome]:
    """A batch/create answer as one outcome per input, matched by objectWriteTraceId."""
    results = _results(body, "batch/create")
    by_trace = {str(r["objectWriteTraceId"]): r for r in results if "objectWriteTraceId" in r}
    if not by_trace and len(results) == count and not _errors(body):
        by_trace = {str(i): r for i, r in enumerate(results)}  # no trace ids: in order
    failed: dict[str, str] = {}
    for error in _errors(body):
        for trace in (error.get("context") or {}).get("objectWriteTraceId") or ():
            failed[str(trace)] = _item_message(error)
    out = []
    for i in range(count):
        result = by_trace.get(str(i))
        if result is not None and result.get("id") is not None:
            taken.add(str(result["id"]))
            out.append(Outcome("ok", str(result["id"]), stamp=_stamp_of(result)))
        elif str(i) in failed:
            out.append(Outcome("failed", None, failed[str(i)]))
        else:
            out.append(Outcome("unknown", None, "HubSpot answered nothing for this input"))
    return out


def _stamp_of(record: Any) -> str | None:
    updated = record.get("updatedAt") if isinstance(record, dict) else None
    return str(updated) if updated else None


# -- records ---------------------------------------------------------------------------------
def _known(obj: str) -> None:
    if obj not in PROPERTIES:
        raise ValueError(f"HubSpot has no object {obj!r} here (objects: {', '.join(PROPERTIES)})")


_UNSET: Any = object()


def _record(obj: str, raw: dict[str, Any], company: Any = _UNSET) -> dict[str, Any]:
    """An API record as the sync reads it: typed property values, the primary company."""
    if raw.get("id") is None:
        raise CrmProtocolError(SYSTEM, f"read {obj}", "record without an id")
    props = raw.get("properties") if isinstance(raw.get("properties"), dict) else {}
    out: dict[str, Any] = {
        "id": str(raw["id"]),
        "properties": {n: from_wire(props.get(n), kind) for n, kind in PROPERTIES[obj].items()},
        "createdAt": raw.get("createdAt"),
        "updatedAt": raw.get("updatedAt"),
        "archived": bool(raw.get("archived", False)),
    }
    if obj in ASSOCIATIONS:
        out["associations"] = {"companies": None if company is _UNSET else company}
    return out


def _primary_v3(raw: dict[str, Any]) -> str | None:
    """The primary company of a v3 record's ``associations`` (else its first company)."""
    results = (((raw.get("associations") or {}).get("companies") or {}).get("results")) or []
    results = [r for r in results if isinstance(r, dict) and r.get("id") is not None]
    primary = next((r for r in results if r.get("type") == "contact_to_company"), None)
    chosen = primary or (results[0] if results else None)
    return None if chosen is None else str(chosen["id"])


def _primary_v4(to: Any) -> str | None:
    """The primary company of a v4 association read (else the first one)."""
    targets = [t for t in to or () if isinstance(t, dict) and t.get("toObjectId") is not None]
    for t in targets:
        if any(a.get("typeId") == PRIMARY_TYPE for a in t.get("associationTypes") or ()):
            return str(t["toObjectId"])
    return str(targets[0]["toObjectId"]) if targets else None


def from_wire(value: Any, kind: str) -> Any:
    """A property value as read (a string on the wire) in its field's type; a value that
    does not read as its type is passed on as it is (the snapshot flags the record)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        return value
    try:
        if kind == "integer":
            number = float(value)
            return int(number) if number.is_integer() else value
        if kind == "float":
            return float(value)
    except ValueError:
        return value
    if kind == "boolean":
        return {"true": True, "false": False}.get(value.strip().lower(), value)
    return value


def to_wire(value: Any) -> str:
    """A value as HubSpot takes it: a string (numbers and booleans too); empty clears."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return repr(value)
    return str(value)


def _text(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def _wire_properties(obj: str, values: Any) -> dict[str, str]:
    """The ``properties.*`` of flat values, as strings."""
    return {
        key.removeprefix("properties."): to_wire(value)
        for key, value in values.items()
        if key.startswith("properties.") and key.removeprefix("properties.") in PROPERTIES[obj]
    }


def _create_input(obj: str, values: Any) -> dict[str, Any]:
    """A create: its set properties, and a contact's company as its primary association."""
    props = {k: v for k, v in _wire_properties(obj, values).items() if v != ""}
    item: dict[str, Any] = {"properties": props}
    company = _text(values.get("associations.companies")) if obj in ASSOCIATIONS else None
    if company is not None:
        item["associations"] = [
            {
                "to": {"id": company},
                "types": [
                    {"associationCategory": "HUBSPOT_DEFINED", "associationTypeId": PRIMARY_TYPE}
                ],
            }
        ]
    return item


def _filter(prop: str, op: str, value: int) -> dict[str, Any]:
    return {"propertyName": prop, "operator": op, "value": str(value)}


# -- time ------------------------------------------------------------------------------------
def _epoch_ms(moment: datetime) -> int:
    """A moment as HubSpot's search takes it (epoch milliseconds, rounded down)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def _instant(value: Any) -> datetime | None:
    """A time as HubSpot or a snapshot writes it (ISO, with a space or a T; epoch ms)."""
    text = str(value).strip()
    if text.isdigit():
        return datetime.fromtimestamp(int(text) / 1000, UTC)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _same_instant(a: Any, b: Any) -> bool:
    x, y = _instant(a), _instant(b)
    return x == y if x is not None and y is not None else str(a) == str(b)


def _modified_ms(raw: dict[str, Any], prop: str) -> int:
    value = (raw.get("properties") or {}).get(prop) or raw.get("updatedAt")
    moment = _instant(value)
    if moment is None:
        raise CrmProtocolError(SYSTEM, "search", f"record without a readable {prop}")
    return _epoch_ms(moment)


__all__ = ["BATCH_SIZE", "CrmDuplicate", "CrmError", "HubSpotClient"]
