"""Change detection: has a CRM object changed since a cursor? One small request when not.

A cursor is, per object, the ``(modification time, id)`` of the newest record
seen; records are listed from the cursor's moment on, so a record past the cursor
is a change (records sharing the cursor's moment are read past), unless its
version is one the sync wrote itself: then it only moves the cursor.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from crm_assets.connector import CrmClient
from crm_assets.engine.objects import SourceObject
from crm_assets.engine.state import CLOCK_RESOLUTION_SECONDS, significant

Position = tuple[str, str]  # (modification time as the API writes it, id)

#: Page size of the listing; when nothing changed it returns just the records at the
#: cursor's moment.
PAGE_SIZE = 500


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


#: Of ``(record id, modification time)`` pairs of an object, the ids the sync wrote itself.
OwnWrites = Callable[[SourceObject, list[Position]], set[str]]


def detect_changes(
    client: CrmClient,
    sources: Iterable[SourceObject],
    positions: dict[str, Position],
    own_writes: OwnWrites | None = None,
) -> tuple[list[SourceObject], dict[str, Position]]:
    """The objects changed since their positions, and the positions after those changes.

    A record whose version the sync wrote itself (``own_writes``) moves the position but
    is no change: the sync's writes do not start another run. A record dated after the
    CRM's own now (its clock as its ``Date`` headers say) is neither a change nor a
    position: a cursor past the CRM's now would skip every later edit.
    """
    changed: list[SourceObject] = []
    new_positions = dict(positions)
    for source in sources:
        known = positions.get(source.obj)
        since = _moment(known[0]) if known else None
        now = _crm_now(client)
        newest, edited = known or ("", ""), False
        # When nothing changed this reads the records at the cursor's moment: one request.
        for page in client.pages(source.obj, since, PAGE_SIZE):
            fresh = [
                p
                for r in page
                if (p := _position(r, source))[0] <= now and (known is None or p > known)
            ]
            if not fresh:
                continue
            newest = max(newest, *fresh)
            if not edited:
                mine = own_writes(source, fresh) if own_writes else set()
                edited = any(record_id not in mine for _t, record_id in fresh)
        if newest != (known or ("", "")):
            new_positions[source.obj] = newest
        if edited:
            changed.append(source)
    return changed, new_positions


def _crm_now(client: CrmClient) -> str:
    """The CRM's now as a position's time: our clock plus its measured offset."""
    offset = significant(client.clock_offset()) + CLOCK_RESOLUTION_SECONDS
    return (datetime.now(UTC) + timedelta(seconds=offset)).isoformat(timespec="microseconds")
