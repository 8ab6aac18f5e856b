"""Error bodies and input validation shared by both embedded CRMs.

Every validation failure, whether FastAPI found it (malformed JSON, a bad query parameter,
a wrong JSON type) or a handler did (an unknown reference), is answered 422 with
``{"errors": [{"field", "message"}]}`` so clients can file a per-record error. Other errors
are ``{"error": <code>, "message": <text>}``. Malformed input never produces a 5xx.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from email_validator import EmailNotValidError, validate_email
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

MAX_STRING = 255
MAX_DESCRIPTION = 4000


def _check_email(value: str) -> str:
    """Well formed (syntax only, no DNS); surrounding whitespace is tolerated and kept.

    Real CRMs hold e-mails typed with a stray space; refusing them would make data that
    already exists on one side impossible to sync to the other.
    """
    if value.strip() == "":
        return value
    try:
        validate_email(value.strip(), check_deliverability=False)
    except EmailNotValidError as exc:
        raise ValueError(f"not a valid e-mail address: {exc}") from None
    return value


def _check_not_blank(value: str) -> str:
    if value.strip() == "":
        raise ValueError("must not be empty")
    return value


#: A JSON string of at most 255 characters (no coercion from numbers).
Str255 = Annotated[str, Field(strict=True, max_length=MAX_STRING)]
#: A description: a JSON string of at most 4,000 characters.
Text4000 = Annotated[str, Field(strict=True, max_length=MAX_DESCRIPTION)]
#: A required, non-blank name.
NonBlank = Annotated[
    str, Field(strict=True, max_length=MAX_STRING), AfterValidator(_check_not_blank)
]
#: A well-formed e-mail address (an empty string means none).
EmailAddress = Annotated[
    str, Field(strict=True, max_length=MAX_STRING), AfterValidator(_check_email)
]
#: A JSON boolean (``1`` or ``"true"`` are refused).
StrictBool = Annotated[bool, Field(strict=True)]
#: A JSON integer in the signed 64-bit range.
StrictInt64 = Annotated[int, Field(strict=True, ge=-(2**63), le=2**63 - 1)]


class ApiValidationError(Exception):
    """Raised by handlers for input that parsed but is not acceptable (answered 422)."""

    def __init__(self, errors: Sequence[dict[str, Any]]) -> None:
        super().__init__("; ".join(f"{e['field']}: {e['message']}" for e in errors))
        self.errors = list(errors)

    @classmethod
    def one(cls, field: str | None, message: str) -> ApiValidationError:
        return cls([{"field": field, "message": message}])


class ApiError(Exception):
    """A non-validation error with a status, a short code and a message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def field_errors(errors: Sequence[Any], prefix: str = "") -> list[dict[str, Any]]:
    """Translate pydantic / FastAPI error dicts into ``[{"field", "message"}]``.

    The location's leading ``body``/``query``/``path``/``header`` is dropped so the field is
    named as the client wrote it (``Email``, ``company.id``, ``limit``); a malformed JSON body
    is reported on the field ``body``.
    """
    out: list[dict[str, Any]] = []
    for err in errors:
        loc = [str(part) for part in err.get("loc", ())]
        kind = err.get("type", "")
        if kind == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "")
            out.append({"field": "body", "message": f"malformed JSON: {detail}".rstrip(": ")})
            continue
        if loc and loc[0] in {"body", "query", "path", "header", "cookie"}:
            loc = loc[1:]
        # tagged unions / function validators add their own segments; keep only field names
        loc = [part for part in loc if not part.startswith(("function-", "nullable["))]
        field = ".".join(loc)
        if prefix:
            field = f"{prefix}.{field}" if field else prefix
        message = str(err.get("msg", "invalid value"))
        if kind == "extra_forbidden":
            message = "unknown field"
        elif kind == "missing":
            message = "required field is missing"
        elif message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        out.append({"field": field or "body", "message": message})
    return out


def validation_error_body(errors: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {"errors": list(errors)}


def install_error_handlers(app: FastAPI) -> None:
    """Make every error answer in the documented shape instead of FastAPI's ``detail``."""

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(validation_error_body(field_errors(exc.errors())), status_code=422)

    @app.exception_handler(ValidationError)
    async def _pydantic_validation(_request: Request, exc: ValidationError) -> JSONResponse:
        return JSONResponse(validation_error_body(field_errors(exc.errors())), status_code=422)

    @app.exception_handler(ApiValidationError)
    async def _api_validation(_request: Request, exc: ApiValidationError) -> JSONResponse:
        return JSONResponse(validation_error_body(exc.errors), status_code=422)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.code, "message": exc.message}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and "parsing the body" in str(exc.detail):
            # a body FastAPI could not parse beyond a JSON syntax error (e.g. nested too deep)
            errors = [{"field": "body", "message": "malformed JSON: the body could not be parsed"}]
            return JSONResponse(validation_error_body(errors), status_code=422)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(
            {"error": code, "message": str(exc.detail)},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )


def parse_if_match(header: str | None) -> int | str | None:
    """The version an ``If-Match`` header asks for: an int, ``"*"``, ``None`` (absent).

    Accepts ``"3"``, ``W/"3"`` and a bare ``3``; anything else returns ``-1``, a version that
    never matches (answered 412, as HTTP prescribes for an unmatched entity tag).
    """
    if header is None:
        return None
    text = header.strip()
    if text == "*":
        return "*"
    if text.startswith("W/"):
        text = text[2:]
    text = text.strip('"')
    try:
        return int(text)
    except ValueError:
        return -1


def etag(version: int) -> str:
    return f'"{version}"'
