"""The embedded Custom CRM: PascalCase JSON, API key, keyset paging, soft deletes.

Contract: DESIGN.md section 4. Handlers are plain ``def`` (run in the threadpool); writes
serialize on the store's lock, reads run beside them on WAL snapshots.
"""

# No ``from __future__ import annotations``: FastAPI resolves the route annotations, some of
# which are closure variables.

import hmac
import json
from collections.abc import Callable
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, FastAPI, Header, Path, Query, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from crm_assets.custom_crm.seed import CONTACT_PREFIX, PRODUCT_PREFIX, custom_id
from crm_assets.embedded.errors import (
    ApiError,
    ApiValidationError,
    EmailAddress,
    NonBlank,
    Str255,
    StrictBool,
    StrictInt64,
    Text4000,
    etag,
    parse_if_match,
)
from crm_assets.embedded.records import (
    decode_cursor,
    encode_cursor,
    exists,
    fetch,
    insert,
    page_body,
    row_values,
    update,
)
from crm_assets.embedded.store import Store, parse_rfc3339

RecordId = Annotated[str, Path(alias="Id")]

SYSTEM = "custom-crm"
OBJECTS = ("contacts", "products")
DB_FILE = "custom_crm.sqlite"
SERVER_FIELDS = frozenset({"Id", "Created", "Modified", "Version", "Deleted"})
MAX_LIMIT = 500
DEFAULT_LIMIT = 100


class _Body(BaseModel):
    """Unknown fields are refused; server-managed fields are accepted and ignored."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _drop_server_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if k not in SERVER_FIELDS}
        return data


class ContactIn(_Body):
    """A Contact as written by a client (POST: absent = null; PATCH: absent = unchanged)."""

    FirstName: Str255 | None = None
    LastName: Str255 | None = None
    Email: EmailAddress | None = None
    Phone: Str255 | None = None
    MobilePhone: Str255 | None = None
    Title: Str255 | None = None
    ProductId: Str255 | None = None


class ProductIn(_Body):
    """A Product as created: ``Name`` is required and not blank."""

    Name: NonBlank
    ProductNumber: StrictInt64 | None = None
    Description: Text4000 | None = None
    Url: Str255 | None = None
    Active: StrictBool | None = True
    Street: Str255 | None = None
    PostalCode: Str255 | None = None
    City: Str255 | None = None
    Country: Str255 | None = None


class ProductPatch(_Body):
    """A partial Product update: only the fields present change; ``Name`` can't be cleared."""

    Name: NonBlank = Field(default="", json_schema_extra={"description": "not blank when present"})
    ProductNumber: StrictInt64 | None = None
    Description: Text4000 | None = None
    Url: Str255 | None = None
    Active: StrictBool | None = None
    Street: Str255 | None = None
    PostalCode: Str255 | None = None
    City: Str255 | None = None
    Country: Str255 | None = None


class _Managed(BaseModel):
    Id: str
    Created: str
    Modified: str
    Version: int
    Deleted: bool


class Contact(_Managed, ContactIn):
    """A Contact as returned."""


class Product(_Managed):
    """A Product as returned."""

    Name: str
    ProductNumber: int | None
    Description: str | None
    Url: str | None
    Active: bool | None
    Street: str | None
    PostalCode: str | None
    City: str | None
    Country: str | None


class ContactPage(BaseModel):
    items: list[Contact]
    nextCursor: str | None


class ProductPage(BaseModel):
    items: list[Product]
    nextCursor: str | None


class ErrorItem(BaseModel):
    field: str | None
    message: str


class ValidationErrors(BaseModel):
    errors: list[ErrorItem]


class Error(BaseModel):
    error: str
    message: str


_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Error, "description": "missing or invalid API key"},
    404: {"model": Error},
    412: {"model": Error, "description": "If-Match does not match the current Version"},
    422: {"model": ValidationErrors},
    429: {"model": Error, "description": "rate limited; see Retry-After"},
}

_SPECS = {
    "contacts": {
        "prefix": CONTACT_PREFIX,
        "create": ContactIn,
        "patch": ContactIn,
        "out": Contact,
        "page": ContactPage,
        "fields": list(ContactIn.model_fields),
    },
    "products": {
        "prefix": PRODUCT_PREFIX,
        "create": ProductIn,
        "patch": ProductPatch,
        "out": Product,
        "page": ProductPage,
        "fields": list(ProductIn.model_fields),
    },
}


def api_key_check(api_key: str) -> Callable[[str | None], str | None]:
    """The authentication rule: exactly the configured key, compared in constant time."""
    expected = api_key.encode()

    def check(token: str | None) -> str | None:
        if token is None:
            return "missing bearer API key"
        if not hmac.compare_digest(token.encode(), expected):
            return "invalid API key"
        return None

    return check


def seed(store: Store, records: dict[str, list[dict[str, Any]]]) -> None:
    """Insert generated demo records and move the id counters past them."""
    with store.write() as conn:
        for obj, docs in records.items():
            store.bulk_insert(
                conn,
                obj,
                (
                    row_values(
                        doc,
                        record_id=doc["Id"],
                        modified=doc["Modified"],
                        version=doc["Version"],
                        deleted=doc["Deleted"],
                        ref=doc.get("ProductId"),
                    )
                    for doc in docs
                ),
            )
            store.set_counter(conn, obj, len(docs))


def _json(doc_text: str, status: int = 200, version: int | None = None, **headers: str) -> Response:
    out = dict(headers)
    if version is not None:
        out["ETag"] = etag(version)
    return Response(doc_text, status_code=status, media_type="application/json", headers=out)


def _check_if_match(if_match: str | None, version: int) -> None:
    wanted = parse_if_match(if_match)
    if wanted is not None and wanted != "*" and wanted != version:
        raise ApiError(412, "precondition_failed", f"If-Match {if_match} but Version is {version}")


def build_router(store: Store) -> APIRouter:
    """The ``/api`` routes of both objects."""
    router = APIRouter(prefix="/api", responses=_ERRORS)
    for obj in OBJECTS:
        _add_object_routes(router, store, obj)
    return router


def _add_object_routes(router: APIRouter, store: Store, obj: str) -> None:
    spec = _SPECS[obj]
    table = store.tables[obj]
    products = store.tables["products"]
    create_model: type[BaseModel] = spec["create"]
    patch_model: type[BaseModel] = spec["patch"]
    fields: list[str] = spec["fields"]
    prefix: str = spec["prefix"]
    tag = obj.capitalize()

    def check_refs(conn: Any, doc: dict[str, Any]) -> None:
        product_id = doc.get("ProductId")
        if obj == "contacts" and product_id is not None and not exists(conn, products, product_id):
            raise ApiValidationError.one("ProductId", f"no product with Id {product_id!r}")

    def list_records(
        modifiedSince: Annotated[
            str | None, Query(description="RFC 3339; records modified at or after it")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
        cursor: Annotated[str | None, Query(description="nextCursor of the previous page")] = None,
        includeDeleted: bool = False,
    ) -> Response:
        conditions = []
        if modifiedSince is not None:
            try:
                conditions.append(table.c.modified >= parse_rfc3339(modifiedSince))
            except ValueError:
                raise ApiValidationError.one("modifiedSince", "not an RFC 3339 date-time") from None
        if cursor is not None:
            last_modified, last_id = decode_cursor(cursor)
            conditions.append(
                sa.tuple_(table.c.modified, table.c.id) > sa.tuple_(last_modified, last_id)
            )
        if not includeDeleted:
            conditions.append(table.c.deleted.is_(False))
        query = (
            sa.select(table.c.doc, table.c.modified, table.c.id)
            .where(*conditions)
            .order_by(table.c.modified, table.c.id)
            .limit(limit + 1)
        )
        with store.read() as conn:
            rows = conn.execute(query).all()
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = encode_cursor(rows[-1].modified, rows[-1].id) if more else None
        return Response(
            page_body([r.doc for r in rows], {"nextCursor": next_cursor}),
            media_type="application/json",
        )

    def get_record(record_id: RecordId) -> Response:
        with store.read() as conn:
            row = fetch(conn, table, record_id)
        if row is None:
            raise ApiError(404, "not_found", f"no {obj[:-1]} with Id {record_id!r}")
        return _json(row.doc, version=row.version)

    def create_record(
        body: create_model,  # type: ignore[valid-type]
        idempotency_key: Annotated[
            str | None,
            Header(max_length=255, description="same key again returns the same record"),
        ] = None,
    ) -> Response:
        values = body.model_dump()
        with store.write() as conn:
            if idempotency_key:
                known = store.idempotent_record(conn, obj, idempotency_key)
                if known is not None:
                    row = fetch(conn, table, known)
                    if row is not None:
                        return _json(
                            row.doc,
                            201,
                            row.version,
                            Location=f"/api/{obj}/{row.id}",
                            **{"Idempotent-Replayed": "true"},
                        )
            check_refs(conn, values)
            record_id = custom_id(prefix, store.next_id_number(conn, obj))
            now = store.clock.next()
            doc = {"Id": record_id, **{f: values.get(f) for f in fields}}
            doc.update(Created=now, Modified=now, Version=1, Deleted=False)
            row = row_values(
                doc,
                record_id=record_id,
                modified=now,
                version=1,
                deleted=False,
                ref=doc.get("ProductId"),
            )
            insert(conn, table, row)
            if idempotency_key:
                store.remember_key(conn, obj, idempotency_key, record_id, now)
        return _json(row["doc"], 201, 1, Location=f"/api/{obj}/{record_id}")

    def patch_record(
        record_id: RecordId,
        body: patch_model,  # type: ignore[valid-type]
        if_match: Annotated[str | None, Header(description='"<Version>" (quoted)')] = None,
    ) -> Response:
        changes = body.model_dump(include=body.model_fields_set)
        with store.write() as conn:
            row = fetch(conn, table, record_id)
            if row is None or row.deleted:
                raise ApiError(404, "not_found", f"no {obj[:-1]} with Id {record_id!r}")
            _check_if_match(if_match, row.version)
            check_refs(conn, changes)
            doc = _loads(row.doc)
            doc.update(changes)
            version = row.version + 1
            now = store.clock.next()
            doc.update(Modified=now, Version=version)
            values = row_values(
                doc,
                record_id=record_id,
                modified=now,
                version=version,
                deleted=False,
                ref=doc.get("ProductId"),
            )
            update(conn, table, values)
        return _json(values["doc"], 200, version)

    def delete_record(
        record_id: RecordId,
        if_match: Annotated[str | None, Header(description='"<Version>" (quoted)')] = None,
    ) -> Response:
        with store.write() as conn:
            row = fetch(conn, table, record_id)
            if row is None:
                raise ApiError(404, "not_found", f"no {obj[:-1]} with Id {record_id!r}")
            if not row.deleted:
                _check_if_match(if_match, row.version)
                doc = _loads(row.doc)
                version = row.version + 1
                now = store.clock.next()
                doc.update(Modified=now, Version=version, Deleted=True)
                update(
                    conn,
                    table,
                    row_values(
                        doc,
                        record_id=record_id,
                        modified=now,
                        version=version,
                        deleted=True,
                        ref=doc.get("ProductId"),
                    ),
                )
        return Response(status_code=204)

    page_model = spec["page"]
    out_model = spec["out"]
    router.add_api_route(
        f"/{obj}",
        list_records,
        methods=["GET"],
        tags=[tag],
        summary=f"List {obj}",
        responses={200: {"model": page_model}},
    )
    router.add_api_route(
        f"/{obj}/{{Id}}",
        get_record,
        methods=["GET"],
        tags=[tag],
        summary=f"Get one of the {obj} (deleted ones too)",
        responses={200: {"model": out_model}},
    )
    router.add_api_route(
        f"/{obj}",
        create_record,
        methods=["POST"],
        tags=[tag],
        status_code=201,
        summary=f"Create one of the {obj}",
        responses={201: {"model": out_model}},
    )
    router.add_api_route(
        f"/{obj}/{{Id}}",
        patch_record,
        methods=["PATCH"],
        tags=[tag],
        summary="Partial update",
        responses={200: {"model": out_model}},
    )
    router.add_api_route(
        f"/{obj}/{{Id}}",
        delete_record,
        methods=["DELETE"],
        tags=[tag],
        status_code=204,
        summary="Soft delete (Deleted: true)",
        response_class=Response,
    )


def _loads(text: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(text)
    return value


def build_app(store: Store, **fastapi_kwargs: Any) -> FastAPI:
    """The Custom CRM FastAPI app over ``store`` (auth, limits and faults are added around it)."""
    app = FastAPI(
        title="Custom CRM (embedded)",
        version="1.0",
        description=(
            "Contacts and Products, PascalCase JSON. Authenticate with "
            "`Authorization: Bearer <CUSTOM_CRM_API_KEY>`."
        ),
        **fastapi_kwargs,
    )
    app.include_router(build_router(store))
    return app
