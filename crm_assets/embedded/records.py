"""Row-level helpers over the record tables: fetch, write, render a page.

Both embedded CRMs keep each record's API document as JSON text; these helpers keep the
indexed columns (modified, version, deleted, ref) consistent with that document.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from crm_assets.embedded.errors import ApiValidationError


def dumps(doc: Any) -> str:
    """Compact JSON, unicode kept as is (what the API sends)."""
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))


def fetch(conn: Connection, table: sa.Table, record_id: str) -> Row[Any] | None:
    return conn.execute(sa.select(table).where(table.c.id == record_id)).first()


def exists(conn: Connection, table: sa.Table, record_id: str) -> bool:
    return conn.execute(sa.select(table.c.id).where(table.c.id == record_id)).first() is not None


def row_values(
    doc: dict[str, Any],
    *,
    record_id: str,
    modified: str,
    version: int,
    deleted: bool,
    ref: str | None,
) -> dict[str, Any]:
    return {
        "id": record_id,
        "modified": modified,
        "version": version,
        "deleted": deleted,
        "ref": ref,
        "doc": dumps(doc),
    }


def insert(conn: Connection, table: sa.Table, values: dict[str, Any]) -> None:
    conn.execute(sa.insert(table).values(**values))


def update(conn: Connection, table: sa.Table, values: dict[str, Any]) -> None:
    conn.execute(sa.update(table).where(table.c.id == values["id"]).values(**values))


def page_body(docs: Sequence[str], tail: dict[str, Any]) -> bytes:
    """``{"items": [...], **tail}`` assembled from stored JSON without re-parsing it."""
    extra = "".join(f",{json.dumps(k)}:{json.dumps(v)}" for k, v in tail.items())
    return ('{"items":[' + ",".join(docs) + "]" + extra + "}").encode()


def encode_cursor(modified: str, record_id: str) -> str:
    """An opaque keyset cursor: the (modified, id) of the last record of a page."""
    raw = json.dumps([modified, record_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, str]:
    """Inverse of :func:`encode_cursor`; a cursor that is not ours is a 422 on ``cursor``."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = json.loads(raw)
        if (
            isinstance(value, list)
            and len(value) == 2
            and all(isinstance(part, str) for part in value)
        ):
            return value[0], value[1]
    except (binascii.Error, ValueError, UnicodeDecodeError):
        pass
    raise ApiValidationError.one("cursor", "not a cursor returned by this API")
