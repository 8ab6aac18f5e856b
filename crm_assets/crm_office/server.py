"""The embedded CRMOffice: camelCase JSON, OAuth2 client credentials, offset paging, batches.

Contract: DESIGN.md section 4. Handlers are plain ``def`` (run in the threadpool); writes
serialize on the store's lock, reads run beside them on WAL snapshots. Bearer tokens are
kept hashed, in memory and in SQLite, so a restart does not log clients out.
"""

# No ``from __future__ import annotations``: FastAPI resolves the route annotations, some of
# which are closure variables.

import base64
import hmac
import json
import secrets
from collections.abc import Callable
from typing import Annotated, Any
from urllib.parse import parse_qsl

import sqlalchemy as sa
from fastapi import APIRouter, FastAPI, Header, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from crm_assets.crm_office.seed import COMPANY_START, CONTACT_START, office_id
from crm_assets.embedded.errors import (
    ApiError,
    ApiValidationError,
    EmailAddress,
    NonBlank,
    Str255,
    StrictBool,
    Text4000,
    etag,
    field_errors,
    parse_if_match,
)
from crm_assets.embedded.middleware import Faults
from crm_assets.embedded.records import exists, fetch, insert, page_body, row_values, update
from crm_assets.embedded.store import Store, parse_rfc3339, token_hash

RecordId = Annotated[str, Path(alias="id")]

SYSTEM = "crm-office"
OBJECTS = ("contacts", "companies")
DB_FILE = "crm_office.sqlite"
SERVER_FIELDS = frozenset({"id", "createdAt", "updatedAt", "rowVersion"})
MAX_TAKE = 1000
DEFAULT_TAKE = 100
MAX_BATCH = 100
SCOPE = "crmoffice"
DEFAULT_TOKEN_TTL = 3600
TOKEN_PATH = "/connect/token"


def _check_org_nr(value: str) -> str:
    if len(value) != 9 or not value.isascii() or not value.isdigit():
        raise ValueError("must be exactly 9 digits")
    return value


OrgNr = Annotated[str, Field(strict=True), AfterValidator(_check_org_nr)]


class _Body(BaseModel):
    """Unknown fields are refused; server-managed fields are accepted and ignored."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _drop_server_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if k not in SERVER_FIELDS}
        return data


class CompanyRef(BaseModel):
    """A reference to an existing company."""

    model_config = ConfigDict(extra="forbid")
    id: Str255


class Address(BaseModel):
    model_config = ConfigDict(extra="forbid")
    streetAddress: Str255 | None = None
    postCode: Str255 | None = None
    postalArea: Str255 | None = None
    country: Str255 | None = None


class ContactIn(_Body):
    """A contact as written (POST and PUT: absent fields are null)."""

    givenName: Str255 | None = None
    familyName: Str255 | None = None
    email: EmailAddress | None = None
    directPhone: Str255 | None = None
    mobilePhone: Str255 | None = None
    title: Str255 | None = None
    company: CompanyRef | None = None


class CompanyIn(_Body):
    """A company as written (POST and PUT: absent fields are null; ``name`` required)."""

    name: NonBlank
    orgNr: OrgNr | None = None
    website: Str255 | None = None
    description: Text4000 | None = None
    isActive: StrictBool | None = None
    postAddress: Address | None = None
    visitAddress: Address | None = None


class _Managed(BaseModel):
    id: str
    createdAt: str
    updatedAt: str
    rowVersion: int


class Contact(_Managed, ContactIn):
    """A contact as returned."""


class Company(_Managed):
    """A company as returned."""

    name: str
    orgNr: str | None
    website: str | None
    description: str | None
    isActive: bool | None
    postAddress: Address | None
    visitAddress: Address | None


class ContactPage(BaseModel):
    items: list[Contact]
    totalCount: int


class CompanyPage(BaseModel):
    items: list[Company]
    totalCount: int


class BatchIn(BaseModel):
    """Up to 100 items in total; each is validated and applied on its own."""

    model_config = ConfigDict(extra="forbid")
    create: list[Any] = Field(default_factory=list, description="records to create")
    update: list[Any] = Field(
        default_factory=list, description="full records with `id` and optional `rowVersion`"
    )


class BatchResult(BaseModel):
    index: int
    status: int
    item: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


class BatchOut(BaseModel):
    results: list[BatchResult]


class TokenOut(BaseModel):
    access_token: str
    token_type: str
    expires_in: int


class ErrorItem(BaseModel):
    field: str | None
    message: str


class ValidationErrors(BaseModel):
    errors: list[ErrorItem]


class Error(BaseModel):
    error: str
    message: str | None = None


_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Error, "description": "missing, invalid or expired token"},
    404: {"model": Error},
    412: {"model": Error, "description": "If-Match does not match the current rowVersion"},
    422: {"model": ValidationErrors},
    429: {"model": Error, "description": "rate limited; see Retry-After"},
}

_SPECS: dict[str, dict[str, Any]] = {
    "contacts": {
        "model": ContactIn,
        "out": Contact,
        "page": ContactPage,
        "start": CONTACT_START,
    },
    "companies": {
        "model": CompanyIn,
        "out": Company,
        "page": CompanyPage,
        "start": COMPANY_START,
    },
}


class TokenIssuer:
    """Issues and checks bearer tokens for exactly one client id / secret pair.

    Expiry is measured on the real clock (``Clock.real_time``), not the offset one: see
    ``crm_assets.embedded.clock``.
    """

    def __init__(self, store: Store, client_id: str, client_secret: str, ttl: int) -> None:
        self.store = store
        self.clock = store.service_clock
        self.client_id = client_id.encode()
        self.client_secret = client_secret.encode()
        self.ttl = ttl
        self.tokens: dict[str, float] = store.load_tokens()

    def credentials_ok(self, client_id: str, client_secret: str) -> bool:
        id_ok = hmac.compare_digest(client_id.encode(), self.client_id)
        secret_ok = hmac.compare_digest(client_secret.encode(), self.client_secret)
        return id_ok and secret_ok

    def issue(self) -> tuple[str, float]:
        token = secrets.token_urlsafe(32)
        now = self.clock.real_time()
        expires_at = now + self.ttl
        if len(self.tokens) > 1000:  # forget expired tokens now and then
            self.tokens = {h: at for h, at in self.tokens.items() if at > now}
        self.tokens[token_hash(token)] = expires_at
        return token, expires_at

    def check(self, token: str | None) -> str | None:
        """``None`` for a valid token, else why not (the token itself is never echoed)."""
        if token is None:
            return "missing bearer token"
        expires_at = self.tokens.get(token_hash(token))
        if expires_at is None:
            return "invalid token"
        if expires_at <= self.clock.real_time():
            return "token expired"
        return None


def seed(store: Store, records: dict[str, list[dict[str, Any]]]) -> None:
    """Insert generated demo records and move the id counters past them."""
    with store.write() as conn:
        for obj in ("companies", "contacts"):
            docs = records.get(obj, [])
            store.bulk_insert(
                conn,
                obj,
                (
                    row_values(
                        doc,
                        record_id=doc["id"],
                        modified=doc["updatedAt"],
                        version=doc["rowVersion"],
                        deleted=False,
                        ref=(doc.get("company") or {}).get("id"),
                    )
                    for doc in docs
                ),
            )
            if docs:
                store.set_counter(conn, obj, _SPECS[obj]["start"] + len(docs) - 1)


def _json(doc_text: str, status: int = 200, version: int | None = None, **headers: str) -> Response:
    out = dict(headers)
    if version is not None:
        out["ETag"] = etag(version)
    return Response(doc_text, status_code=status, media_type="application/json", headers=out)


def _version_mismatch(wanted: int | str | None, version: int) -> bool:
    return wanted is not None and wanted != "*" and wanted != version


def _ref_of(doc: dict[str, Any]) -> str | None:
    company = doc.get("company")
    return company.get("id") if isinstance(company, dict) else None


def build_router(store: Store, faults: Faults) -> APIRouter:
    """The routes of both objects."""
    router = APIRouter(responses=_ERRORS)
    for obj in OBJECTS:
        _add_object_routes(router, store, faults, obj)
    return router


def _add_object_routes(router: APIRouter, store: Store, faults: Faults, obj: str) -> None:
    spec = _SPECS[obj]
    table = store.tables[obj]
    companies = store.tables["companies"]
    contacts = store.tables["contacts"]
    model: type[BaseModel] = spec["model"]
    fields = list(model.model_fields)
    tag = obj.capitalize()
    noun = obj[:-1] if obj == "contacts" else "company"

    def check_refs(conn: Any, values: dict[str, Any]) -> None:
        ref = _ref_of(values)
        if obj == "contacts" and ref is not None and not exists(conn, companies, ref):
            raise ApiValidationError.one("company.id", f"no company with id {ref!r}")

    def do_create(conn: Any, values: dict[str, Any]) -> dict[str, Any]:
        check_refs(conn, values)
        record_id = office_id(store.next_id_number(conn, obj, start=spec["start"]))
        now = store.clock.next()
        doc = {"id": record_id, **{f: values.get(f) for f in fields}}
        doc.update(createdAt=now, updatedAt=now, rowVersion=1)
        insert(
            conn,
            table,
            row_values(
                doc, record_id=record_id, modified=now, version=1, deleted=False, ref=_ref_of(doc)
            ),
        )
        return doc

    def do_replace(
        conn: Any, record_id: str, values: dict[str, Any], wanted: int | str | None
    ) -> dict[str, Any]:
        row = fetch(conn, table, record_id)
        if row is None:
            raise ApiError(404, "not_found", f"no {noun} with id {record_id!r}")
        if _version_mismatch(wanted, row.version):
            raise ApiError(412, "precondition_failed", f"rowVersion is {row.version}, not {wanted}")
        check_refs(conn, values)
        old = json.loads(row.doc)
        version = row.version + 1
        now = store.clock.next()
        doc = {"id": record_id, **{f: values.get(f) for f in fields}}
        doc.update(createdAt=old["createdAt"], updatedAt=now, rowVersion=version)
        update(
            conn,
            table,
            row_values(
                doc,
                record_id=record_id,
                modified=now,
                version=version,
                deleted=False,
                ref=_ref_of(doc),
            ),
        )
        return doc

    def list_records(
        updatedSince: Annotated[
            str | None, Query(description="RFC 3339; records updated at or after it")
        ] = None,
        skip: Annotated[int, Query(ge=0, le=2**62)] = 0,
        take: Annotated[int, Query(ge=1, le=MAX_TAKE)] = DEFAULT_TAKE,
    ) -> Response:
        conditions = []
        if updatedSince is not None:
            try:
                conditions.append(table.c.modified >= parse_rfc3339(updatedSince))
            except ValueError:
                raise ApiValidationError.one("updatedSince", "not an RFC 3339 date-time") from None
        query = (
            sa.select(table.c.doc)
            .where(*conditions)
            .order_by(table.c.modified, table.c.id)
            .offset(skip)
            .limit(take)
        )
        with store.read() as conn:
            docs = conn.execute(query).scalars().all()
            total = conn.execute(
                sa.select(sa.func.count()).select_from(table).where(*conditions)
            ).scalar_one()
        return Response(page_body(docs, {"totalCount": total}), media_type="application/json")

    def get_record(record_id: RecordId) -> Response:
        with store.read() as conn:
            row = fetch(conn, table, record_id)
        if row is None:
            raise ApiError(404, "not_found", f"no {noun} with id {record_id!r}")
        return _json(row.doc, version=row.version)

    def create_record(body: model) -> Response:  # type: ignore[valid-type]
        with store.write() as conn:
            doc = do_create(conn, body.model_dump())
        return _json(
            json.dumps(doc, ensure_ascii=False),
            201,
            doc["rowVersion"],
            Location=f"/{obj}/{doc['id']}",
        )

    def replace_record(
        record_id: RecordId,
        body: model,  # type: ignore[valid-type]
        if_match: Annotated[str | None, Header(description='"<rowVersion>" (quoted)')] = None,
    ) -> Response:
        with store.write() as conn:
            doc = do_replace(conn, record_id, body.model_dump(), parse_if_match(if_match))
        return _json(json.dumps(doc, ensure_ascii=False), 200, doc["rowVersion"])

    def delete_record(
        record_id: RecordId,
        if_match: Annotated[str | None, Header(description='"<rowVersion>" (quoted)')] = None,
    ) -> Response:
        with store.write() as conn:
            row = fetch(conn, table, record_id)
            if row is None:
                raise ApiError(404, "not_found", f"no {noun} with id {record_id!r}")
            wanted = parse_if_match(if_match)
            if _version_mismatch(wanted, row.version):
                raise ApiError(
                    412, "precondition_failed", f"rowVersion is {row.version}, not {wanted}"
                )
            conn.execute(sa.delete(table).where(table.c.id == record_id))
            if obj == "companies":
                _detach_contacts(conn, store, contacts, record_id)
        return Response(status_code=204)

    def batch(body: BatchIn) -> JSONResponse:
        total = len(body.create) + len(body.update)
        if total > MAX_BATCH:
            raise ApiValidationError.one(
                "body", f"at most {MAX_BATCH} items per batch, got {total}"
            )
        results: list[dict[str, Any]] = []
        with store.write() as conn:
            for index, item in enumerate(body.create):
                results.append(
                    _batch_item(index, lambda item=item: do_create(conn, _valid(model, item)), 201)
                )
            for offset, item in enumerate(body.update):
                index = len(body.create) + offset
                results.append(_batch_item(index, lambda item=item: _batch_update(conn, item), 200))
        return JSONResponse({"results": results})

    def _batch_update(conn: Any, item: Any) -> dict[str, Any]:
        if not isinstance(item, dict):
            raise ApiValidationError.one("body", "each item must be a JSON object")
        record_id = item.get("id")
        if not isinstance(record_id, str) or not record_id:
            raise ApiValidationError.one("id", "required: the id of the record to update")
        wanted = _row_version_of(item.get("rowVersion"))
        return do_replace(conn, record_id, _valid(model, item), wanted)

    def _batch_item(index: int, run: Callable[[], dict[str, Any]], ok: int) -> dict[str, Any]:
        if faults.enabled and faults.roll(faults.config.batch_item_error_rate):
            return {
                "index": index,
                "status": 500,
                "error": {"message": "injected fault", "errors": []},
            }
        try:
            return {"index": index, "status": ok, "item": run()}
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
        f"/{obj}/batch",
        batch,
        methods=["POST"],
        tags=[tag],
        summary=f"Create and update up to {MAX_BATCH} {obj}, each on its own",
        responses={200: {"model": BatchOut}},
    )
    router.add_api_route(
        f"/{obj}/{{id}}",
        get_record,
        methods=["GET"],
        tags=[tag],
        summary=f"Get one {noun}",
        responses={200: {"model": out_model}},
    )
    router.add_api_route(
        f"/{obj}",
        create_record,
        methods=["POST"],
        tags=[tag],
        status_code=201,
        summary=f"Create a {noun}",
        responses={201: {"model": out_model}},
    )
    router.add_api_route(
        f"/{obj}/{{id}}",
        replace_record,
        methods=["PUT"],
        tags=[tag],
        summary="Full replace (absent optional fields become null)",
        responses={200: {"model": out_model}},
    )
    router.add_api_route(
        f"/{obj}/{{id}}",
        delete_record,
        methods=["DELETE"],
        tags=[tag],
        status_code=204,
        summary="Hard delete",
        response_class=Response,
    )


def _valid(model: type[BaseModel], item: Any) -> dict[str, Any]:
    """Validate one batch item like a request body (422 with the same field names)."""
    try:
        return model.model_validate(item).model_dump()
    except ValidationError as exc:
        raise ApiValidationError(field_errors(exc.errors())) from None


def _row_version_of(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ApiValidationError.one("rowVersion", "must be an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip('"').isdigit():
        return int(value.strip('"'))
    raise ApiValidationError.one("rowVersion", "must be an integer")


def _detach_contacts(conn: Any, store: Store, contacts: sa.Table, company_id: str) -> None:
    """A deleted company's contacts lose their reference (a write: updatedAt moves on)."""
    for row in conn.execute(sa.select(contacts).where(contacts.c.ref == company_id)).all():
        doc = json.loads(row.doc)
        version = row.version + 1
        now = store.clock.next()
        doc.update(company=None, updatedAt=now, rowVersion=version)
        update(
            conn,
            contacts,
            row_values(
                doc, record_id=row.id, modified=now, version=version, deleted=False, ref=None
            ),
        )


def _token_route(issuer: TokenIssuer) -> Callable[..., Any]:
    async def token(request: Request) -> JSONResponse:
        """OAuth2 client credentials (form body, or HTTP Basic for the client)."""
        raw = await request.body()
        form = dict(parse_qsl(raw.decode("utf-8", errors="replace"), keep_blank_values=True))
        client_id, client_secret = form.get("client_id", ""), form.get("client_secret", "")
        basic = request.headers.get("authorization", "")
        if basic.lower().startswith("basic "):
            try:
                decoded = base64.b64decode(basic[6:].strip()).decode("utf-8")
                client_id, _, client_secret = decoded.partition(":")
            except ValueError:  # binascii.Error, UnicodeDecodeError, non-ASCII input
                pass
        grant = form.get("grant_type")
        if grant is None:
            return JSONResponse(
                {"error": "invalid_request", "error_description": "grant_type is required"}, 400
            )
        if grant != "client_credentials":
            return JSONResponse({"error": "unsupported_grant_type"}, 400)
        if not issuer.credentials_ok(client_id, client_secret):
            return JSONResponse({"error": "invalid_client"}, 401)
        scope = form.get("scope", SCOPE)
        if scope and SCOPE not in scope.split():
            return JSONResponse({"error": "invalid_scope"}, 400)
        token, expires_at = issuer.issue()
        await run_in_threadpool(issuer.store.save_token, token, expires_at)
        return JSONResponse(
            {
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": issuer.ttl,
                "scope": SCOPE,
            },
            headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
        )

    return token


def build_app(store: Store, faults: Faults, issuer: TokenIssuer, **fastapi_kwargs: Any) -> FastAPI:
    """The CRMOffice FastAPI app over ``store`` (auth, limits and faults are added around it)."""
    app = FastAPI(
        title="CRMOffice (embedded)",
        version="1.0",
        description=(
            "Contacts and companies, camelCase JSON. Get a token from `POST /connect/token` "
            "(OAuth2 client credentials, scope `crmoffice`) and send `Authorization: Bearer`."
        ),
        **fastapi_kwargs,
    )
    app.add_api_route(
        TOKEN_PATH,
        _token_route(issuer),
        methods=["POST"],
        tags=["OAuth2"],
        summary="Client credentials token",
        responses={200: {"model": TokenOut}, 400: {"model": Error}, 401: {"model": Error}},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/x-www-form-urlencoded": {
                        "schema": {
                            "type": "object",
                            "required": ["grant_type", "client_id", "client_secret"],
                            "properties": {
                                "grant_type": {"type": "string", "enum": ["client_credentials"]},
                                "client_id": {"type": "string"},
                                "client_secret": {"type": "string", "format": "password"},
                                "scope": {"type": "string", "default": SCOPE},
                            },
                        }
                    }
                },
            }
        },
    )
    app.include_router(build_router(store, faults))
    return app
