"""Both CRMs as in-memory record stores with the methods the sync calls on their clients.

For property-based tests of the whole engine (``sync_once``) without HTTP: a
history of thousands of edits and sync runs takes seconds. Each store applies a
write the way its embedded service does (``crm_assets/custom_crm/server.py``,
``crm_assets/crm_office/server.py``): the same pydantic models validate the
bodies (so the same 422 field errors), the same ``If-Match`` rules answer 412,
Custom CRM deletes softly and honours ``Idempotency-Key``, CRMOffice deletes
hard (detaching a deleted company's contacts) and answers batches per item.
Listing is ordered by (modification time, id); every write takes the next tick
of a clock the two stores share, so modification times strictly increase and
"newer" means the same on both sides. A store can run its clock off by an offset
(:meth:`MemoryCrm.set_clock_offset`, a CRM whose clock is wrong): it stamps its
writes with the shared clock plus the offset and its client's ``clock_offset()``
says so, as a CRM's ``Date`` header would; :attr:`MemoryCrm.real_times` keeps the
shared clock's moment of each record's last write (the truth "newer" is judged by).
:func:`host_clock` makes the shared clock the sync host's clock too, so "the CRM's
now" the sync computes (its own now plus the offset) is the store's.

Stores are safe to share between threads (one lock per store, one for the clock):
:meth:`MemoryCrm.client` hands out another client of the same store, with its own
call counts, faults and hooks, as a second sync process would have.

Bodies travel through ``json`` on the way in and out, as they would over HTTP.
The stores subclass the real client classes (the sync checks for them) and
override every method the sync calls; nothing of the HTTP clients runs.
A one-shot fault queue (:meth:`MemoryCrm.fail_next`) makes the next calls fail
before or after their work is done, as a lost answer would.
"""

from __future__ import annotations

import contextlib
import copy
import json
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, ValidationError

from crm_assets.crm_office import server as office_server
from crm_assets.crm_office.client import CrmOfficeClient
from crm_assets.custom_crm import server as custom_server
from crm_assets.custom_crm.client import CustomCrmClient
from crm_assets.embedded.errors import ApiError, ApiValidationError, field_errors
from crm_assets.http import (
    CrmConflict,
    CrmNotFound,
    CrmUnavailable,
    CrmValidationError,
)

STAMP = "%Y-%m-%dT%H:%M:%S.%fZ"


class SimClock:
    """Simulated UTC time shared by both stores: every write takes a later moment."""

    def __init__(
        self,
        start: datetime = datetime(2024, 1, 1, tzinfo=UTC),
        step: timedelta = timedelta(seconds=1),
    ) -> None:
        self.now = start
        self.step = step
        self.lock = threading.Lock()

    def tick(self) -> datetime:
        """The moment of the next write."""
        with self.lock:
            self.now += self.step
            return self.now

    def next(self) -> str:
        return self.tick().strftime(STAMP)

    def advance(self, delta: timedelta) -> None:
        self.now += delta


class _HostDatetime(datetime):
    """``datetime`` whose ``now()`` is a :class:`SimClock`'s (see :func:`host_clock`)."""

    clock: SimClock | None = None

    @classmethod
    def now(cls, tz: Any = None) -> datetime:  # type: ignore[override]
        clock = _HostDatetime.clock
        if clock is None:
            return datetime.now(tz)
        return clock.now if tz is None else clock.now.astimezone(tz)


@contextlib.contextmanager
def host_clock(clock: SimClock) -> Iterator[None]:
    """The sync host's clock is ``clock`` while inside: where a snapshot read works out the
    CRM's now (our now plus the CRM's measured offset, ``crm_assets.sync.snapshots``), so
    a cursor is capped at the in-memory store's now, not at today's date (the stores'
    clock starts in 2024: every record would look long past, and a store whose clock
    went back would have its later writes skipped behind a cursor stamped ahead)."""
    from crm_assets.sync import snapshots

    previous = (snapshots.datetime, _HostDatetime.clock)
    snapshots.datetime, _HostDatetime.clock = _HostDatetime, clock  # type: ignore[misc]
    try:
        yield
    finally:
        snapshots.datetime, _HostDatetime.clock = previous  # type: ignore[misc]


def _wire(value: Any) -> Any:
    """What the other end of an HTTP call would see: a JSON round trip."""
    return json.loads(json.dumps(value))


@dataclass
class Fault:
    """One injected failure: ``before`` the work (nothing happened) or ``after`` it (lost answer)."""

    when: str  # "before" | "after"
    status: int | None = 503


@dataclass
class WriteLog:
    """Who made which record, for duplicate accounting."""

    created: list[tuple[str, str, str]] = field(default_factory=list)  # actor, obj, id


class MemoryCrm:
    """What both in-memory CRMs share: records per object, clock, faults, call counts."""

    system = ""
    objects: tuple[str, ...] = ()
    id_field = ""
    modified_field = ""

    def __init__(self, clock: SimClock) -> None:
        self.clock = clock
        self.records: dict[str, dict[str, dict[str, Any]]] = {o: {} for o in self.objects}
        #: obj -> id -> the shared clock's moment of the record's last write (no offset)
        self.real_times: dict[str, dict[str, datetime]] = {o: {} for o in self.objects}
        #: the store's clock minus the shared one; None: never set (``clock_offset()`` None)
        self.offset: timedelta | None = None
        self.lock = threading.RLock()  # one per store, shared by its clients
        self.calls: Counter[str] = Counter()
        self.faults: list[Fault] = []
        self.log = WriteLog()
        self.actor = "sync"  # who the next writes are attributed to ("user" in test setup)
        #: called before the sync writes a record: (method, obj, record id), per updated item
        #: of a batch too; a test hook for edits that race the sync (made after its snapshot,
        #: before its write)
        self.before_write: Callable[[str, str, str | None], None] | None = None

    # -- plumbing ---------------------------------------------------------------------------
    def clock_offset(self) -> float | None:
        """The store's clock minus the shared one, as a CRM's ``Date`` header shows it; None
        until :meth:`set_clock_offset` (one clock: the stores' and the sync's agree)."""
        offset = self._store().offset
        return None if offset is None else offset.total_seconds()

    def set_clock_offset(self, seconds: float) -> None:
        """Run the store's clock ``seconds`` off the shared one from now on (its clients too)."""
        self._store().offset = timedelta(seconds=seconds)

    def _store(self) -> MemoryCrm:
        """The client that owns the store's clock setting (itself, or the one it came from)."""
        return getattr(self, "_origin", None) or self

    def _stamp(self, obj: str, record_id: str) -> str:
        """A write's modification time: the shared clock's next moment plus the offset."""
        moment = self.clock.tick()
        self.real_times[obj][record_id] = moment
        return (moment + (self._store().offset or timedelta(0))).strftime(STAMP)

    def client(self) -> MemoryCrm:
        """Another client of the same store (records, counters, clock and lock shared),
        with its own call counts, faults and hooks: what a second sync process holds."""
        twin = copy.copy(self)
        twin._origin = self._store()  # type: ignore[attr-defined]
        twin.calls, twin.faults, twin.actor, twin.before_write = Counter(), [], "sync", None
        return twin

    def close(self) -> None:
        return None

    def __enter__(self) -> MemoryCrm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fail_next(self, *faults: Fault) -> None:
        """Queue faults for the next calls by the sync (one call each)."""
        self.faults.extend(faults)

    def _call(
        self,
        name: str,
        work: Callable[[], Any],
        record_id: str | None = None,
        touched: Iterable[Any] = (),
    ) -> Any:
        with self.lock:
            return self._locked_call(name, work, record_id, touched)

    def _locked_call(
        self,
        name: str,
        work: Callable[[], Any],
        record_id: str | None,
        touched: Iterable[Any],
    ) -> Any:
        self.calls[name] += 1
        method, _, obj = name.partition(" ")
        if self.actor == "sync" and method != "GET" and self.before_write is not None:
            for rid in [record_id, *touched]:
                if isinstance(rid, str) and self.before_write is not None:
                    self.before_write(
                        "BATCH" if obj.endswith("/batch") else method, obj.split("/")[0], rid
                    )
        fault = self.faults.pop(0) if self.faults and self.actor == "sync" else None
        if fault is not None and fault.when == "before":
            raise CrmUnavailable(self.system, name, f"HTTP {fault.status}: injected", fault.status)
        try:
            result = work()
        except ApiValidationError as exc:
            detail = "; ".join(f"{e.get('field')}: {e.get('message')}" for e in exc.errors[:5])
            raise CrmValidationError(
                self.system, name, f"HTTP 422: {detail}", 422, list(exc.errors)
            ) from None
        except ApiError as exc:
            if exc.status == 404:
                raise CrmNotFound(self.system, name, "HTTP 404: not found", 404) from None
            if exc.status == 412:
                raise CrmConflict(
                    self.system, name, "HTTP 412: the record changed since it was read", 412
                ) from None
            raise CrmValidationError(
                self.system, name, f"HTTP {exc.status}", exc.status, []
            ) from None
        if fault is not None:  # the work is done, the answer lost
            error = CrmUnavailable(
                self.system, name, f"HTTP {fault.status}: injected", fault.status
            )
            error.maybe_applied = True
            raise error
        return _wire(result)

    def _listing(
        self, obj: str, since: datetime | None, include: Callable[[dict[str, Any]], bool]
    ) -> list[dict[str, Any]]:
        floor = since.astimezone(UTC).strftime(STAMP) if since is not None else None
        with self.lock:  # a copy, as the wire would hand it over
            rows = [
                r
                for r in self.records[obj].values()
                if include(r) and (floor is None or r[self.modified_field] >= floor)
            ]
            rows.sort(key=lambda r: (r[self.modified_field], r[self.id_field]))
            return _wire(rows)

    # -- the test's view ---------------------------------------------------------------------
    def live(self, obj: str) -> dict[str, dict[str, Any]]:
        with self.lock:
            return {
                k: copy.deepcopy(v) for k, v in self.records[obj].items() if not v.get("Deleted")
            }

    def as_user(self) -> _Actor:
        """``with crm.as_user(): ...``: writes made as a person, not the sync."""
        return _Actor(self, "user")


class _Actor:
    def __init__(self, crm: MemoryCrm, actor: str) -> None:
        self.crm, self.actor, self.previous = crm, actor, crm.actor

    def __enter__(self) -> MemoryCrm:
        self.previous, self.crm.actor = self.crm.actor, self.actor
        return self.crm

    def __exit__(self, *exc: object) -> None:
        self.crm.actor = self.previous


def _validate(model: type[BaseModel], body: Any, fields_set: bool = False) -> dict[str, Any]:
    try:
        parsed = model.model_validate(body)
    except ValidationError as exc:
        raise ApiValidationError(field_errors(exc.errors())) from None
    return parsed.model_dump(include=parsed.model_fields_set) if fields_set else parsed.model_dump()


def _noun(obj: str) -> str:
    return "company" if obj == "companies" else obj[:-1]


def _check_version(wanted: int | str | None, version: int, name: str) -> None:
    if wanted is not None and wanted != "*" and wanted != version:
        raise ApiError(412, "precondition_failed", f"{name} is {version}, not {wanted}")


class MemoryCustomCrm(MemoryCrm, CustomCrmClient):
    """Custom CRM: PascalCase, keyset-ordered listing, soft deletes, idempotent creates."""

    system = "Custom CRM"
    objects = custom_server.OBJECTS
    id_field = "Id"
    modified_field = "Modified"

    def __init__(self, clock: SimClock) -> None:
        super().__init__(clock)
        self.counters: Counter[str] = Counter()
        self.idempotency: dict[tuple[str, str], str] = {}

    def pages(
        self,
        obj: str,
        since: datetime | None = None,
        size: int | None = None,
        include_deleted: bool = True,
    ) -> Iterator[list[dict[str, Any]]]:
        self.calls[f"GET {obj}"] += 1
        rows = self._listing(obj, since, lambda r: include_deleted or not r["Deleted"])
        limit = size or 500
        for start in range(0, max(len(rows), 1), limit):
            yield rows[start : start + limit]

    def get(self, obj: str, record_id: str) -> dict[str, Any]:
        def work() -> dict[str, Any]:
            row = self.records[obj].get(record_id)
            if row is None:
                raise ApiError(404, "not_found", f"no {obj[:-1]} with Id {record_id!r}")
            return row

        return self._call(f"GET {obj}", work, record_id)

    def _check_refs(self, obj: str, doc: dict[str, Any]) -> None:
        product_id = doc.get("ProductId")
        if (
            obj == "contacts"
            and product_id is not None
            and product_id not in self.records["products"]
        ):
            raise ApiValidationError.one("ProductId", f"no product with Id {product_id!r}")

    def create(
        self, obj: str, record: dict[str, Any], idempotency_key: str | None = None
    ) -> dict[str, Any]:
        spec = custom_server._SPECS[obj]

        def work() -> dict[str, Any]:
            if idempotency_key and (obj, idempotency_key) in self.idempotency:
                return self.records[obj][self.idempotency[(obj, idempotency_key)]]
            values = _validate(spec["create"], _wire(record))
            self._check_refs(obj, values)
            self.counters[obj] += 1
            record_id = custom_server.custom_id(spec["prefix"], self.counters[obj])
            now = self._stamp(obj, record_id)
            doc = {"Id": record_id, **{f: values.get(f) for f in spec["fields"]}}
            doc.update(Created=now, Modified=now, Version=1, Deleted=False)
            self.records[obj][record_id] = doc
            if idempotency_key:
                self.idempotency[(obj, idempotency_key)] = record_id
            self.log.created.append((self.actor, obj, record_id))
            return doc

        return self._call(f"POST {obj}", work)

    def update(
        self, obj: str, record_id: str, changes: dict[str, Any], version: int | None = None
    ) -> dict[str, Any]:
        spec = custom_server._SPECS[obj]

        def work() -> dict[str, Any]:
            values = _validate(spec["patch"], _wire(changes), fields_set=True)
            row = self.records[obj].get(record_id)
            if row is None or row["Deleted"]:
                raise ApiError(404, "not_found", f"no {obj[:-1]} with Id {record_id!r}")
            _check_version(version, row["Version"], "Version")
            self._check_refs(obj, values)
            row.update(values)
            row.update(Modified=self._stamp(obj, record_id), Version=row["Version"] + 1)
            return row

        return self._call(f"PATCH {obj}", work, record_id)

    def delete(self, obj: str, record_id: str) -> None:
        def work() -> None:
            row = self.records[obj].get(record_id)
            if row is None:
                raise ApiError(404, "not_found", f"no {obj[:-1]} with Id {record_id!r}")
            if not row["Deleted"]:
                row.update(
                    Modified=self._stamp(obj, record_id), Version=row["Version"] + 1, Deleted=True
                )

        self._call(f"DELETE {obj}", work, record_id)


class MemoryCrmOffice(MemoryCrm, CrmOfficeClient):
    """CRMOffice: camelCase, full replace, hard deletes, batches answered per item."""

    system = "CRMOffice"
    objects = office_server.OBJECTS
    id_field = "id"
    modified_field = "updatedAt"

    def __init__(self, clock: SimClock) -> None:
        super().__init__(clock)
        self.counters: dict[str, int] = {
            o: office_server._SPECS[o]["start"] - 1 for o in self.objects
        }
        self.item_faults = 0

    def pages(
        self, obj: str, since: datetime | None = None, size: int | None = None
    ) -> Iterator[list[dict[str, Any]]]:
        self.calls[f"GET {obj}"] += 1
        rows = self._listing(obj, since, lambda _r: True)
        take = size or 1000
        for start in range(0, max(len(rows), 1), take):
            yield rows[start : start + take]

    def get(self, obj: str, record_id: str) -> dict[str, Any]:
        def work() -> dict[str, Any]:
            row = self.records[obj].get(record_id)
            if row is None:
                raise ApiError(404, "not_found", f"no {_noun(obj)} with id {record_id!r}")
            return row

        return self._call(f"GET {obj}", work, record_id)

    def _check_refs(self, obj: str, values: dict[str, Any]) -> None:
        company = values.get("company")
        ref = company.get("id") if isinstance(company, dict) else None
        if obj == "contacts" and ref is not None and ref not in self.records["companies"]:
            raise ApiValidationError.one("company.id", f"no company with id {ref!r}")

    def _create(self, obj: str, body: Any) -> dict[str, Any]:
        spec = office_server._SPECS[obj]
        values = _validate(spec["model"], body)
        self._check_refs(obj, values)
        self.counters[obj] += 1
        record_id = office_server.office_id(self.counters[obj])
        now = self._stamp(obj, record_id)
        doc = {"id": record_id, **{f: values.get(f) for f in spec["model"].model_fields}}
        doc.update(createdAt=now, updatedAt=now, rowVersion=1)
        self.records[obj][record_id] = doc
        self.log.created.append((self.actor, obj, record_id))
        return doc

    def _replace(
        self, obj: str, record_id: str, body: Any, wanted: int | str | None
    ) -> dict[str, Any]:
        spec = office_server._SPECS[obj]
        values = _validate(spec["model"], body)
        row = self.records[obj].get(record_id)
        if row is None:
            raise ApiError(404, "not_found", f"no {_noun(obj)} with id {record_id!r}")
        _check_version(wanted, row["rowVersion"], "rowVersion")
        self._check_refs(obj, values)
        doc = {"id": record_id, **{f: values.get(f) for f in spec["model"].model_fields}}
        doc.update(
            createdAt=row["createdAt"],
            updatedAt=self._stamp(obj, record_id),
            rowVersion=row["rowVersion"] + 1,
        )
        self.records[obj][record_id] = doc
        return doc

    def create(self, obj: str, record: dict[str, Any]) -> dict[str, Any]:
        return self._call(f"POST {obj}", lambda: self._create(obj, _wire(record)))

    def replace(
        self, obj: str, record_id: str, record: dict[str, Any], row_version: str | None = None
    ) -> dict[str, Any]:
        wanted = office_server.parse_if_match(f'"{row_version}"') if row_version else None
        return self._call(
            f"PUT {obj}", lambda: self._replace(obj, record_id, _wire(record), wanted), record_id
        )

    def delete(self, obj: str, record_id: str) -> None:
        def work() -> None:
            if record_id not in self.records[obj]:
                raise ApiError(404, "not_found", f"no {_noun(obj)} with id {record_id!r}")
            del self.records[obj][record_id]
            self.real_times[obj].pop(record_id, None)
            if obj == "companies":  # its contacts lose the reference (a write)
                for contact_id, row in self.records["contacts"].items():
                    if (row.get("company") or {}).get("id") == record_id:
                        row.update(
                            company=None,
                            updatedAt=self._stamp("contacts", contact_id),
                            rowVersion=row["rowVersion"] + 1,
                        )

        self._call(f"DELETE {obj}", work, record_id)

    def fail_items(self, count: int) -> None:
        """The next ``count`` batch items fail with 500, unapplied (a partial batch failure)."""
        self.item_faults += count

    def batch(
        self,
        obj: str,
        create: list[dict[str, Any]] | None = None,
        update: list[dict[str, Any]] | None = None,
    ) -> list[dict[str, Any]]:
        create, update = create or [], update or []
        if len(create) + len(update) > office_server.MAX_BATCH:
            raise ValueError(f"a batch takes at most {office_server.MAX_BATCH} items")
        body = _wire({"create": create, "update": update})

        def one(index: int, run: Callable[[], dict[str, Any]], ok: int) -> dict[str, Any]:
            if self.item_faults > 0:
                self.item_faults -= 1
                return {"index": index, "status": 500, "error": {"message": "injected fault"}}
            try:
                return {"index": index, "status": ok, "item": copy.deepcopy(run())}
            except ApiValidationError as exc:
                return {
                    "index": index,
                    "status": 422,
                    "error": {"message": "validation failed", "errors": exc.errors},
                }
            except ApiError as exc:
                return {
                    "index": index,
                    "status": exc.status,
                    "error": {"message": exc.message, "errors": []},
                }

        def updated(item: Any) -> dict[str, Any]:
            if not isinstance(item, dict):
                raise ApiValidationError.one("body", "each item must be a JSON object")
            record_id = item.get("id")
            if not isinstance(record_id, str) or not record_id:
                raise ApiValidationError.one("id", "required: the id of the record to update")
            wanted = office_server._row_version_of(item.get("rowVersion"))
            return self._replace(obj, record_id, item, wanted)

        def work() -> list[dict[str, Any]]:
            results = [
                one(i, lambda item=item: self._create(obj, item), 201)
                for i, item in enumerate(body["create"])
            ]
            results += [
                one(len(create) + i, lambda item=item: updated(item), 200)
                for i, item in enumerate(body["update"])
            ]
            return results

        ids = [item.get("id") for item in update if isinstance(item, dict)]
        return self._call(f"POST {obj}/batch", work, touched=ids)
