"""Snapshots of one CRM object as Parquet: typed frames, incremental merge, atomic storage.

A snapshot holds every record seen, one row per id, with the record's fields
(nested objects flattened to dotted names such as ``visitAddress.postCode``)
and a ``_deleted`` flag: soft deletes as the API reports them, hard deletes as
a full rescan finds them. Its cursor is derived from the data itself (the
newest modification time), so a snapshot and its cursor can never disagree.
Each row also carries ``_seq``, the read that last changed it, so a run can plan
only the records changed since the last one it confirmed.
"""

from __future__ import annotations

import io
import json
import time
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

    frame: pl.DataFrame
    new: int
    changed: int
    deleted: int
    fetched: int
    #: rows this read changed (new, edited, deleted, or a column added or gone)
    touched: int = 0
    #: whether there was a snapshot before this read
    had_previous: bool = True

    @property
    def to_store(self) -> pl.DataFrame | None:
        """The frame to store, or None when the stored snapshot holds the same rows (a read
        of the overlap window does not rewrite a million rows)."""
        return None if self.had_previous and not self.touched else self.frame

    @property
    def live(self) -> int:
        """Records not deleted."""
        return self.frame.filter(~pl.col(DELETED)).height


def newest(
    frame: pl.DataFrame | None, modified: str, crm_now: datetime | None = None
) -> datetime | None:
    """The newest modification time in a snapshot, if any; with ``crm_now`` (the CRM's
    own clock), only times that have come: a record dated in the future never moves a
    cursor past the CRM's now, so later edits are not skipped."""
    if frame is None or frame.height == 0:
        return None
    times = frame.get_column(modified)
    if crm_now is not None:
        times = times.filter(times <= crm_now)
    return times.max()  # type: ignore[return-value]


def future_dated(frame: pl.DataFrame | None, modified: str, crm_now: datetime) -> int:
    """How many records are dated after the CRM's now (they are read again until then)."""
    if frame is None or frame.height == 0:
        return 0
    return frame.filter(pl.col(modified) > crm_now).height


def merge_snapshot(
    previous: pl.DataFrame | None,
    fetched: pl.DataFrame,
    id_field: str,
    modified: str,
    full_rescan: bool,
) -> SnapshotChange:
    """The previous snapshot updated with fetched records, one row per id.

    Fetched records replace older rows of the same id (the newest modification
    wins, also within overlapping pages). In a full rescan, an id the CRM no
    longer lists is kept as a row flagged deleted (a hard delete).
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
    this_read = pl.lit(
        max(int(previous.get_column(SEQ).max() or 0) + 1, time.time_ns() // 1000), dtype=pl.Int64
    )
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
    )


class SnapshotStore:
    """Parquet snapshots under one folder: ``<root>/<system>/<object>.parquet``, each
    beside ``<object>.read_at``, when its read began.

    Each write replaces the object whole (see :mod:`crm_assets.engine.storage`), so a
    failed run never leaves a half-written snapshot or overwrites the last good one.
    The read time is an object of its own, written after the snapshot, because an S3
    object's time is when it was written and is not set afterwards: a crash between
    the two leaves an older time, which only makes a writer read again.
    """

    def __init__(self, root: Storage | Path) -> None:
        self.root = root if isinstance(root, Storage) else Storage.at(root)

    def uri(self, system: str, obj: str) -> str:
        """Where the snapshot is, as an operator finds it."""
        return self.root.uri(system, f"{obj}.parquet")

    def exists(self, system: str, obj: str) -> bool:
        return self.root.exists(system, f"{obj}.parquet")

    def read(self, system: str, obj: str) -> pl.DataFrame | None:
        return self.root.read_parquet(system, f"{obj}.parquet")

    def read_at(self, system: str, obj: str) -> float | None:
        """When the stored snapshot's read began (epoch seconds), if it is known."""
        text = self.root.read_text(system, f"{obj}.read_at")
        return None if text is None else float(text)

    def write(self, system: str, obj: str, frame: pl.DataFrame | None, read_started: float) -> str:
        """Store the snapshot and when its read began; returns where it is. ``None``: the
        read changed nothing, only its time is stored (a million rows are not rewritten
        for a read of the overlap window)."""
        if frame is not None:
            self.root.write_parquet(frame, system, f"{obj}.parquet")
        self.root.write_text(repr(read_started), system, f"{obj}.read_at")
        return self.uri(system, obj)

    def read_since(self, system: str, obj: str, seq: int) -> tuple[pl.DataFrame, int] | None:
        """The snapshot's rows read after ``seq``, and how many rows it holds, without
        decoding the rest (a read's rows are stored last, so the row groups before them
        are skipped by their statistics); None without a numbered snapshot."""
        data = self.root.read_bytes(system, f"{obj}.parquet")
        if data is None:
            return None
        frame = pl.scan_parquet(io.BytesIO(data))
        if SEQ not in frame.collect_schema().names():
            return None
        height = frame.select(pl.len()).collect().item()
        return frame.filter(pl.col(SEQ) > seq).collect(), height

    def read_mapped(self, flow: str, side: str, key: str) -> pl.DataFrame | None:
        """The side's mapped frame kept by an earlier run, if it was kept under ``key``
        (see :func:`crm_assets.engine.incremental.mapped_key`)."""
        data = self.root.read_bytes(MAPPED, flow, f"{side}.parquet")
        if data is None or pl.read_parquet_metadata(io.BytesIO(data)).get("key") != key:
            return None
        return pl.read_parquet(io.BytesIO(data))

    def keep_mapped(self, flow: str, side: str, frame: pl.DataFrame, key: str) -> None:
        """Keep a side's mapped frame for the next run, with the key it is valid under: one
        object, replaced whole, so a reader gets one run's frame and that run's key."""
        buffer = io.BytesIO()
        frame.write_parquet(buffer, metadata={"key": key})
        self.root.write_bytes(buffer.getvalue(), MAPPED, flow, f"{side}.parquet")


def since_with_overlap(cursor: datetime | None, overlap: timedelta) -> datetime | None:
    """Where an incremental read starts: the cursor minus an overlap window.

    The window catches records committed late with an earlier timestamp; the
    merge dedupes what it reads twice.
    """
    return None if cursor is None else cursor - overlap
