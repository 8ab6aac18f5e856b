"""Change detection: has a CRM object changed since a cursor? Small requests when not: one
to learn the CRM's clock, one per object.

A cursor is, per object, a :class:`Watermark`: the ``(modification time, id)`` of the
newest record seen, when the object was last read (our clock, and the CRM's offset then),
and the records seen stamped from :data:`OVERLAP` before the CRM's now on. Records are
listed from the cursor's moment, or from the last read's moment less that window when
earlier (in the CRM's time then or now, whichever is earlier: a clock set back). A listed
record not seen before is a change when it is past the cursor, or stamped inside that
window (committed late: a long transaction, a search index catching up; or stamped after
a clock was set back), or dated ahead of the CRM's now (its clock was set back and its
stamps stay ahead): each such version is a change once. Unless its version is one the
sync wrote itself: then it only moves the cursor. The cursor never passes the CRM's now.
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
from crm_assets.engine.snapshot import OVERLAP
from crm_assets.engine.state import CLOCK_RESOLUTION_SECONDS, significant

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
    """Where one object's listing stands (see the module doc). ``read_at`` is empty for a
    cursor of an earlier version, which knew only the position."""

    position: Position = ("", "")
    #: our clock when the object was last read, and the CRM's clock minus ours then
    read_at: str = ""
    offset: float = 0.0
    #: the records that read listed stamped from the window before the CRM's now on
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
            out[obj] = Watermark(
                (str(value["at"][0]), str(value["at"][1])),
                str(value.get("read", "")),
                float(value.get("offset") or 0.0),
                tuple((str(t), str(i)) for t, i in value.get("recent", [])),
            )
    return out


def format_cursor(marks: dict[str, Watermark]) -> str:
    """A deterministic string: the same watermarks always give the same cursor."""
    return json.dumps(
        {
            obj: {
                "at": list(m.position),
                "read": m.read_at,
                "offset": m.offset,
                "recent": sorted(map(list, m.recent)),
            }
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
    """The objects changed since their watermarks, and the watermarks after those changes
    (the rules: the module doc).

    A record whose version the sync wrote itself (``own_writes``) moves the position but
    is no change: the sync's writes do not start another run. The window is the one the
    snapshot read reaches back (:data:`OVERLAP`), so the run a late record starts reads
    it too.
    """
    changed: list[SourceObject] = []
    new_marks = dict(marks)
    sources = list(sources)
    if sources and client.clock_offset() is None:  # one small read: the CRM's clock
        next(iter(client.pages(sources[0].obj, None, 1)), None)
    for source in sources:
        mark = marks.get(source.obj) or Watermark()
        known, seen = mark.position, set(mark.recent)
        ours = datetime.now(UTC)
        offset = significant(client.clock_offset())
        now = _stamp(ours + timedelta(seconds=offset + CLOCK_RESOLUTION_SECONDS))
        late_from = (
            _stamp(_moment(mark.read_at) + timedelta(seconds=min(mark.offset, offset)) - OVERLAP)
            if mark.read_at
            else None
        )
        since = min(known[0], late_from or known[0]) if known[0] else None
        # from where the next read's window may begin: that read counts the rest as new
        window_from = _stamp(ours + timedelta(seconds=offset - CLOCK_RESOLUTION_SECONDS) - OVERLAP)
        newest, edited, recent = known, False, []
        # When nothing changed this reads the records of the cursor's moment or the window.
        for page in client.pages(source.obj, since and _moment(since), PAGE_SIZE):
            listed = [_position(r, source) for r in page]
            recent += [p for p in listed if p[0] >= window_from]
            newest = max([newest, *(p for p in listed if p[0] <= now)])
            fresh = [
                p
                for p in listed
                if p not in seen and (p > known or (late_from is not None and p[0] >= late_from))
            ]
            if fresh and not edited:
                mine = own_writes(source, fresh) if own_writes else set()
                edited = any(record_id not in mine for _t, record_id in fresh)
        recent = sorted(set(recent))[-RECENT_LIMIT:]
        new_marks[source.obj] = Watermark(newest, _stamp(ours), offset, tuple(recent))
        if edited:
            changed.append(source)
    return changed, new_marks


def _stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds")
