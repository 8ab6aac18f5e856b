"""The source objects the project can read and write, and how a snapshot of one is taken.

A dataflow document names systems and entities ("Custom CRM" "Contact"); this
registry says which API object of which client that is, and which of its
fields are the id, the modification time and the soft-delete flag.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from crm_assets.crm_office import client as crm_office
from crm_assets.custom_crm import client as custom_crm
from crm_assets.engine.objects import SourceObject
from crm_assets.engine.snapshot import (
    SnapshotChange,
    SnapshotStore,
    merge_snapshot,
    newest,
    records_to_frame,
    since_with_overlap,
)


class PagedClient(Protocol):
    """What a snapshot needs of a client: every record changed since a moment."""

    system: str

    def pages(self, obj: str, since: datetime | None = None) -> Iterator[list[dict[str, Any]]]: ...


def _custom_crm(entity: str, obj: str, references: dict[str, str]) -> SourceObject:
    return SourceObject(
        system=custom_crm.SYSTEM,
        system_key="custom_crm",
        entity=entity,
        obj=obj,
        id_field="Id",
        modified_field="Modified",
        created_field="Created",
        version_field="Version",
        deleted_field="Deleted",
        fields=custom_crm.FIELDS[obj],
        references=references,
    )


def _crm_office(entity: str, obj: str, references: dict[str, str]) -> SourceObject:
    return SourceObject(
        system=crm_office.SYSTEM,
        system_key="crm_office",
        entity=entity,
        obj=obj,
        id_field="id",
        modified_field="updatedAt",
        created_field="createdAt",
        version_field="rowVersion",
        deleted_field=None,
        fields=crm_office.FIELDS[obj],
        references=references,
    )


SOURCES: tuple[SourceObject, ...] = (
    _custom_crm("Contact", "contacts", {"ProductId": "products"}),
    _custom_crm("Product", "products", {}),
    _crm_office("Contacts", "contacts", {"company.id": "companies"}),
    _crm_office("Companies", "companies", {}),
)


def source_for(system: str, entity: str) -> SourceObject | None:
    """The source object a document's ``<system> <entity>`` stands for, if supported."""
    for source in SOURCES:
        if (source.system, source.entity) == (system, entity):
            return source
    return None


#: How far back an incremental read reaches before the cursor (late commits, clock skew).
OVERLAP = timedelta(seconds=5)


@dataclass(frozen=True)
class SnapshotRun:
    """What one snapshot run read and stored."""

    change: SnapshotChange
    since: datetime | None
    pages: int
    cursor: datetime | None


def take_snapshot(
    client: PagedClient,
    source: SourceObject,
    store: SnapshotStore,
    full_rescan: bool = False,
    overlap: timedelta = OVERLAP,
) -> SnapshotRun:
    """Read what changed since the stored snapshot's cursor and store the merged snapshot.

    Everything is read before anything is written: a failed read leaves the last
    good snapshot, and with it the cursor, as they were.
    """
    previous = store.read(source.system_key, source.obj)
    since = (
        None
        if full_rescan
        else since_with_overlap(newest(previous, source.modified_field), overlap)
    )
    records: list[dict[str, Any]] = []
    pages = 0
    for page in client.pages(source.obj, since):
        records.extend(page)
        pages += 1
    fetched = records_to_frame(records, source.fields, source.deleted_field)
    change = merge_snapshot(previous, fetched, source.id_field, source.modified_field, full_rescan)
    store.write(source.system_key, source.obj, change.frame)
    return SnapshotRun(change, since, pages, newest(change.frame, source.modified_field))
