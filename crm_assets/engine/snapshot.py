"""Snapshots of one CRM object as Parquet: typed frames, incremental merge, atomic storage.

A snapshot holds every record seen, one row per id, with the record's fields
(nested objects flattened to dotted names such as ``visitAddress.postCode``)
and a ``_deleted`` flag: soft deletes as the API reports them, hard deletes as
a full rescan finds them. Its cursor is derived from the data itself (the
newest modification time), so a snapshot and its cursor can never disagree.
Each row also carries ``_seq``, the read that last changed it, so a run can plan
only the records changed since the last one it confirmed.

A snapshot is stored as a base and a delta: the rows reads changed since the base
was written. A read of a few edits rewrites the small delta, not a million rows,
and the delta is folded into the base once it outgrows a share of it.
"""

from __future__ import annotations

import io
import json
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl

from crm_assets.engine.storage import Storage

DELETED = "_deleted"
#: the folder beside the systems' folders where each flow's last mapped frames are kept
MAPPED = "_mapped"
#: why a record could not be read as its object's fields say (null: it could)
ERROR = "_error"
#: the read that last changed a row: it only grows (a snapshot made anew starts above any
#: earlier one's, from the clock), so "changed since read N" is ``_seq > N``
SEQ = "_seq"
#: a snapshot's delta is folded into its base once it holds more rows than this share of
#: the base's, and more than :data:`COMPACT_MIN_ROWS` (below, rewriting the base is cheap)
COMPACT_SHARE = 0.05
COMPACT_MIN_ROWS = 1_000
#: kept mapped frames older than this (other than the newest) are removed: a run's
#: mapped files name the frame they extend, and a run's files are kept as long
KEEP_MAPPED_SECONDS = 24 * 3600

#: polars dtype per field kind of the connectors' field lists
FIELD_DTYPES: dict[str, pl.DataType] = {
    "string": pl.String(),
    "integer": pl.Int64(),
    "boolean": pl.Boolean(),
    "float": pl.Float64(),
    "datetime": pl.Datetime("us", "UTC"),
}


def schema(fields: Mapping[str, str]) -> pl.Schema:
    """The Parquet schema of a snapshot of an object with these fields."""
    return pl.Schema(
        {name: FIELD_DTYPES[kind] for name, kind in fields.items()}
        | {DELETED: pl.Boolean(), ERROR: pl.String()}
    )


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted keys back to nested objects; an object whose values are all null is null."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        head, _, rest = key.partition(".")
        if rest:
            out.setdefault(head, {})[rest] = value
        else:
            out[key] = value
    for key, value in out.items():
        if isinstance(value, dict):
            nested = unflatten(value)
            out[key] = None if all(v is None for v in nested.values()) else nested
    return out


def flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested objects to dotted keys: ``{"company": {"id": 1}}`` → ``{"company.id": 1}``."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def records_to_frame(
    records: Iterable[Mapping[str, Any]], fields: Mapping[str, str], deleted_field: str | None
) -> pl.DataFrame:
    """API records as a typed frame; unknown fields dropped, missing ones null.

    A value of the wrong JSON type (text where a number belongs, an object where
    text belongs) is not read as null, which would look like a cleared field: the
    record gets a message in ``_error`` and the sync leaves it alone.
    """
    records = list(records)
    target = schema(fields)
    columns = []
    problems = []
    for name, kind in fields.items():
        raw = [_get(r, name) for r in records]
        values = [None if isinstance(v, list | dict) else v for v in raw]
        if kind == "datetime":
            text = pl.Series(name, values, dtype=pl.String(), strict=False)
            typed = text.str.to_datetime(time_unit="us", strict=False).dt.convert_time_zone("UTC")
        else:
            typed = pl.Series(name, values, dtype=target[name], strict=False)
        columns.append(typed)
        lost = pl.Series([v is not None for v in raw], dtype=pl.Boolean()) & typed.is_null()
        if lost.any():
            shown = [None if v is None else json.dumps(v, default=str)[:60] for v in raw]
            problems.append(
                pl.when(lost).then(
                    pl.format(
                        "{}: {} is not {}",
                        pl.lit(name),
                        pl.lit(pl.Series(shown, dtype=pl.String())),
                        pl.lit(kind),
                    )
                )
            )
    frame = pl.DataFrame(columns)
    deleted = pl.col(deleted_field).fill_null(False) if deleted_field else pl.lit(False)
    joined = pl.concat_str(problems, separator="; ", ignore_nulls=True)
    error = pl.when(joined != "").then(joined) if problems else pl.lit(None)
    return frame.with_columns(deleted.alias(DELETED), error.cast(pl.String).alias(ERROR)).cast(
        dict(target)
    )


def _get(record: Mapping[str, Any], name: str) -> Any:
    """The value at a dotted path (``visitAddress.postCode``); null when a parent is null.

    A record already flattened (``{"visitAddress.postCode": ...}``, as the sync re-reads a
    record after a 412) holds the path as one key.
    """
    if name in record:
        return record[name]
    value: Any = record
    for part in name.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


@dataclass(frozen=True)
class SnapshotChange:
    """A merged snapshot and what changed relative to the previous one."""

    #: the merged rows: every row of ``previous`` (:meth:`SnapshotStore.merge` passes only
    #: the rows a read touches) and the fetched ones
    frame: pl.DataFrame
    new: int
    changed: int
    deleted: int
    fetched: int
    #: rows this read changed (new, edited, deleted, or a column added or gone)
    touched: int = 0
    #: whether there was a snapshot before this read
    had_previous: bool = True
    #: the number of this read (``_seq`` of the rows it changed)
    seq: int = 0

    @property
    def to_store(self) -> pl.DataFrame | None:
        """The frame to store, or None when the stored snapshot holds the same rows (a read
        of the overlap window does not rewrite a million rows)."""
        return None if self.had_previous and not self.touched else self.frame


def newest(
    frame: pl.DataFrame | None, modified: str, crm_now: datetime | None = None
) -> datetime | None:
    """The newest modification time in a snapshot, if any; with ``crm_now`` (the CRM's
    own clock), only times that have come: a record dated in the future never moves a
    cursor past the CRM's now, so later edits are not skipped."""
    if frame is None or frame.height == 0:
        return None
    return frame.select(_newest_come(modified, crm_now)).item()


def _newest_come(modified: str, crm_now: datetime | None) -> pl.Expr:
    """The newest of the ``modified`` times that have come by ``crm_now`` (all: None)."""
    times = pl.col(modified)
    return (times if crm_now is None else times.filter(times <= crm_now)).max()


@dataclass(frozen=True)
class SnapshotSummary:
    """What a merged snapshot's times and deletes say (:meth:`SnapshotStore.merge`)."""

    #: its newest modification time that has come (:func:`newest`)
    cursor: datetime | None
    #: records dated after the CRM's now and the overlap: read again until their time
    future_dated: int
    #: its rows, and those not deleted
    rows: int
    live: int

    @classmethod
    def of(
        cls, summary: pl.DataFrame, modified: str, crm_now: datetime, overlap: timedelta
    ) -> SnapshotSummary:
        """In one pass over a million rows' two columns, not a filtered copy per figure."""
        row = summary.select(
            _newest_come(modified, crm_now).alias("cursor"),
            (pl.col(modified) > crm_now + overlap).sum().alias("future_dated"),
            pl.len().alias("rows"),
            (~pl.col(DELETED)).sum().alias("live"),
        ).row(0, named=True)
        return cls(**row)


def merge_snapshot(
    previous: pl.DataFrame | None,
    fetched: pl.DataFrame,
    id_field: str,
    modified: str,
    full_rescan: bool,
    last_seq: int = 0,
) -> SnapshotChange:
    """The previous snapshot updated with fetched records, one row per id.

    Fetched records replace older rows of the same id (the newest modification
    wins, also within overlapping pages). In a full rescan, an id the CRM no
    longer lists is kept as a row flagged deleted (a hard delete). ``last_seq``: the
    newest read of the snapshot, when ``previous`` holds only part of it.
    """
    fetched = fetched.sort([modified, id_field], nulls_last=False).unique(
        subset=[id_field], keep="last", maintain_order=True
    )
    had_previous = previous is not None
    if previous is None:
        previous = fetched.clear()
    stored_schema = previous.schema
    if SEQ not in previous.columns:  # a snapshot from before reads were numbered
        previous = previous.with_columns(pl.lit(0, dtype=pl.Int64).alias(SEQ))
    seq = max(int(previous.get_column(SEQ).max() or 0) + 1, last_seq + 1, time.time_ns() // 1000)
    this_read = pl.lit(seq, dtype=pl.Int64)
    missing = [c for c in fetched.columns if c not in previous.columns]  # an older snapshot
    wanted = {**fetched.schema, SEQ: pl.Int64()}
    previous = previous.with_columns(
        pl.lit(None, dtype=fetched.schema[c]).alias(c) for c in missing
    ).select(list(wanted))
    # columns added, gone, retyped or numbered now: every row of the stored one differs
    retyped = stored_schema != wanted
    if previous.schema != wanted:  # a million rows are cast only when a type changed
        previous = previous.cast(wanted, strict=False)
    joined = fetched.join(previous, on=id_field, how="left", suffix="__prev", maintain_order="left")
    is_new = pl.col(f"{DELETED}__prev").is_null()
    # any field, not only the modification time: two edits within the CRM's clock
    # resolution share a time, and the second must count as a change of its own
    differs = ~is_new & pl.any_horizontal(
        pl.col(c).ne_missing(pl.col(f"{c}__prev")) for c in fetched.columns if c != id_field
    )
    new = joined.filter(is_new & ~pl.col(DELETED)).height
    changed_rows = joined.filter(differs)
    touched = joined.filter(is_new).height + changed_rows.height
    soft_deleted = changed_rows.filter(pl.col(DELETED) & ~pl.col(f"{DELETED}__prev")).height
    changed = changed_rows.height - soft_deleted
    # a record read again unchanged (the overlap window) keeps the read that changed it
    fetched = joined.select(
        *fetched.columns, pl.when(is_new | differs).then(this_read).otherwise(SEQ).alias(SEQ)
    )
    # a filter, not an anti-join: that would hash the million rows kept to drop a few
    keep_previous = previous.filter(~pl.col(id_field).is_in(fetched.get_column(id_field).implode()))
    if full_rescan:
        vanished = keep_previous.filter(~pl.col(DELETED))
        keep_previous = pl.concat(
            [
                keep_previous.filter(pl.col(DELETED)),
                vanished.with_columns(pl.lit(True).alias(DELETED), this_read.alias(SEQ)),
            ]
        )
        hard_deleted = vanished.height
    else:
        hard_deleted = 0
    # kept rows stay in their order, fetched ones follow (sorted by modification): no sort
    # of the whole snapshot per read
    merged = pl.concat([keep_previous, fetched])
    return SnapshotChange(
        frame=merged,
        new=new,
        changed=changed,
        deleted=soft_deleted + hard_deleted,
        fetched=fetched.height,
        touched=touched + hard_deleted + (merged.height if retyped else 0),
        had_previous=had_previous,
        seq=seq,
    )


#: the suffix of a snapshot's delta beside its base
DELTA = ".delta.parquet"


@dataclass(frozen=True)
class Delta:
    """A snapshot's rows changed since its base was written (see :class:`SnapshotStore`)."""

    frame: pl.DataFrame
    id_field: str
    #: the snapshot's rows when it was written, and the base's rows and newest read then:
    #: while the base is that one, the snapshot still holds as many (None: not known)
    rows: tuple[int, int, int] | None = None
    #: the snapshot's newest modification time when it was written, valid as ``rows``
    newest_at: datetime | None = None

    def newest(self, base: pl.DataFrame | pl.LazyFrame) -> tuple[pl.DataFrame, pl.Series]:
        """Per id of the delta, the later read of its row and the base's (a tie goes to the
        delta), and the delta's ids. A delta written from before another run folded a
        later read into the base never undoes that read. Reads, not modification times,
        decide: a CRM whose clock was set back stamps a newer edit with an older time."""
        ids = self.frame.get_column(self.id_field).implode()
        part = base.filter(pl.col(self.id_field).is_in(ids))
        if isinstance(part, pl.LazyFrame):
            part = part.collect()
        rows = (
            pl.concat([part, self.frame], how="diagonal_relaxed")
            .sort(SEQ, nulls_last=False, maintain_order=True)
            .unique(self.id_field, keep="last", maintain_order=True)
        )
        return rows, ids


@dataclass(frozen=True)
class Stored:
    """A snapshot as stored: its base (lazily: a read decodes the columns and rows it
    needs) and its delta."""

    base: pl.LazyFrame
    delta: Delta | None
    #: the base's newest modification time, as it was written (None: not known)
    newest_at: datetime | None = None

    def frame(self, columns: list[str] | None = None) -> pl.DataFrame:
        """The whole snapshot, one row per id (only ``columns``, when given)."""
        wanted = columns or pl.all()
        if self.delta is None:
            return self.base.select(wanted).collect()
        base = self.base
        if columns is not None:  # the base's rows the delta replaces: these columns only
            present = base.collect_schema().names()
            needed = [self.delta.id_field, SEQ, *columns]
            base = base.select(list(dict.fromkeys(c for c in needed if c in present)))
        rows, ids = self.delta.newest(base)
        kept = base.filter(~pl.col(self.delta.id_field).is_in(ids)).select(wanted)
        return pl.concat([kept.collect(), rows.select(wanted)], how="diagonal_relaxed")

    def cursor(self, modified: str, crm_now: datetime) -> datetime | None:
        """The snapshot's cursor (see :func:`newest`): the newest modification time kept
        with it when that has come (no record is dated after the CRM's now), else from
        its modification times (decoding them cost 13 to 57 ms a million rows)."""
        known = self.newest_at if self.delta is None else self._delta_newest()
        if known is not None and known <= crm_now:
            return known
        return newest(self.frame([modified]), modified, crm_now)

    def _delta_newest(self) -> datetime | None:
        """The delta's newest time, while the base is the one it was written beside."""
        delta = self.delta
        if delta is None or delta.newest_at is None or delta.rows is None:
            return None
        base = self.base.select(pl.len(), pl.col(SEQ).max().fill_null(0)).collect().row(0)
        return delta.newest_at if base == delta.rows[1:] else None


def _newest_text(frame: pl.DataFrame, modified: str) -> str | None:
    """A snapshot's newest modification time as its files keep it (an aware one only)."""
    at = frame.get_column(modified).max() if frame.height else None
    return at.isoformat() if isinstance(at, datetime) and at.tzinfo is not None else None


def _newest_of(meta: Mapping[str, str]) -> datetime | None:
    """The newest modification time a snapshot's file keeps (None from an earlier release)."""
    return datetime.fromisoformat(meta["newest"]) if "newest" in meta else None


#: a merge's working columns: the base's row numbers, the rows taken from its narrow
#: columns, and the fetched times
_ROW = "__row"
_FROM_BASE = "__from_base"
_FETCHED_AT = "__fetched_at"
#: Up to this many rows are taken from a base a slice each (about 1.3 ms a row, in
#: parallel); more, through one filtered read (about 26 ms for any few rows of a million:
#: it decodes every column's pages that hold one).
SLICED_ROWS = 12


#: Up to this many rows, :func:`without_rows` slices around them (each slice a chunk of
#: the result) instead of copying the frame without them.
SLICED_ROWS_OUT = 64


def without_rows(frame: pl.DataFrame, rows: pl.Series) -> pl.DataFrame:
    """A frame without the rows at the ascending positions ``rows``: when they are few,
    the slices around them, which share its columns (a filtered copy of a million rows
    allocates anew, and in a run's new process that cost 20 to 80 ms in page faults)."""
    if rows.len() > SLICED_ROWS_OUT:
        dropped = pl.int_range(pl.len(), dtype=rows.dtype).is_in(rows.implode())
        return frame.lazy().filter(~dropped).collect()
    starts, ends = [0, *(row + 1 for row in rows.to_list())], [*rows.to_list(), frame.height]
    parts = [frame.slice(s, e - s) for s, e in zip(starts, ends, strict=True) if e > s]
    return pl.concat(parts) if parts else frame.clear()


def rows_at(frame: pl.LazyFrame, rows: pl.Series, ids: pl.Series, id_field: str) -> pl.DataFrame:
    """The rows of a stored frame at the positions ``rows`` (those of ``ids``): a slice each
    when they are few (:data:`SLICED_ROWS`), else one filtered read."""
    if rows.len() <= SLICED_ROWS:
        slices = [frame.slice(row, 1) for row in rows.to_list()]
        return pl.concat(pl.collect_all(slices)) if slices else frame.head(0).collect()
    return frame.filter(pl.col(id_field).is_in(ids.implode())).collect()


def _stored_rows(
    base: pl.LazyFrame,
    part: pl.DataFrame,
    delta: Delta | None,
    fetched: pl.DataFrame,
    id_field: str,
    modified: str,
) -> tuple[pl.DataFrame, pl.Expr]:
    """The stored rows a read is merged with (:func:`merge_snapshot`'s ``previous``): those of
    the fetched ids and, whole, the delta's (its newest, :meth:`Delta.newest`); and which
    ids the delta holds.

    ``part`` is the base's id, read, time and delete columns (numbered) of the fetched ids
    and the delta's. A base row of a fetched id whose fetched time differs is a change
    whatever its other fields, and is replaced: it is passed on with those columns only.
    The others (a read of the overlap window, an edit within the CRM's clock resolution, a
    base row newer than the delta's) are compared or kept, so they are read whole."""
    part = part.with_columns(pl.lit(True).alias(_FROM_BASE))
    if delta is None:
        rows, in_delta = part, pl.lit(False)
    else:
        newest, delta_ids = delta.newest(part)
        in_delta = pl.col(id_field).is_in(delta_ids)
        rows = pl.concat([part.filter(~in_delta), newest], how="diagonal_relaxed")
    times = fetched.select(id_field, pl.col(modified).alias(_FETCHED_AT))
    same_time = rows.join(times, on=id_field).filter(
        pl.col(modified).eq_missing(pl.col(_FETCHED_AT))
    )
    whole = pl.col(_FROM_BASE).fill_null(False) & (
        in_delta | pl.col(id_field).is_in(same_time.get_column(id_field).implode())
    )
    wanted = rows.filter(whole)
    schema = base.collect_schema()
    if wanted.is_empty():
        read = pl.DataFrame(schema=schema)
    else:
        read = rows_at(base, wanted.get_column(_ROW), wanted.get_column(id_field), id_field)
    padded = [
        pl.col(c) if c in rows.columns else pl.lit(None, dtype=dtype).alias(c)
        for c, dtype in schema.items()
    ]
    previous = pl.concat([rows.filter(~whole).select(padded), read], how="vertical_relaxed")
    return previous, in_delta


class SnapshotStore:
    """Parquet snapshots under one folder: ``<root>/<system>/<object>.parquet`` (the base),
    beside ``<object>.delta.parquet`` (the rows reads changed since the base was written),
    ``<object>.read_at``, when the last read began, and ``<object>.crm_read_at``, the CRM's
    own time then (the next read starts no later: see :meth:`crm_read_at`).

    Each write replaces an object whole (see :mod:`crm_assets.engine.storage`), so a
    failed run never leaves a half-written snapshot or overwrites the last good one.
    The base is written before its delta is removed, and a delta row counts only where
    it comes from a later read than the base's: a crash between the two,
    or a delta written from before another run folded it in, reads as the same rows.
    The read time is an object of its own, written after the snapshot, because an S3
    object's time is when it was written and is not set afterwards: a crash between
    the two leaves an older time, which only makes a writer read again.
    """

    def __init__(self, root: Storage | Path, compact_min_rows: int = COMPACT_MIN_ROWS) -> None:
        self.root = root if isinstance(root, Storage) else Storage.at(root)
        self.compact_min_rows = compact_min_rows

    def uri(self, system: str, obj: str) -> str:
        """Where the snapshot is, as an operator finds it."""
        return self.root.uri(system, f"{obj}.parquet")

    def exists(self, system: str, obj: str) -> bool:
        return self.root.exists(system, f"{obj}.parquet")

    def read(self, system: str, obj: str, columns: list[str] | None = None) -> pl.DataFrame | None:
        """The whole snapshot, one row per id (only ``columns``, when given), or None
        before the first read."""
        stored = self.open(system, obj)
        return None if stored is None else stored.frame(columns)

    def read_at(self, system: str, obj: str) -> float | None:
        """When the stored snapshot's read began (epoch seconds), if it is known."""
        text = self.root.read_text(system, f"{obj}.read_at")
        return None if text is None else float(text)

    def crm_read_at(self, system: str, obj: str) -> datetime | None:
        """The CRM's own time when the stored snapshot's read began, if it is known.

        A record changed after that read began is stamped later than this, unless the
        CRM's clock went back meanwhile; a snapshot's newest stamp may be later (records
        stamped while the clock was ahead, read while it was behind), so the next read
        starts from the earlier of the two."""
        text = self.root.read_text(system, f"{obj}.crm_read_at")
        return None if text is None else datetime.fromisoformat(text)

    def write(
        self,
        system: str,
        obj: str,
        frame: pl.DataFrame | None,
        read_started: float,
        crm_started: datetime | None = None,
        modified: str | None = None,
    ) -> str:
        """Store the whole snapshot (as its base, folding any delta in) and when its read
        began (our time, and the CRM's when known); returns where it is. ``None``: the read
        changed nothing, only its time is stored (a million rows are not rewritten for a
        read of the overlap window). With ``modified``, the base keeps its newest
        modification time (the next read's cursor, :meth:`Stored.cursor`)."""
        if frame is not None:
            at = _newest_text(frame, modified) if modified else None
            meta = None if at is None else {"newest": at}
            self.root.write_parquet(frame, system, f"{obj}.parquet", metadata=meta)
            self.root.delete(system, f"{obj}{DELTA}")
        self._stamp(system, obj, read_started, crm_started)
        return self.uri(system, obj)

    def _stamp(
        self, system: str, obj: str, read_started: float, crm_started: datetime | None
    ) -> None:
        if crm_started is not None:
            self.root.write_text(crm_started.isoformat(), system, f"{obj}.crm_read_at")
        self.root.write_text(repr(read_started), system, f"{obj}.read_at")

    def merge(
        self,
        system: str,
        obj: str,
        stored: Stored | None,
        fetched: pl.DataFrame,
        id_field: str,
        modified: str,
        full_rescan: bool,
        read_started: float,
        crm_started: datetime | None = None,
    ) -> tuple[SnapshotChange, pl.DataFrame]:
        """Merge a read into the snapshot as ``stored`` (:meth:`open`, before the read) and
        store it.

        Returns what changed, and the merged snapshot's ``modified`` and deleted columns
        (its cursor and counts). A read of a few records rewrites the delta only; a first
        read, a full rescan, a field added or retyped, or a delta past
        :data:`COMPACT_SHARE` of the base writes the whole snapshot."""
        wanted = {**fetched.schema, SEQ: pl.Int64()}
        if (
            full_rescan
            or stored is None
            or stored.base.collect_schema() != pl.Schema(wanted)
            or (stored.delta is not None and stored.delta.id_field != id_field)
        ):
            previous = None if stored is None else stored.frame()
            change = merge_snapshot(previous, fetched, id_field, modified, full_rescan)
            self.write(system, obj, change.to_store, read_started, crm_started, modified)
            return change, change.frame.select(modified, DELETED)
        base, delta = stored.base, stored.delta
        # the base's ids, reads, times and deletes: a few columns of a million rows, where
        # whole rows cost every column's pages (see :func:`_stored_rows`)
        ids = fetched.get_column(id_field)
        if delta is not None:
            ids = pl.concat([delta.frame.get_column(id_field), ids])
        narrow = base.select(id_field, SEQ, modified, DELETED).collect()
        hits = narrow.select(pl.col(id_field).is_in(ids.implode()).arg_true()).to_series()
        part = narrow[hits].with_columns(hits.alias(_ROW))
        previous, in_delta = _stored_rows(base, part, delta, fetched, id_field, modified)
        last_seq = int(narrow.get_column(SEQ).max() or 0)
        change = merge_snapshot(previous, fetched, id_field, modified, False, last_seq)
        # the delta: what it held, and what this read changed (not the unchanged re-reads)
        changed = change.frame.filter(in_delta | (pl.col(SEQ) == change.seq))
        not_changed = ~pl.col(id_field).is_in(changed.get_column(id_field).implode())
        summary = pl.concat(
            [
                without_rows(narrow.select(modified, DELETED), hits),
                part.filter(not_changed).select(modified, DELETED),
                changed.select(modified, DELETED),
            ]
        )
        if changed.height > max(self.compact_min_rows, COMPACT_SHARE * summary.height):
            kept = base.filter(not_changed).collect()
            whole = pl.concat([kept, changed])
            self.write(system, obj, whole, read_started, crm_started, modified)
        elif change.touched:
            buffer = io.BytesIO()
            rows = {"rows": summary.height, "base_rows": narrow.height, "base_seq": last_seq}
            meta = {"id": id_field} | {k: str(v) for k, v in rows.items()}
            at = _newest_text(summary, modified)
            changed.write_parquet(buffer, metadata=meta | ({"newest": at} if at else {}))
            self.root.write_bytes(buffer.getvalue(), system, f"{obj}{DELTA}")
            self._stamp(system, obj, read_started, crm_started)
        else:
            self.write(system, obj, None, read_started, crm_started)
        return change, summary

    def read_since(self, system: str, obj: str, seq: int) -> tuple[pl.DataFrame, int] | None:
        """The snapshot's rows read after ``seq``, and how many rows it holds, without
        decoding the rest of the base (its newest reads are stored last, so the row groups
        before them are skipped by their statistics); None without a numbered snapshot."""
        stored = self.open(system, obj)
        if stored is None or SEQ not in stored.base.collect_schema().names():
            return None
        base, delta = stored.base, stored.delta
        height, last_seq = base.select(pl.len(), pl.col(SEQ).max().fill_null(0)).collect().row(0)
        recent = base.filter(pl.col(SEQ) > seq).collect()
        if delta is None:
            return recent, height
        in_delta = pl.col(delta.id_field).is_in(delta.frame.get_column(delta.id_field).implode())
        # The delta's records the base holds too are counted, not decoded (their rows cost
        # twice their ids). A base row newer than the delta's (folded in after the delta was
        # written) is either recent, and ``newest`` keeps it, or older than ``seq``, and so
        # is the delta's row: neither is fresh.
        rows, _ = delta.newest(recent.filter(in_delta))
        fresh = pl.concat(
            [recent.filter(~in_delta), rows.filter(pl.col(SEQ) > seq)], how="diagonal_relaxed"
        )
        if delta.rows is not None and delta.rows[1:] == (height, last_seq):
            return fresh, delta.rows[0]  # the base it was written beside: its count holds
        held = base.filter(in_delta).select(pl.len()).collect().item()
        return fresh, height + rows.height - held

    def open(self, system: str, obj: str) -> Stored | None:
        """The stored snapshot, read once (a run's cursor and merge share it), or None
        before the first read.

        The delta is read before the base: a run folding the delta into a new base
        (:meth:`write`) writes that base before it removes the delta, so a delta read
        first is either still beside the base read next or folded into it. Read the other
        way round, a base read just before another run's fold and a delta read just after
        it lose the delta's rows, and a linked record missing from a snapshot reads as
        deleted (its link is tombstoned for good)."""
        raw = self.root.read_bytes(system, f"{obj}{DELTA}")
        data = self.root.read_bytes(system, f"{obj}.parquet")
        if data is None:
            return None
        base = pl.scan_parquet(io.BytesIO(data))
        at = _newest_of(pl.read_parquet_metadata(io.BytesIO(data)))
        if raw is None:
            return Stored(base, None, at)
        meta = pl.read_parquet_metadata(io.BytesIO(raw))
        rows = None
        if "base_seq" in meta:  # a delta an earlier release wrote has no counts
            rows = (int(meta["rows"]), int(meta["base_rows"]), int(meta["base_seq"]))
        delta = Delta(pl.read_parquet(io.BytesIO(raw)), meta["id"], rows, _newest_of(meta))
        return Stored(base, delta, at)

    def kept_mapped(self, flow: str, side: str, key: str) -> KeptFrame | None:
        """The side's mapped frame kept by an earlier run, if it was kept under ``key``
        (see :func:`crm_assets.engine.incremental.mapped_key`)."""
        name = self.root.read_text(MAPPED, flow, f"{side}.current")
        data = None if name is None else self.root.read_bytes(MAPPED, flow, side, name)
        if data is None:
            return None
        kept = KeptFrame.of(self.root.key(MAPPED, flow, side, name), data)
        return kept if kept.key == key else None

    def keep_mapped(
        self, flow: str, side: str, frame: pl.DataFrame, key: str, counts: dict[str, int]
    ) -> KeptFrame:
        """Keep a side's mapped frame for the next runs, with the key it is valid under and
        its ``counts`` (a run's step reports them without decoding the columns counted).

        Each kept frame is an object of its own that is never rewritten, so a run's
        mapped files can name it (a run planning meanwhile still reads the frame it
        mapped against); ``<side>.current`` names the newest. Frames older than
        :data:`KEEP_MAPPED_SECONDS`, other than the newest, are removed."""
        seq = int(frame.get_column("seq").max() or 0) if frame.height else 0
        name = f"{seq}-{uuid.uuid4().hex[:12]}.parquet"
        buffer = io.BytesIO()
        meta = {"key": key, "seq": str(seq), "rows": str(frame.height)}
        if counts["conversion_errors"] <= KEPT_ERROR_IDS:
            errors = frame.filter(pl.col("error").is_not_null()).get_column("id").to_list()
            meta |= {"counts": json.dumps(counts), "error_ids": json.dumps(errors)}
        frame.write_parquet(buffer, metadata=meta, data_page_size=KEPT_PAGE_BYTES)
        self.root.write_bytes(buffer.getvalue(), MAPPED, flow, side, name)
        self.root.write_text(name, MAPPED, flow, f"{side}.current")
        cutoff = time.time() - KEEP_MAPPED_SECONDS
        folder = self.root.child(MAPPED, flow, side)
        old = [k for k, at in folder.objects() if at < cutoff and not k.endswith(f"/{name}")]
        if old:
            folder.remove_keys(old)
        return KeptFrame.of(self.root.key(MAPPED, flow, side, name), buffer.getvalue())


@dataclass(frozen=True)
class KeptFrame:
    """A side's mapped frame as an earlier run kept it (:meth:`SnapshotStore.keep_mapped`)."""

    #: its key in the data folder (what a run's mapped files name)
    path: str
    #: the newest snapshot read it holds, and its rows
    seq: int
    rows: int
    data: bytes
    #: what it depends on besides its snapshot (``mapped_key``)
    key: str | None = None
    #: its counts as it was kept (:meth:`SnapshotStore.keep_mapped`) and the ids of its
    #: rows with a conversion error: ``None`` with more than :data:`KEPT_ERROR_IDS`, or in
    #: a frame an earlier release kept (their columns are then counted)
    counts: dict[str, int] | None = None
    error_ids: list[str] | None = None

    @classmethod
    def of(cls, path: str, data: bytes) -> KeptFrame:
        """The kept frame stored at ``path`` as ``data``."""
        meta = pl.read_parquet_metadata(io.BytesIO(data))
        counts, errors = (
            json.loads(meta[k]) if k in meta else None for k in ("counts", "error_ids")
        )
        key = meta.get("key")
        return cls(path, int(meta["seq"]), int(meta["rows"]), data, key, counts, errors)

    def scan(self) -> pl.LazyFrame:
        return pl.scan_parquet(io.BytesIO(self.data))

    def columns(self, names: list[str]) -> pl.DataFrame:
        """Its ``names`` columns, decoded once a process: a run's steps share one (Dagster's
        in-process executor), so the columns its mapped step decodes to count rows are
        those its reconciled step finds its scope by. The frames a process read last are
        held (:data:`DECODED_FRAMES`); a kept frame is never rewritten, so its key names
        its contents."""
        key = (self.path, len(self.data))
        with _DECODED_LOCK:
            held = _DECODED.pop(key, None)
        missing = [c for c in names if held is None or c not in held.columns]
        if missing:
            decoded = self.scan().select(missing).collect()
            held = decoded if held is None else held.hstack(decoded)
        with _DECODED_LOCK:
            _DECODED[key] = held
            while len(_DECODED) > DECODED_FRAMES:
                _DECODED.popitem(last=False)
        return held.select(names)

    def rows_of(self, ids: pl.Series) -> pl.DataFrame:
        """Every column of its rows of ``ids``, found by the decoded id column: a few rows
        cost a slice each, not every column of the million (:func:`rows_at`)."""
        found = self.columns(["id"]).with_row_index(_ROW).filter(pl.col("id").is_in(ids.implode()))
        return rows_at(self.scan(), found.get_column(_ROW), found.get_column("id"), "id")


#: A kept frame's page size: a slice of one row (:meth:`KeptFrame.rows_of`) decodes the
#: pages holding it, one per column (10 rows of a million: 9 ms, against 23 ms with
#: polars' default pages of 1 MB; decoding 7 columns whole, 27 against 25 ms)
KEPT_PAGE_BYTES = 65_536
#: A kept frame lists the ids of its rows with a conversion error up to this many (more,
#: and a run counts them in its ``error`` column)
KEPT_ERROR_IDS = 1_000
#: How many kept frames' decoded columns a process holds (:meth:`KeptFrame.columns`): each
#: side of two flows.
DECODED_FRAMES = 4
_DECODED: OrderedDict[tuple[str, int], pl.DataFrame] = OrderedDict()
_DECODED_LOCK = threading.Lock()


def forget_decoded() -> None:
    """Drop the kept frames' columns this process decoded: it then reads them as a new
    run's process does."""
    with _DECODED_LOCK:
        _DECODED.clear()


#: How far back an incremental read reaches before the cursor (late commits, clock skew);
#: the change sensors look back as far, so a run they start reads what they saw.
OVERLAP = timedelta(seconds=5)


def since_with_overlap(cursor: datetime | None, overlap: timedelta) -> datetime | None:
    """Where an incremental read starts: the cursor minus an overlap window.

    The window catches records committed late with an earlier timestamp; the
    merge dedupes what it reads twice.
    """
    return None if cursor is None else cursor - overlap
