"""Snapshots: read what changed in one CRM object since the stored cursor, and store it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from crm_assets.connector import CrmClient
from crm_assets.engine.objects import SourceObject
from crm_assets.engine.snapshot import (
    OVERLAP,
    SnapshotChange,
    SnapshotStore,
    SnapshotSummary,
    records_to_frame,
    since_with_overlap,
)
from crm_assets.engine.state import CLOCK_RESOLUTION_SECONDS, SyncState, significant


@dataclass(frozen=True)
class SnapshotRun:
    """What one snapshot run read and stored."""

    change: SnapshotChange
    since: datetime | None
    pages: int
    cursor: datetime | None
    #: records dated after the CRM's now: read again on each run until their time comes
    future_dated: int = 0
    #: the CRM's clock minus ours, as its ``Date`` headers said during this read
    measured_offset: float | None = None
    #: the stored snapshot's rows, and those not deleted
    rows: int = 0
    live: int = 0


def take_snapshot(
    client: CrmClient,
    source: SourceObject,
    store: SnapshotStore,
    full_rescan: bool = False,
    overlap: timedelta = OVERLAP,
) -> SnapshotRun:
    """Read what changed since the stored snapshot's cursor and store the merged snapshot.

    Everything is read before anything is written: a failed read leaves the last
    good snapshot, and with it the cursor, as they were. The cursor never passes the
    CRM's own now, measured first with a one-record read (our clock plus the offset
    the CRM's ``Date`` header shows): a record dated in the future is read again,
    idempotently, until its time has come. Nor does it pass the CRM's now when the last
    read began: records that read found stamped ahead of that now (the CRM's clock had
    been set back) must not hide what the clock set back stamped after them, once the
    clock is set ahead again.
    """
    read_started = time.time()
    system, obj, modified = source.system_key, source.obj, source.modified_field
    stored = store.open(system, obj)
    if stored is not None and not full_rescan:
        next(iter(client.pages(obj, None, 1)), None)  # one small read: the CRM's now
    crm_now = _crm_now(client)
    since = None
    if not full_rescan and stored is not None:
        cursor = stored.cursor(modified, crm_now)
        began = store.crm_read_at(system, obj)
        since = since_with_overlap(
            cursor if cursor is None or began is None else min(cursor, began), overlap
        )
    records: list[dict[str, Any]] = []
    pages = 0
    for page in client.pages(obj, since):
        records.extend(page)
        pages += 1
    fetched = records_to_frame(records, source.fields, source.deleted_field)
    # stamped with when its read began: a writer that released the flow after that is
    # newer than this snapshot (see crm_assets.sync.guard.refresh_if_stale)
    change, summary = store.merge(
        system,
        obj,
        stored,
        fetched,
        source.id_field,
        modified,
        full_rescan,
        read_started,
        crm_now,  # the CRM's now as this read began
    )
    counts = SnapshotSummary.of(summary, modified, _crm_now(client), overlap)
    return SnapshotRun(
        change,
        since,
        pages,
        counts.cursor,
        counts.future_dated,
        client.clock_offset(),
        rows=counts.rows,
        live=counts.live,
    )


def _crm_now(client: CrmClient) -> datetime:
    """The CRM's now: our clock plus its offset (whole seconds of noise read as none),
    plus the ``Date`` header's resolution, so a record stamped just now is never ahead."""
    offset = significant(client.clock_offset()) + CLOCK_RESOLUTION_SECONDS
    return datetime.now(UTC) + timedelta(seconds=offset)


def read_snapshot(
    client: CrmClient,
    source: SourceObject,
    store: SnapshotStore,
    state: SyncState,
    full_rescan: bool = False,
) -> SnapshotRun:
    """:func:`take_snapshot`, with this read's measurement of the CRM's clock offset
    recorded in the state (conflicts compare times corrected by its recent median)."""
    run = take_snapshot(client, source, store, full_rescan=full_rescan)
    if run.measured_offset is not None:
        state.record_clock(source.system_key, run.measured_offset)
    return run
