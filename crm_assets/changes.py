"""Change detection: has a CRM object changed since a cursor? One small request when not.

A cursor is, per object, the ``(modification time, id)`` of the newest record
seen; records are listed from the cursor's moment on, so the first record past
the cursor proves a change (records sharing the cursor's moment are read past).
Only then is the listing read to its end, to move the cursor to the newest record.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from crm_assets.crm_office.client import CrmOfficeClient
from crm_assets.custom_crm.client import CustomCrmClient
from crm_assets.engine.objects import SourceObject

Position = tuple[str, str]  # (modification time as the API writes it, id)

#: Page size of the probe: when nothing changed it returns just the records at the cursor's moment.
PROBE_SIZE = 100


def parse_cursor(cursor: str | None) -> dict[str, Position]:
    """The per-object positions of a sensor cursor (empty for none or a bad one)."""
    if not cursor:
        return {}
    try:
        raw = json.loads(cursor)
    except ValueError:
        return {}
    return {
        k: (str(v[0]), str(v[1])) for k, v in raw.items() if isinstance(v, list) and len(v) == 2
    }


def format_cursor(positions: dict[str, Position]) -> str:
    """A deterministic string: the same positions always give the same cursor."""
    return json.dumps({k: list(v) for k, v in sorted(positions.items())}, separators=(",", ":"))


def _moment(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _position(record: dict[str, Any], source: SourceObject) -> Position:
    """Fixed-width UTC time and id, so positions compare as the API orders records."""
    modified = record.get(source.modified_field)
    moment = (
        _moment(str(modified)).astimezone(UTC).isoformat(timespec="microseconds")
        if modified
        else ""
    )
    return (moment, str(record.get(source.id_field) or ""))


def _pages(
    client: CustomCrmClient | CrmOfficeClient,
    source: SourceObject,
    since: datetime | None,
    size: int,
):
    if isinstance(client, CustomCrmClient):
        return client.pages(source.obj, since, include_deleted=True, limit=size)
    return client.pages(source.obj, since, take=size)


def detect_changes(
    client: CustomCrmClient | CrmOfficeClient,
    sources: Iterable[SourceObject],
    positions: dict[str, Position],
) -> tuple[list[SourceObject], dict[str, Position]]:
    """The objects changed since their positions, and the positions after those changes."""
    changed: list[SourceObject] = []
    new_positions = dict(positions)
    for source in sources:
        known = positions.get(source.obj)
        since = _moment(known[0]) if known else None
        # Many records can share the cursor's moment (a bulk import, the seed): read past
        # them, lazily, up to the first one after the cursor.
        probe = (r for page in _pages(client, source, since, PROBE_SIZE) for r in page)
        if not any(known is None or _position(r, source) > known for r in probe):
            continue
        changed.append(source)
        newest = known or ("", "")
        for page in _pages(client, source, since, 500):
            for record in page:
                newest = max(newest, _position(record, source))
        new_positions[source.obj] = newest
    return changed, new_positions
