"""The embedded HubSpot: the CRM v3 objects API and v4 contact → company associations.

The contract (a subset of HubSpot's, with its behaviour where it matters to a sync):

- ``Authorization: Bearer <private-app token>``; every property value is a string on the
  wire (numbers and booleans too), an empty string clears; ids are numeric strings; times
  have millisecond precision and every write gets a time of its own;
- ``GET /crm/v3/objects/{object}?limit&after&properties&archived&associations``: keyset
  paging by id (``paging.next.after``), ``limit`` at most 100, ``archived=true`` lists the
  archived records only;
- ``POST /crm/v3/objects/{object}/search``: ``filterGroups`` (OR of ANDs, at most 5 groups of
  6 filters), one sort, ``limit`` at most 200, ``after`` an offset: a query returns at most
  10,000 results, ``after`` at or past 10,000 is answered 400. Search results carry no
  associations (read them with the v4 batch read);
- ``POST /crm/v3/objects/{object}/batch/{read,create,update,archive}``: at most 100 inputs;
  per-item failures answer ``207`` with ``errors`` (``context.ids`` or
  ``context.objectWriteTraceId``); a contact create whose e-mail an existing contact has
  answers ``409`` ``CONFLICT`` "Contact already exists. Existing ID: <id>" for the whole
  batch, nothing created;
- ``DELETE`` archives (``archived: true``, ``archivedAt``); archived records are not found
  except with ``archived=true``, and free their e-mail;
- v4: ``PUT .../contacts/{id}/associations/default/companies/{companyId}``,
  ``DELETE .../contacts/{id}/associations/companies/{companyId}``,
  ``GET .../contacts/{id}/associations/companies`` and
  ``POST /crm/v4/associations/contacts/companies/batch/read``. A contact's primary company
  is also its ``associatedcompanyid`` property: changing it moves ``lastmodifieddate``.

Errors are ``{"status": "error", "message", "correlationId", "category"}``. Handlers parse
their own input (no FastAPI validation), so every error of these routes has that shape; 401,
413 and 429 come from the shared middleware in its own shape.
"""

# No ``from __future__ import annotations``: FastAPI resolves the route annotations.

import hmac
import json
import math
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from email_validator import EmailNotValidError, validate_email
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from crm_assets.embedded.middleware import Faults
from crm_assets.embedded.records import fetch, insert, row_values, update
from crm_assets.embedded.store import Store, format_us
from crm_assets.hubspot.fields import MODIFIED_PROPERTY, PROPERTIES
from crm_assets.hubspot.seed import ID_START, hubspot_id

SYSTEM = "hubspot"
OBJECTS = ("contacts", "companies", "products")
DB_FILE = "hubspot.sqlite"
LIST_MAX = 100
LIST_DEFAULT = 10
SEARCH_MAX = 200
SEARCH_DEFAULT = 10
#: A search returns at most this many results: ``after`` at or past it is answered 400.
SEARCH_CAP = 10_000
BATCH_MAX = 100
MAX_GROUPS, MAX_FILTERS = 5, 6
MAX_VALUE_LENGTH = 65_536
PRIMARY_TYPE, UNLABELED_TYPE = 1, 279
NOUN = {"contacts": "CONTACT", "companies": "COMPANY", "products": "PRODUCT"}

#: Properties HubSpot manages (readable, searchable, never written), per object.
READ_ONLY = {
    obj: {"hs_object_id": "number", "createdate": "datetime", MODIFIED_PROPERTY[obj]: "datetime"}
    | ({"associatedcompanyid": "number"} if obj == "contacts" else {})
    for obj in OBJECTS
}
#: What a read without ``properties=`` returns.
DEFAULT_PROPERTIES = {
    "contacts": ["firstname", "lastname", "email"],
    "companies": ["name", "domain"],
    "products": ["name", "description", "price"],
}


def _kind(obj: str, name: str) -> str | None:
    """A property's kind for validation and search: string, number, boolean, datetime."""
    if name in READ_ONLY[obj]:
        return READ_ONLY[obj][name]
    kind = PROPERTIES[obj].get(name)
    return {"integer": "number", "float": "number"}.get(kind, kind) if kind else None


class HubSpotError(Exception):
    """An error answered in HubSpot's shape."""

    def __init__(
        self, status: int, category: str, message: str, context: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.category, self.message, self.context = status, category, message, context

    def body(self) -> dict[str, Any]:
        return error_body(self.category, self.message, self.context)


def error_body(category: str, message: str, context: dict[str, Any] | None = None) -> dict:
    out = {
        "status": "error",
        "message": message,
        "correlationId": str(uuid.uuid4()),
        "category": category,
    }
    if context:
        out["context"] = context
    return out


def _invalid(message: str) -> HubSpotError:
    return HubSpotError(400, "VALIDATION_ERROR", message)


def _not_found(obj: str, record_id: str) -> HubSpotError:
    return HubSpotError(404, "OBJECT_NOT_FOUND", f"resource not found: {NOUN[obj]} {record_id}")


def token_check(token: str) -> Callable[[str | None], str | None]:
    """The authentication rule: exactly the configured private-app token (constant time)."""
    expected = token.encode()

    def check(given: str | None) -> str | None:
        if given is None:
            return "Authentication credentials not found: send a private app access token"
        if not hmac.compare_digest(given.encode(), expected):
            return "The access token provided is invalid"
        return None

    return check


# -- time --------------------------------------------------------------------------------------
def ms_text(us_text: str) -> str:
    """A stored fixed-width microsecond stamp as HubSpot writes it (milliseconds)."""
    return us_text[:23] + "Z"


def us_text(ms: str) -> str:
    """A millisecond stamp (``...SS.fffZ``) as the stored fixed-width microsecond form."""
    return ms[:23] + "000Z"


def _stamp(store: Store) -> str:
    """The next write's time, in milliseconds and never shared by two writes (HubSpot's
    versions are their ``updatedAt``: two writes in one millisecond would look like one)."""
    us = store.clock.next_us()
    whole = -(-us // 1000) * 1000
    store.clock.advance_to(whole + 999)
    return ms_text(format_us(whole))


#: Times a filter can name: from the epoch to the end of year 9999.
_YEAR_10000_US = 253_402_300_800 * 1_000_000


def _epoch_us(text: str) -> int:
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    delta = parsed - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _now_text(store: Store) -> str:
    return store.service_clock.now().isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- records -----------------------------------------------------------------------------------
def _primary(doc: dict[str, Any]) -> str | None:
    return next((c["id"] for c in doc.get("companies") or () if c.get("primary")), None)


def prop_value(doc: dict[str, Any], obj: str, name: str) -> str | None:
    """A property's value as the API shows it (a string, or None when unset)."""
    if name == "hs_object_id":
        return str(doc["id"])
    if name == "createdate":
        return str(doc["createdAt"])
    if name == MODIFIED_PROPERTY[obj]:
        return str(doc["updatedAt"])
    if name == "associatedcompanyid":
        return _primary(doc)
    value = doc["properties"].get(name)
    return None if value is None else str(value)


def render(
    doc: dict[str, Any], obj: str, props: Iterable[str] | None, associations: bool = False
) -> dict[str, Any]:
    """A stored record as the API returns it: the asked properties (and the managed ones)."""
    names = list(DEFAULT_PROPERTIES[obj] if props is None else props)
    names += ["createdate", MODIFIED_PROPERTY[obj], "hs_object_id"]
    shown = {n: prop_value(doc, obj, n) for n in dict.fromkeys(names) if _kind(obj, n)}
    out: dict[str, Any] = {
        "id": doc["id"],
        "properties": shown,
        "createdAt": doc["createdAt"],
        "updatedAt": doc["updatedAt"],
        "archived": bool(doc.get("archived")),
    }
    if doc.get("archived"):
        out["archivedAt"] = doc.get("archivedAt")
    if associations and obj == "contacts" and doc.get("companies"):
        results = []
        for company in doc["companies"]:
            if company.get("primary"):
                results.append({"id": company["id"], "type": "contact_to_company"})
            results.append({"id": company["id"], "type": "contact_to_company_unlabeled"})
        out["associations"] = {"companies": {"results": results}}
    return out


def _association_types(primary: bool) -> list[dict[str, Any]]:
    unlabeled = {"category": "HUBSPOT_DEFINED", "typeId": UNLABELED_TYPE, "label": None}
    if primary:
        return [
            {"category": "HUBSPOT_DEFINED", "typeId": PRIMARY_TYPE, "label": "Primary"},
            unlabeled,
        ]
    return [unlabeled]


def _row(doc: dict[str, Any], version: int) -> dict[str, Any]:
    return row_values(
        doc,
        record_id=doc["id"],
        modified=us_text(doc["updatedAt"]),
        version=version,
        deleted=bool(doc.get("archived")),
        ref=_primary(doc),
    )


def seed(store: Store, records: dict[str, list[dict[str, Any]]]) -> None:
    """Insert generated demo records and move the id counters past them."""
    with store.write() as conn:
        for obj in OBJECTS:
            docs = records.get(obj, [])
            store.bulk_insert(conn, obj, (_row(doc, 1) for doc in docs))
            if docs:
                store.set_counter(conn, obj, ID_START[obj] + len(docs) - 1)


def prepare(store: Store) -> None:
    """The e-mail index unique contacts are looked up by (idempotent)."""
    with store.write() as conn:
        conn.exec_driver_sql(
            "CREATE INDEX IF NOT EXISTS ix_contacts_email "
            "ON contacts (json_extract(doc, '$.properties.email'))"
        )


# -- input -------------------------------------------------------------------------------------
def _property_error(name: str, message: str, error: str) -> dict[str, Any]:
    return {"isValid": False, "message": message, "error": error, "name": name}


def validate_properties(obj: str, props: Any) -> dict[str, str | None]:
    """Written properties as stored (``None`` clears); HubSpot's 400 when any is not valid."""
    if not isinstance(props, dict):
        raise _invalid("'properties' must be an object of property names to string values")
    errors, out = [], {}
    for name, value in props.items():
        kind = PROPERTIES[obj].get(name)
        if kind is None:
            if name in READ_ONLY[obj]:
                errors.append(
                    _property_error(name, f"{name} is a read only property", "READ_ONLY_VALUE")
                )
            else:
                errors.append(
                    _property_error(
                        name, f'Property "{name}" does not exist', "PROPERTY_DOESNT_EXIST"
                    )
                )
            continue
        if value is None or value == "":
            out[name] = None
            continue
        if not isinstance(value, str):
            errors.append(
                _property_error(
                    name,
                    f"{json.dumps(value)} is not a string: values are sent as strings",
                    "INVALID_TYPE",
                )
            )
            continue
        if len(value) > MAX_VALUE_LENGTH:
            errors.append(
                _property_error(name, f"longer than {MAX_VALUE_LENGTH} characters", "TOO_LONG")
            )
            continue
        problem = _check_value(obj, name, kind, value)
        if problem:
            errors.append(_property_error(name, problem[0], problem[1]))
            continue
        if kind == "boolean" or (obj == "contacts" and name == "email"):
            value = value.strip().lower()
        out[name] = value
    if errors:
        raise _invalid(f"Property values were not valid: {json.dumps(errors)}")
    return out


def _check_value(obj: str, name: str, kind: str, value: str) -> tuple[str, str] | None:
    if kind in ("integer", "float"):
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            return f"{value!r} is not a valid number", "INVALID_FLOAT"
    elif kind == "boolean" and value.strip().lower() not in ("true", "false"):
        return f"{value!r} is not a valid boolean: 'true' or 'false'", "INVALID_BOOLEAN"
    elif obj == "contacts" and name == "email":
        try:
            validate_email(value.strip(), check_deliverability=False)
        except EmailNotValidError:
            return f"Email address {value} is invalid", "INVALID_EMAIL"
    return None


def _inputs(body: Any) -> list[Any]:
    inputs = body.get("inputs") if isinstance(body, dict) else None
    if not isinstance(inputs, list):
        raise _invalid("'inputs' must be a list")
    if len(inputs) > BATCH_MAX:
        raise _invalid(f"at most {BATCH_MAX} inputs per batch, got {len(inputs)}")
    return inputs


def _id_of(item: Any) -> str:
    record_id = item.get("id") if isinstance(item, dict) else None
    if isinstance(record_id, int) and not isinstance(record_id, bool):
        record_id = str(record_id)
    if not isinstance(record_id, str) or not record_id:
        raise _invalid("each input needs an 'id'")
    return record_id


def _names(value: Any, where: str) -> list[str] | None:
    """``properties`` as a query (comma-separated, repeated) or body list; None: not given."""
    if value is None:
        return None
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) for v in items):
        raise _invalid(f"'{where}' must be property names")
    return [n.strip() for v in items for n in v.split(",") if n.strip()]


def _int_param(raw: Any, name: str, default: int, low: int, high: int) -> int:
    if raw is None:
        return default
    if isinstance(raw, bool) or not (isinstance(raw, int) or str(raw).strip().isdigit()):
        raise _invalid(f"'{name}' must be an integer between {low} and {high}")
    value = int(raw)
    if not low <= value <= high:
        raise _invalid(f"'{name}' must be between {low} and {high}, got {value}")
    return value


# -- search ------------------------------------------------------------------------------------
OPERATORS = {
    "EQ",
    "NEQ",
    "LT",
    "LTE",
    "GT",
    "GTE",
    "BETWEEN",
    "IN",
    "NOT_IN",
    "HAS_PROPERTY",
    "NOT_HAS_PROPERTY",
}


@dataclass(frozen=True)
class Filter:
    prop: str
    kind: str
    op: str
    value: Any = None
    high: Any = None
    values: tuple[Any, ...] = ()


def _typed(kind: str, raw: Any, prop: str) -> Any:
    """A filter value (or a stored one) in the kind's comparable form."""
    text = str(raw).strip()
    try:
        if kind == "datetime":
            us = int(text) * 1000 if re.fullmatch(r"-?\d+", text) else _epoch_us(text)
            if not 0 <= us < _YEAR_10000_US:
                raise ValueError("out of range")
            return us
        if kind == "number":
            return float(text)
    except ValueError:
        raise _invalid(f"{raw!r} is not a valid value for {prop} ({kind})") from None
    return text.lower()


def parse_filters(obj: str, groups: Any) -> list[list[Filter]]:
    if groups is None:
        return []
    if not isinstance(groups, list) or len(groups) > MAX_GROUPS:
        raise _invalid(f"'filterGroups' must be a list of at most {MAX_GROUPS} groups")
    out = []
    for group in groups:
        filters = group.get("filters") if isinstance(group, dict) else None
        if not isinstance(filters, list) or not filters or len(filters) > MAX_FILTERS:
            raise _invalid(f"each filter group needs 1 to {MAX_FILTERS} 'filters'")
        parsed = []
        for f in filters:
            if not isinstance(f, dict):
                raise _invalid("each filter must be an object")
            prop, op = f.get("propertyName"), f.get("operator")
            kind = _kind(obj, prop) if isinstance(prop, str) else None
            if kind is None:
                raise _invalid(f"unknown property in filter: {prop!r}")
            if not isinstance(op, str) or op not in OPERATORS:
                raise _invalid(f"unknown filter operator {op!r}")
            if op in ("HAS_PROPERTY", "NOT_HAS_PROPERTY"):
                parsed.append(Filter(prop, kind, op))
            elif op in ("IN", "NOT_IN"):
                values = f.get("values")
                if not isinstance(values, list) or not values:
                    raise _invalid(f"{op} needs 'values'")
                parsed.append(
                    Filter(prop, kind, op, values=tuple(_typed(kind, v, prop) for v in values))
                )
            else:
                if f.get("value") is None:
                    raise _invalid(f"{op} needs a 'value'")
                high = None
                if op == "BETWEEN":
                    if f.get("highValue") is None:
                        raise _invalid("BETWEEN needs a 'highValue'")
                    high = _typed(kind, f["highValue"], prop)
                parsed.append(Filter(prop, kind, op, _typed(kind, f["value"], prop), high))
        out.append(parsed)
    return out


def _matches(doc: dict[str, Any], obj: str, f: Filter) -> bool:
    raw = prop_value(doc, obj, f.prop)
    if f.op == "HAS_PROPERTY":
        return raw is not None
    if f.op == "NOT_HAS_PROPERTY":
        return raw is None
    if raw is None:
        return f.op in ("NEQ", "NOT_IN")
    value = _typed(f.kind, raw, f.prop)
    return {
        "EQ": lambda: value == f.value,
        "NEQ": lambda: value != f.value,
        "LT": lambda: value < f.value,
        "LTE": lambda: value <= f.value,
        "GT": lambda: value > f.value,
        "GTE": lambda: value >= f.value,
        "BETWEEN": lambda: f.value <= value <= f.high,
        "IN": lambda: value in f.values,
        "NOT_IN": lambda: value not in f.values,
    }[f.op]()


def parse_sort(obj: str, sorts: Any) -> tuple[str, bool] | None:
    """``(property, descending)`` of the one sort allowed, or None."""
    if sorts in (None, []):
        return None
    if not isinstance(sorts, list) or len(sorts) != 1:
        raise _invalid("'sorts' takes one sort")
    (sort,) = sorts
    if isinstance(sort, str):
        prop, descending = sort.lstrip("-"), sort.startswith("-")
    elif isinstance(sort, dict):
        prop, direction = sort.get("propertyName"), sort.get("direction", "ASCENDING")
        if direction not in ("ASCENDING", "DESCENDING"):
            raise _invalid("sort direction must be ASCENDING or DESCENDING")
        descending = direction == "DESCENDING"
    else:
        raise _invalid("a sort is a property name or {propertyName, direction}")
    if not isinstance(prop, str) or _kind(obj, prop) is None:
        raise _invalid(f"unknown sort property {prop!r}")
    return prop, descending


# -- routes ------------------------------------------------------------------------------------
def _json(content: Any, status: int = 200) -> Response:
    return JSONResponse(content, status_code=status)


def _openapi(path: str, body: bool) -> dict[str, Any]:
    params = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in re.findall(r"{(\w+)}", path)
    ]
    extra: dict[str, Any] = {"parameters": params}
    if body:
        extra["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    return extra


Handler = Callable[[dict[str, str], Any, Any], Response]


def _add(
    router: APIRouter, method: str, path: str, handler: Handler, summary: str, tag: str
) -> None:
    """A route whose handler gets (path params, query params, parsed JSON body), in a thread."""
    takes_body = method in ("POST", "PUT", "PATCH") and "/associations/default/" not in path

    async def endpoint(request: Request) -> Response:
        body = None
        if takes_body:
            raw = await request.body()
            try:
                body = json.loads(raw) if raw else None
            except (ValueError, UnicodeDecodeError) as exc:
                error = _invalid(f"Invalid input JSON: {exc}")
                return _json(error.body(), error.status)
        return await run_in_threadpool(
            handler, dict(request.path_params), request.query_params, body
        )

    router.add_api_route(
        path,
        endpoint,
        methods=[method],
        tags=[tag],
        summary=summary,
        openapi_extra=_openapi(path, takes_body),
    )


def build_router(store: Store, faults: Faults) -> APIRouter:
    router = APIRouter()
    for obj in OBJECTS:
        _Objects(store, faults, obj).add_routes(router)
    _Associations(store).add_routes(router)
    return router


class _Objects:
    """The v3 routes of one object."""

    def __init__(self, store: Store, faults: Faults, obj: str) -> None:
        self.store, self.faults, self.obj = store, faults, obj
        self.table = store.tables[obj]
        self.contacts = store.tables["contacts"]

    def add_routes(self, router: APIRouter) -> None:
        base, tag = f"/crm/v3/objects/{self.obj}", self.obj.capitalize()
        _add(router, "GET", base, self.list_records, f"List {self.obj}", tag)
        _add(router, "POST", f"{base}/search", self.search, f"Search {self.obj}", tag)
        _add(router, "POST", f"{base}/batch/read", self.batch_read, "Read a batch", tag)
        _add(router, "POST", f"{base}/batch/create", self.batch_create, "Create a batch", tag)
        _add(router, "POST", f"{base}/batch/update", self.batch_update, "Update a batch", tag)
        _add(router, "POST", f"{base}/batch/archive", self.batch_archive, "Archive a batch", tag)
        _add(router, "POST", base, self.create_one, "Create", tag)
        _add(router, "GET", f"{base}/{{recordId}}", self.get_one, "Read", tag)
        _add(router, "PATCH", f"{base}/{{recordId}}", self.update_one, "Update", tag)
        _add(router, "DELETE", f"{base}/{{recordId}}", self.archive_one, "Archive", tag)

    # -- helpers --------------------------------------------------------------------------
    def _load(self, conn: Any, record_id: str, archived: bool = False) -> tuple[dict, int] | None:
        row = fetch(conn, self.table, record_id)
        if row is None or bool(row.deleted) != archived:
            return None
        return json.loads(row.doc), row.version

    def _save(self, conn: Any, doc: dict[str, Any], version: int, new: bool = False) -> None:
        (insert if new else update)(conn, self.table, _row(doc, version))

    def _email_owner(self, conn: Any, email: str | None, exclude: str | None = None) -> str | None:
        if self.obj != "contacts" or not email:
            return None
        found = conn.exec_driver_sql(
            "SELECT id FROM contacts WHERE json_extract(doc, '$.properties.email') = ? "
            "AND deleted = 0 AND id IS NOT ?",
            (email, exclude),
        ).first()
        return found[0] if found else None

    def _companies_of_input(self, conn: Any, item: dict[str, Any]) -> list[dict[str, Any]]:
        """A create's ``associations`` (contacts to companies only)."""
        wanted = item.get("associations") or []
        if not isinstance(wanted, list):
            raise _invalid("'associations' must be a list")
        out: list[dict[str, Any]] = []
        for assoc in wanted:
            to = assoc.get("to") if isinstance(assoc, dict) else None
            company = str(to.get("id")) if isinstance(to, dict) and to.get("id") else None
            types = assoc.get("types") if isinstance(assoc, dict) else None
            type_ids = {
                t.get("associationTypeId")
                for t in (types if isinstance(types, list) else ())
                if isinstance(t, dict) and isinstance(t.get("associationTypeId"), int)
            }
            if self.obj != "contacts" or company is None or not type_ids:
                raise _invalid("associations: only contact to company, with 'to.id' and 'types'")
            if not type_ids <= {PRIMARY_TYPE, UNLABELED_TYPE}:
                raise _invalid(f"association types {sorted(type_ids)} are not contact to company")
            row = fetch(conn, self.store.tables["companies"], company)
            if row is None or row.deleted:
                raise _invalid(f"associations: no company with id {company}")
            primary = PRIMARY_TYPE in type_ids and not any(c["primary"] for c in out)
            if all(c["id"] != company for c in out):
                out.append({"id": company, "primary": primary})
        if out and not any(c["primary"] for c in out):
            out[0]["primary"] = True
        return out

    def _new_doc(self, conn: Any, props: dict[str, str | None], companies: list) -> dict:
        number = self.store.next_id_number(conn, self.obj, start=ID_START[self.obj])
        now = _stamp(self.store)
        doc = {
            "id": hubspot_id(self.obj, number - ID_START[self.obj]),
            "properties": {k: v for k, v in props.items() if v is not None},
            "createdAt": now,
            "updatedAt": now,
            "archived": False,
        }
        if self.obj == "contacts":
            doc["companies"] = companies
        self._save(conn, doc, 1, new=True)
        return doc

    def _apply(self, conn: Any, record_id: str, props: dict[str, str | None]) -> dict:
        """Update one live record's properties (409 when a contact takes a used e-mail)."""
        loaded = self._load(conn, record_id)
        if loaded is None:
            raise _not_found(self.obj, record_id)
        doc, version = loaded
        email = props.get("email")
        owner = self._email_owner(conn, email, exclude=record_id)
        if owner is not None:
            raise HubSpotError(409, "CONFLICT", f"Contact already exists. Existing ID: {owner}")
        for name, value in props.items():
            if value is None:
                doc["properties"].pop(name, None)
            else:
                doc["properties"][name] = value
        doc["updatedAt"] = _stamp(self.store)
        self._save(conn, doc, version + 1)
        return doc

    def _archive(self, conn: Any, record_id: str) -> bool:
        row = fetch(conn, self.table, record_id)
        if row is None:
            return False
        if not row.deleted:
            doc = json.loads(row.doc)
            now = _stamp(self.store)
            doc.update(archived=True, archivedAt=now, updatedAt=now)
            self._save(conn, doc, row.version + 1)
            if self.obj == "companies":
                self._detach(conn, record_id)
        return True

    def _detach(self, conn: Any, company_id: str) -> None:
        """An archived company leaves its contacts (their primary company may change)."""
        rows = conn.exec_driver_sql(
            "SELECT id FROM contacts WHERE deleted = 0 AND EXISTS (SELECT 1 FROM "
            "json_each(contacts.doc, '$.companies') WHERE json_extract(value, '$.id') = ?)",
            (company_id,),
        ).all()
        for (contact_id,) in rows:
            row = fetch(conn, self.contacts, contact_id)
            doc = json.loads(row.doc)
            primary = _primary(doc)
            doc["companies"] = [c for c in doc["companies"] if c["id"] != company_id]
            if primary == company_id:
                doc["updatedAt"] = _stamp(self.store)
            update(conn, self.contacts, _row(doc, row.version + 1))

    def _batch_answer(self, results: list[dict], errors: list[dict], ok: int) -> Response:
        body: dict[str, Any] = {
            "status": "COMPLETE",
            "results": results,
            "startedAt": _now_text(self.store),
            "completedAt": _now_text(self.store),
        }
        if errors:
            body.update(numErrors=len(errors), errors=errors)
        return _json(body, 207 if errors else ok)

    def _item_error(self, exc: HubSpotError, context: dict[str, Any]) -> dict[str, Any]:
        return {
            "status": "error",
            "category": exc.category,
            "message": exc.message,
            "context": context,
        }

    def _injected(self) -> HubSpotError | None:
        if self.faults.enabled and self.faults.roll(self.faults.config.batch_item_error_rate):
            return HubSpotError(500, "INTERNAL_ERROR", "injected fault")
        return None

    # -- reads ----------------------------------------------------------------------------
    def list_records(self, _path: dict, query: Any, _body: Any) -> Response:
        limit = _int_param(query.get("limit"), "limit", LIST_DEFAULT, 1, LIST_MAX)
        archived = (query.get("archived") or "false").lower() == "true"
        props = _names(query.getlist("properties") or None, "properties")
        associations = "companies" in (_names(query.getlist("associations"), "associations") or [])
        conditions = [self.table.c.deleted.is_(archived)]
        after = query.get("after")
        if after:
            if not (after.isascii() and after.isdigit()):
                raise _invalid("'after' must be the paging.next.after of a previous page")
            conditions.append(self.table.c.id > after.rjust(9, "0"))
        sql = (
            sa.select(self.table.c.doc, self.table.c.id)
            .where(*conditions)
            .order_by(self.table.c.id)
            .limit(limit + 1)
        )
        with self.store.read() as conn:
            rows = conn.execute(sql).all()
        more = len(rows) > limit
        rows = rows[:limit]
        body: dict[str, Any] = {
            "results": [render(json.loads(r.doc), self.obj, props, associations) for r in rows]
        }
        if more:
            last = rows[-1].id
            body["paging"] = {
                "next": {"after": last, "link": f"/crm/v3/objects/{self.obj}?after={last}"}
            }
        return _json(body)

    def get_one(self, path: dict, query: Any, _body: Any) -> Response:
        record_id = path["recordId"]
        archived = (query.get("archived") or "false").lower() == "true"
        props = _names(query.getlist("properties") or None, "properties")
        associations = "companies" in (_names(query.getlist("associations"), "associations") or [])
        with self.store.read() as conn:
            loaded = self._load(conn, record_id, archived)
        if loaded is None:
            raise _not_found(self.obj, record_id)
        return _json(render(loaded[0], self.obj, props, associations))

    def batch_read(self, _path: dict, query: Any, body: Any) -> Response:
        inputs = _inputs(body)
        ids = [_id_of(i) for i in inputs]
        props = _names(body.get("properties"), "properties")
        archived = (query.get("archived") or "false").lower() == "true"
        results, missing = [], []
        with self.store.read() as conn:
            for record_id in dict.fromkeys(ids):
                loaded = self._load(conn, record_id, archived)
                if loaded is None:
                    missing.append(record_id)
                else:
                    results.append(render(loaded[0], self.obj, props))
        errors = []
        if missing:
            errors.append(
                {
                    "status": "error",
                    "category": "OBJECT_NOT_FOUND",
                    "message": f"Could not get some {NOUN[self.obj]} objects, they may be "
                    "deleted or not exist. Check that ids are valid.",
                    "context": {"ids": missing},
                }
            )
        return self._batch_answer(results, errors, 200)

    def search(self, _path: dict, _query: Any, body: Any) -> Response:
        if not isinstance(body, dict):
            raise _invalid("the search request must be a JSON object")
        limit = _int_param(body.get("limit"), "limit", SEARCH_DEFAULT, 1, SEARCH_MAX)
        after = _int_param(body.get("after"), "after", 0, 0, 2**62)
        if after >= SEARCH_CAP:
            raise _invalid(
                f"a search returns at most {SEARCH_CAP} results: 'after' {after} is past them "
                "(narrow the search instead, e.g. on the modification date)"
            )
        groups = parse_filters(self.obj, body.get("filterGroups"))
        sort = parse_sort(self.obj, body.get("sorts"))
        props = _names(body.get("properties"), "properties")
        text = body.get("query")
        if text is not None and not isinstance(text, str):
            raise _invalid("'query' must be a string")
        take = min(limit, SEARCH_CAP - after)
        modified = MODIFIED_PROPERTY[self.obj]
        table = self.table
        # what SQL can do: one group's filters on the modification time
        conditions = [table.c.deleted.is_(False)]
        rest: list[list[Filter]] = groups
        if len(groups) == 1:
            rest = [[f for f in groups[0] if not self._sql(f, conditions, modified)]]
        if not any(rest) and not text and (sort is None or sort[0] == modified):
            order = [table.c.id]
            if sort is not None:
                order = [table.c.modified, table.c.id]
                if sort[1]:
                    order = [c.desc() for c in order]
            with self.store.read() as conn:
                total = conn.execute(
                    sa.select(sa.func.count()).select_from(table).where(*conditions)
                ).scalar_one()
                docs = [
                    json.loads(d)
                    for d in conn.execute(
                        sa.select(table.c.doc)
                        .where(*conditions)
                        .order_by(*order)
                        .offset(after)
                        .limit(take)
                    ).scalars()
                ]
        else:
            with self.store.read() as conn:
                candidates = [
                    json.loads(d)
                    for d in conn.execute(
                        sa.select(table.c.doc).where(*conditions).order_by(table.c.id)
                    ).scalars()
                ]
            found = [
                d
                for d in candidates
                if (not any(rest) or any(all(_matches(d, self.obj, f) for f in g) for g in rest))
                and (not text or self._has_text(d, text))
            ]
            if sort is not None:
                found = self._sorted(found, *sort)
            total = len(found)
            docs = found[after : after + take]
        out: dict[str, Any] = {
            "total": total,
            "results": [render(d, self.obj, props) for d in docs],
        }
        if docs and after + len(docs) < total:
            out["paging"] = {"next": {"after": str(after + len(docs))}}
        return _json(out)

    def _sql(self, f: Filter, conditions: list[Any], modified: str) -> bool:
        """Add a filter on the modification time as SQL; False for any other filter."""
        if f.prop != modified or f.op not in ("EQ", "LT", "LTE", "GT", "GTE", "BETWEEN"):
            return False
        column = self.table.c.modified
        value = format_us(f.value)
        conditions.append(
            {
                "EQ": lambda: column == value,
                "LT": lambda: column < value,
                "LTE": lambda: column <= value,
                "GT": lambda: column > value,
                "GTE": lambda: column >= value,
                "BETWEEN": lambda: column.between(value, format_us(f.high)),
            }[f.op]()
        )
        return True

    def _has_text(self, doc: dict[str, Any], text: str) -> bool:
        wanted = text.strip().lower()
        return any(wanted in str(v).lower() for v in doc["properties"].values())

    def _sorted(self, docs: list[dict], prop: str, descending: bool) -> list[dict]:
        kind = _kind(self.obj, prop) or "string"

        def key(doc: dict[str, Any]) -> tuple[bool, Any, int]:
            raw = prop_value(doc, self.obj, prop)
            value = None if raw is None else _typed(kind, raw, prop)
            return (raw is None, value if value is not None else 0, int(doc["id"]))

        present = [d for d in docs if prop_value(d, self.obj, prop) is not None]
        absent = [d for d in docs if prop_value(d, self.obj, prop) is None]
        return sorted(present, key=key, reverse=descending) + absent

    # -- writes ---------------------------------------------------------------------------
    def create_one(self, _path: dict, _query: Any, body: Any) -> Response:
        if not isinstance(body, dict):
            raise _invalid("the request must be a JSON object with 'properties'")
        props = validate_properties(self.obj, body.get("properties", {}))
        with self.store.write() as conn:
            owner = self._email_owner(conn, props.get("email"))
            if owner is not None:
                raise HubSpotError(409, "CONFLICT", f"Contact already exists. Existing ID: {owner}")
            doc = self._new_doc(conn, props, self._companies_of_input(conn, body))
        return _json(render(doc, self.obj, list(props)), 201)

    def update_one(self, path: dict, _query: Any, body: Any) -> Response:
        if not isinstance(body, dict):
            raise _invalid("the request must be a JSON object with 'properties'")
        props = validate_properties(self.obj, body.get("properties", {}))
        with self.store.write() as conn:
            doc = self._apply(conn, path["recordId"], props)
        return _json(render(doc, self.obj, list(props)))

    def archive_one(self, path: dict, _query: Any, _body: Any) -> Response:
        with self.store.write() as conn:
            if not self._archive(conn, path["recordId"]):
                raise _not_found(self.obj, path["recordId"])
        return Response(status_code=204)

    def batch_archive(self, _path: dict, _query: Any, body: Any) -> Response:
        ids = [_id_of(i) for i in _inputs(body)]
        with self.store.write() as conn:
            for record_id in ids:
                self._archive(conn, record_id)
        return Response(status_code=204)

    def batch_create(self, _path: dict, _query: Any, body: Any) -> Response:
        """Each input on its own (207 for those refused), except a contact whose e-mail an
        existing contact has: then the whole batch is answered 409 and nothing is created."""
        inputs = _inputs(body)
        valid: list[tuple[dict, str | None, dict, Any]] = []  # props, trace, input, error
        for item in inputs:
            trace = item.get("objectWriteTraceId") if isinstance(item, dict) else None
            trace = None if trace is None else str(trace)
            try:
                if not isinstance(item, dict):
                    raise _invalid("each input must be an object with 'properties'")
                valid.append(
                    (validate_properties(self.obj, item.get("properties", {})), trace, item, None)
                )
            except HubSpotError as exc:
                valid.append(({}, trace, {}, exc))
        emails = [p.get("email") for p, _t, _i, e in valid if e is None and p.get("email")]
        if len(emails) != len(set(emails)):
            raise _invalid("Duplicate e-mail addresses found in the batch input")
        results, errors = [], []
        with self.store.write() as conn:
            for props, _trace, _item, error in valid:
                owner = None if error else self._email_owner(conn, props.get("email"))
                if owner is not None:
                    raise HubSpotError(
                        409, "CONFLICT", f"Contact already exists. Existing ID: {owner}"
                    )
            for index, (props, trace, item, error) in enumerate(valid):
                context = {"objectWriteTraceId": [trace]} if trace else {"index": [str(index)]}
                if error is None:
                    error = self._injected()
                if error is None:
                    try:
                        doc = self._new_doc(conn, props, self._companies_of_input(conn, item))
                    except HubSpotError as exc:
                        error = exc
                if error is not None:
                    errors.append(self._item_error(error, context))
                    continue
                shown = render(doc, self.obj, list(props))
                if trace:
                    shown["objectWriteTraceId"] = trace
                results.append(shown)
        return self._batch_answer(results, errors, 201)

    def batch_update(self, _path: dict, _query: Any, body: Any) -> Response:
        inputs = _inputs(body)
        ids = [_id_of(i) for i in inputs]
        if len(ids) != len(set(ids)):
            raise _invalid("Duplicate IDs found in batch input")
        results, errors = [], []
        with self.store.write() as conn:
            for item, record_id in zip(inputs, ids, strict=True):
                try:
                    error = self._injected()
                    if error is not None:
                        raise error
                    props = validate_properties(self.obj, item.get("properties", {}))
                    doc = self._apply(conn, record_id, props)
                except HubSpotError as exc:
                    errors.append(self._item_error(exc, {"ids": [record_id]}))
                    continue
                results.append(render(doc, self.obj, list(props)))
        return self._batch_answer(results, errors, 200)


_CONTACT = {"contacts", "contact", "0-1"}
_COMPANY = {"companies", "company", "0-2"}


class _Associations:
    """v4 contact → company associations; the primary one is the contact's company."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.contacts = store.tables["contacts"]
        self.companies = store.tables["companies"]

    def add_routes(self, router: APIRouter) -> None:
        one = "/crm/v4/objects/{fromType}/{contactId}/associations"
        tag = "Associations"
        _add(
            router,
            "PUT",
            one + "/default/{toType}/{companyId}",
            self.put_default,
            "Associate (default type; primary when the contact has none)",
            tag,
        )
        _add(router, "DELETE", one + "/{toType}/{companyId}", self.remove, "Remove", tag)
        _add(router, "GET", one + "/{toType}", self.list_one, "List a contact's companies", tag)
        _add(
            router,
            "POST",
            "/crm/v4/associations/{fromType}/{toType}/batch/read",
            self.batch_read,
            "Read the companies of a batch of contacts",
            tag,
        )

    def _types(self, path: dict[str, str]) -> None:
        if path["fromType"] not in _CONTACT or path["toType"] not in _COMPANY:
            raise _invalid(
                "the embedded HubSpot keeps contact to company associations only, got "
                f"{path['fromType']} to {path['toType']}"
            )

    def _contact(self, conn: Any, contact_id: str) -> tuple[dict, int]:
        row = fetch(conn, self.contacts, contact_id)
        if row is None or row.deleted:
            raise _not_found("contacts", contact_id)
        return json.loads(row.doc), row.version

    def _save(self, conn: Any, doc: dict, version: int, old_primary: str | None) -> None:
        if _primary(doc) != old_primary:  # associatedcompanyid changed: a modification
            doc["updatedAt"] = _stamp(self.store)
        update(conn, self.contacts, _row(doc, version + 1))

    def put_default(self, path: dict, _query: Any, _body: Any) -> Response:
        self._types(path)
        contact_id, company_id = path["contactId"], path["companyId"]
        with self.store.write() as conn:
            doc, version = self._contact(conn, contact_id)
            company = fetch(conn, self.companies, company_id)
            if company is None or company.deleted:
                raise _not_found("companies", company_id)
            old = _primary(doc)
            companies = doc.setdefault("companies", [])
            if all(c["id"] != company_id for c in companies):
                companies.append({"id": company_id, "primary": False})
            if old is None:
                for c in companies:
                    c["primary"] = c["id"] == company_id
            self._save(conn, doc, version, old)
        spec = {"associationCategory": "HUBSPOT_DEFINED", "associationTypeId": UNLABELED_TYPE}
        return _json(
            {
                "status": "COMPLETE",
                "results": [
                    {"from": {"id": contact_id}, "to": {"id": company_id}, "associationSpec": spec}
                ],
                "startedAt": _now_text(self.store),
                "completedAt": _now_text(self.store),
            }
        )

    def remove(self, path: dict, _query: Any, _body: Any) -> Response:
        self._types(path)
        with self.store.write() as conn:
            doc, version = self._contact(conn, path["contactId"])
            old = _primary(doc)
            doc["companies"] = [
                c for c in doc.get("companies") or () if c["id"] != path["companyId"]
            ]
            self._save(conn, doc, version, old)
        return Response(status_code=204)

    def _to(self, doc: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {"toObjectId": int(c["id"]), "associationTypes": _association_types(c["primary"])}
            for c in doc.get("companies") or ()
        ]

    def list_one(self, path: dict, _query: Any, _body: Any) -> Response:
        self._types(path)
        with self.store.read() as conn:
            doc, _version = self._contact(conn, path["contactId"])
        return _json({"results": self._to(doc)})

    def batch_read(self, path: dict, _query: Any, body: Any) -> Response:
        self._types(path)
        ids = [_id_of(i) for i in _inputs(body)]
        results, errors = [], []
        with self.store.read() as conn:
            for contact_id in dict.fromkeys(ids):
                row = fetch(conn, self.contacts, contact_id)
                doc = json.loads(row.doc) if row is not None and not row.deleted else None
                if doc is None or not doc.get("companies"):
                    errors.append(
                        {
                            "status": "error",
                            "category": "OBJECT_NOT_FOUND" if doc is None else "VALIDATION_ERROR",
                            "subCategory": "crm.associations.NO_ASSOCIATIONS_FOUND",
                            "message": f"No company is associated with contact {contact_id}.",
                            "context": {"fromObjectId": [contact_id]},
                        }
                    )
                    continue
                results.append({"from": {"id": contact_id}, "to": self._to(doc)})
        body_out: dict[str, Any] = {
            "status": "COMPLETE",
            "results": results,
            "startedAt": _now_text(self.store),
            "completedAt": _now_text(self.store),
        }
        if errors:
            body_out.update(numErrors=len(errors), errors=errors)
        return _json(body_out, 207 if errors else 200)


def build_app(store: Store, faults: Faults, **fastapi_kwargs: Any) -> FastAPI:
    """The HubSpot FastAPI app over ``store`` (auth, limits and faults are added around it)."""
    app = FastAPI(
        title="HubSpot (embedded)",
        version="3",
        description=(
            "CRM v3 objects (contacts, companies, products) and v4 contact to company "
            "associations. Authenticate with `Authorization: Bearer <HUBSPOT_ACCESS_TOKEN>`."
        ),
        **fastapi_kwargs,
    )

    async def hubspot_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HubSpotError)
        return _json(exc.body(), exc.status)

    app.add_exception_handler(HubSpotError, hubspot_error)
    app.include_router(build_router(store, faults))
    return app
