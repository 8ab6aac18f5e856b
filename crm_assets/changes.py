"""Change detection: has a CRM object changed since a cursor? One small request when not.

A cursor is, per object, the ``(modification time, id)`` of the newest record seen,
the CRM's now when that object was last read, and the records seen stamped within
:data:`LATE_WINDOW` of that now. Records are listed from the earlier of the cursor's
moment and that now less the window: a record past the cursor is a change (records
sharing the cursor's moment are read past), and so is one stamped before it that the
last read did not see (committed late: a long transaction, a search index catching up).
Unless its version is one the sync wrote itself: then it only moves the cursor.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from crm_assets.connector import CrmClient
from crm_assets.engine.objects import SourceObject
from crm_assets.engine.state import CLOCK_RESOLUTION_SECONDS, significant
from crm_assets.sync.snapshots import OVERLAP

Position = tuple[str, str]  # (modification time as the API writes it, id)

#: Page size of the listing; when nothing changed it returns just the records at the
#: cursor's moment (and those of the last read's window).
PAGE_SIZE = 500

#: At most this many of the records seen in the window are kept in the cursor (the newest):
#: a bulk import stays a small cursor, and a record left out that is listed again counts as
#: a change, which at worst starts a run that finds nothing to do.
RECENT_LIMIT = 500


@dataclass(frozen=True)
class Watermark:
    """Where one object's listing stands: the newest record seen, the CRM's now when it was
    read (empty for a cursor from before late commits were looked for), and the records seen
    stamped within the window before that now."""

    position: Position = ("", "")
    read_at: str = ""
    recent: tuple[Position, ...] = field(default_factory=tuple)


def parse_cursor(cursor: str | None) -> dict[str, Watermark]:
    """The per-object watermarks of a sensor cursor (empty for none or a bad one); a
    cursor of positions alone (an earlier version's) reads as watermarks without a window."""
    if not cursor:
        return {}
    try:
        raw = json.loads(cursor)
    except ValueError:
        return {}
    out = {}
    for obj, value in raw.items():
        if isinstance(value, list) and len(value) == 2:
            out[obj] = Watermark((str(value[0]), str(value[1])))
        elif isinstance(value, dict) and isinstance(value.get("at"), list):
            recent = tuple((str(t), str(i)) for t, i in value.get("recent", []))
            out[obj] = Watermark(
                (str(value["at"][0]), str(value["at"][1])), str(value.get("read", "")), recent
            )
    return out


def format_cursor(marks: dict[str, Watermark]) -> str:
    """A deterministic string: the same watermarks always give the same cursor."""
    return json.dumps(
        {
            obj: {"at": list(m.position), "read": m.read_at, "recent": sorted(map(list, m.recent))}
            for obj, m in sorted(marks.items())
        },
        separators=(",", ":"),
    )


def cursor_key(cursor: str) -> str:
    """A short, deterministic name of a cursor (for run keys; a cursor lists records)."""
    return hashlib.sha256(cursor.encode()).hexdigest()[:16]


def _moment(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _position(record: dict[str, Any], source: SourceObject) -> Position:
    """Fixed-width UTC time and id, so positions compare as the API orders records."""
    modified = record.get(source.modified_field)
    moment = _stamp(_moment(str(modified))) if modified else ""
    return (moment, str(record.get(source.id_field) or ""))


#: Of ``(record id, modification time)`` pairs of an object, the ids the sync wrote itself.
OwnWrites = Callable[[SourceObject, list[Position]], set[str]]


def detect_changes(
    client: CrmClient,
    sources: Iterable[SourceObject],
    marks: dict[str, Watermark],
    own_writes: OwnWrites | None = None,
) -> tuple[list[SourceObject], dict[str, Watermark]]:
    """The objects changed since their watermarks, and the watermarks after those changes.

    A record whose version the sync wrote itself (``own_writes``) moves the position but
    is no change: the sync's writes do not start another run. A record dated after the
    CRM's own now (its clock as its ``Date`` headers say) is neither a change nor a
    position: a cursor past the CRM's now would skip every later edit. A record that
    becomes visible up to :data:`OVERLAP` after its stamp (the window the snapshot read
    reaches back, so the run started reads it too) is a change when the last read did not
    see it, even stamped before the newest record seen.
    """
    changed: list[SourceObject] = []
    new_marks = dict(marks)
    for source in sources:
        mark = marks.get(source.obj) or Watermark()
        known = mark.position
        now = _crm_now(client)
        # what the last read may have missed: stamped in its window, committed after it
        late_from = _stamp(_moment(mark.read_at) - OVERLAP) if mark.read_at else None
        since = min(known[0], late_from or known[0]) if known[0] else None
        seen, window_from = set(mark.recent), _stamp(_moment(now) - OVERLAP)
        newest, edited, recent = known, False, []
        # When nothing changed this reads the records at the cursor's moment: one request.
        for page in client.pages(source.obj, since and _moment(since), PAGE_SIZE):
            listed = [p for r in page if (p := _position(r, source))[0] <= now]
            recent += [p for p in listed if p[0] >= window_from]
            fresh = [p for p in listed if p > known or _late(p, late_from, seen)]
            if not fresh:
                continue
            newest = max(newest, *fresh)
            if not edited:
                mine = own_writes(source, fresh) if own_writes else set()
                edited = any(record_id not in mine for _t, record_id in fresh)
        new_marks[source.obj] = Watermark(newest, now, tuple(sorted(set(recent))[-RECENT_LIMIT:]))
        if edited:
            changed.append(source)
    return changed, new_marks


def _late(position: Position, late_from: str | None, seen: set[Position]) -> bool:
    return late_from is not None and position[0] >= late_from and position not in seen


def _stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def _crm_now(client: CrmClient) -> str:
    """The CRM's now as a position's time: our clock plus its measured offset."""
    offset = significant(client.clock_offset()) + CLOCK_RESOLUTION_SECONDS
    return _stamp(datetime.now(UTC) + timedelta(seconds=offset))
