"""Incremental reconcile: the part of the state a set of changed records can affect.

Reconciling that part gives the same decisions for those records as a full
reconcile, at a cost that follows the number of changes rather than the size of
the state: the changed records, the records linked to them, and every record
sharing a merge key with any of these (repeated until nothing new joins, since
an ambiguous match is decided by all records holding the key). Dead letters and
deferred records belong in the changed set too, so they are retried.

What changed is told by the snapshots' read sequence (``seq`` in a mapped frame):
a confirmed plan leaves a :class:`Mark` with the reads it covered, and the next run
takes the records read since, plus those the state says are unfinished.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timedelta
from typing import Any

import polars as pl

from crm_assets.engine.mapping import MAPPED_FORMAT, FlowMapping, map_side
from crm_assets.engine.reconcile import SIDES, other
from crm_assets.engine.snapshot import KeptFrame, without_rows
from crm_assets.engine.state import SyncState, dead_letter_record

#: Links changed this long before a mark count as changed after it: the hosts of one
#: deployment may disagree on the time by that much (more, and a link written by a host
#: running behind waits for the nightly full plan).
CLOCK_MARGIN = timedelta(seconds=60)
#: An incremental plan pays per record in its scope, a full one per record of the flow:
#: when more than this share of a flow's records changed (a bulk import, the run after a
#: first sync), the full plan is the faster of the two...
FULL_PLAN_SHARE = 0.05
#: ...in flows of at least this many records (below, either is fast)
FULL_PLAN_MIN_RECORDS = 10_000


@dataclass(frozen=True)
class Mark:
    """What the last confirmed plan of a flow covered: the document's rows (a digest),
    each side's snapshot reads, when it was made, the records it left ambiguous, and how
    many links the flow had at least (links are never removed, only tombstoned: the
    breaker need not count them when a plan changes fewer records than its share of
    these).

    An ambiguous record's status changes only with its group (the records sharing a
    merge-key value with it): ``groups`` keeps each one's candidates and keys, so a plan
    takes in the groups its changes touch (a change of one's key away from the others
    settles them all, and the old key is nowhere else to be found) and tells the others
    as this mark left them."""

    digest: str
    a: int
    b: int
    at: str  # ISO time of the plan
    ambiguous: dict[str, list[str]] = field(default_factory=lambda: {"a": [], "b": []})
    links: int = 0
    #: per side, ``candidates, key0, key1, ...`` of the ``ambiguous`` records, a list per
    #: column in their order; ``None`` in a mark of an earlier release (its records are
    #: then planned again)
    groups: dict[str, dict[str, list[Any]]] | None = None

    @classmethod
    def after(
        cls,
        mapping: FlowMapping,
        frames: tuple[pl.DataFrame, pl.DataFrame],
        at: datetime,
        ambiguous: pl.DataFrame,
        links: int,
        earlier: tuple[Mark, Scope] | None = None,
    ) -> Mark:
        """The mark a plan of the mapped ``frames`` leaves once written: ``ambiguous`` is
        the plan's (``side, id, candidates``), ``links`` how many links the flow has at
        least; an incremental plan keeps ``earlier`` ambiguous records outside its scope."""
        keys = _key_names(mapping)
        held = frames if earlier is None else (earlier[1].a, earlier[1].b)
        found = pl.concat(
            [
                _with_keys(ambiguous.filter(pl.col("side") == side), frame, keys)
                for side, frame in zip(SIDES, held, strict=True)
            ]
        )
        if earlier is not None:
            mark, scope = earlier
            looked_at = pl.concat(
                [
                    scope.a.select(pl.lit("a").alias("side"), pl.col("id").cast(pl.String)),
                    scope.b.select(pl.lit("b").alias("side"), pl.col("id").cast(pl.String)),
                ]
            )
            kept = mark.ambiguous_records(len(keys)).join(looked_at, on=["side", "id"], how="anti")
            found = pl.concat([kept, found])
        found = found.unique(["side", "id"], keep="last").sort("side", "id")
        per_side = {side: found.filter(pl.col("side") == side) for side in SIDES}
        return cls(
            mapping_digest(mapping),
            *(last_read(f) for f in frames),
            at.isoformat(),
            {side: rows.get_column("id").to_list() for side, rows in per_side.items()},
            links,
            {
                side: rows.drop("side", "id").to_dict(as_series=False)
                for side, rows in per_side.items()
            },
        )

    def ambiguous_records(self, keys: int) -> pl.DataFrame:
        """``side, id, candidates, key0, ...`` of the records it left ambiguous (a mark of
        an earlier release knows their ids only: the rest is null)."""
        schema = {"candidates": pl.Int64} | {f"key{i}": pl.String for i in range(keys)}
        sides = []
        for side in SIDES:  # column by column: thousands of rows as Python tuples cost 27 ms
            ids = pl.Series("id", self.ambiguous[side], pl.String)
            known = (
                pl.DataFrame(self.groups[side], schema=schema)
                if self.groups
                else pl.DataFrame(schema=schema).clear(ids.len())
            )
            sides.append(known.select(pl.lit(side).alias("side"), ids, *schema))
        return pl.concat(sides)

    def touched(self, changed: dict[str, pl.Series], keys: int) -> dict[str, pl.Series]:
        """Per side, the ids of the records it left ambiguous that a plan of the ``changed``
        records must look at again: the groups holding one of them (all, for a mark
        without their keys)."""
        records = self.ambiguous_records(keys)
        if self.groups is not None:
            hit = pl.any_horizontal(
                (pl.col("side") == side) & pl.col("id").is_in(ids.cast(pl.String).implode())
                for side, ids in changed.items()
            )
            values = records.filter(hit)
            shares = [
                pl.col(f"key{i}").is_in(values.get_column(f"key{i}").drop_nulls().implode())
                for i in range(keys)
            ]
            records = records.filter(pl.any_horizontal([hit, *shares]))
        return {side: records.filter(pl.col("side") == side).get_column("id") for side in SIDES}

    def to_json(self) -> str:
        # its fields as they are: ``asdict`` deep-copies thousands of ambiguous ids per run
        return json.dumps({f.name: getattr(self, f.name) for f in fields(self)})


def _key_names(mapping: FlowMapping) -> list[str]:
    return [f"key{i}" for i in range(len(mapping.merge))]


def _with_keys(ambiguous: pl.DataFrame, frame: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    """One side's ambiguous records (``side, id, candidates``) with their merge keys, taken
    from the mapped ``frame`` that holds them."""
    ids = ambiguous.get_column("id").cast(pl.String)
    held = rows_where(frame.select("id", *keys), pl.col("id").cast(pl.String).is_in(ids.implode()))
    return ambiguous.select(
        "side", pl.col("id").cast(pl.String), pl.col("candidates").cast(pl.Int64)
    ).join(
        held.select(pl.col("id").cast(pl.String), *[pl.col(k).cast(pl.String) for k in keys]),
        on="id",
        how="left",
    )


def last_read(frame: pl.DataFrame) -> int:
    """The newest snapshot read a mapped frame holds (0 for none)."""
    return int(frame.get_column("seq").max() or 0) if frame.height else 0


def mapping_digest(mapping: FlowMapping) -> str:
    """A digest of what the flow maps and how: a document edit to its rows, or a release
    that maps values differently (:data:`MAPPED_FORMAT`), makes the next plan full and
    maps every record anew."""
    text = repr((MAPPED_FORMAT, mapping.name, mapping.a, mapping.b, mapping.columns, mapping.merge))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def mapped_key(mapping: FlowMapping, side: str, refs: dict[str, pl.DataFrame]) -> str:
    """What a side's mapped frame depends on besides its snapshot: the flow's rows, and the
    links its references translate through (a new link of a referenced record changes
    the mapped value of every record pointing at it)."""
    digest = hashlib.sha256(f"{mapping_digest(mapping)}/{side}/{pl.__version__}".encode())
    for name in sorted(refs) if side == "b" else ():
        pairs = refs[name].select(pl.concat_str("a_id", "b_id", separator="\t").sort())
        text = pairs.to_series().str.join("\n").item() if pairs.height else ""
        digest.update(f"{name}\n{text}\n".encode())
    return digest.hexdigest()[:24]


@dataclass(frozen=True)
class MappedSide:
    """One side of a flow as a run maps it: the rows mapped now and the kept frame they
    update (replacing its rows of the same ids), or without a kept frame, every row.

    A sensor's run of a few edits maps, stores and passes on those few rows; the kept
    frame is named, not copied (:meth:`SnapshotStore.keep_mapped`)."""

    fresh: pl.DataFrame
    kept: KeptFrame | None = None
    #: :meth:`counts` of the kept frame's rows that ``fresh`` does not replace, when known
    kept_counts: dict[str, int] | None = None

    def frame(self) -> pl.DataFrame:
        """Every row of the side."""
        if self.kept is None:
            return self.fresh
        return upsert_rows(self.kept.scan(), self.fresh)

    def narrow(self, columns: list[str]) -> pl.DataFrame:
        """Every row, of ``columns`` at least: a kept frame decodes those only (a frame in
        memory is given as it is)."""
        if self.kept is None:
            return self.fresh
        return upsert_rows(self.kept.columns(columns), self.fresh.select(columns))

    def whole_rows(self, rows: pl.DataFrame) -> pl.DataFrame:
        """Every column of ``rows`` (some of :meth:`narrow`'s): a kept frame's few rows are
        decoded from it, not the million."""
        if self.kept is None:
            return rows
        ids = rows.get_column("id")
        fresh = rows_where(self.fresh, pl.col("id").is_in(ids.implode()))
        kept = self.kept.rows_of(ids.filter(~ids.is_in(self.fresh.get_column("id").implode())))
        return pl.concat([kept, fresh])

    def counts(self) -> dict[str, int]:
        """Its records (not deleted), conversion errors and unresolved references, reading
        only those columns of the kept frame (none, when ``kept_counts`` has them)."""
        total = _counted(self.fresh)
        kept = self.kept_counts
        if kept is None:
            kept = {} if self.kept is None else _kept_counts(self.kept, self.fresh, [])[1]
        return {k: v + kept.get(k, 0) for k, v in total.items()}


def _counted(frame: pl.DataFrame) -> dict[str, int]:
    """The counts a mapped step reports (:meth:`MappedSide.counts`) of a frame's rows."""
    counts = frame.select(
        (~pl.col("deleted")).sum().alias("records"),
        pl.col("error").is_not_null().sum().alias("conversion_errors"),
        pl.col("unresolved").sum().alias("unresolved_references"),
    )
    return {k: int(v or 0) for k, v in counts.row(0, named=True).items()}


def _kept_counts(
    kept: KeptFrame, fresh: pl.DataFrame, also: list[str]
) -> tuple[int, dict[str, int]]:
    """How many of a kept frame's rows ``fresh`` replaces, and the counts of the others: the
    counts it was kept with less the replaced rows'. ``also``: columns decoded now for a
    later step of the run (:meth:`KeptFrame.columns`)."""
    errors, whole = kept.error_ids, kept.counts
    counted = ["id", "deleted", "unresolved"]
    if errors is None or whole is None:  # an earlier release's frame, or many errors
        counted.append("error")
    held = kept.columns(list(dict.fromkeys([*counted, *also])))
    replaced = held.filter(pl.col("id").is_in(fresh.get_column("id").implode()))
    if errors is None or whole is None:
        whole = _counted(held)
    else:
        error = pl.when(pl.col("id").is_in(errors)).then(pl.lit("")).alias("error")
        replaced = replaced.with_columns(error)
    gone = _counted(replaced)
    return replaced.height, {k: v - gone[k] for k, v in whole.items()}


def remap_side(
    kept: KeptFrame | None,
    fresh: tuple[pl.DataFrame, int] | None,
    whole: Callable[[], pl.DataFrame],
    mapping: FlowMapping,
    side: str,
    refs: dict[str, pl.DataFrame],
) -> MappedSide:
    """A side mapped from the frame an earlier run kept (under the same
    :func:`mapped_key`) and ``fresh``, the snapshot's rows read since its newest read and
    how many rows the snapshot holds: a sensor's run of a few edits maps a few rows, not
    a million.

    Without a kept frame, or when the result would not hold as many rows as the snapshot
    (rows gone: it was made anew, smaller), the ``whole`` snapshot is mapped. A snapshot
    made anew starts above every earlier read, so all of it is fresh anyway.
    """
    if kept is not None and kept.rows and fresh is not None:
        rows, height = fresh
        mapped = map_side(rows, mapping, side, refs)
        # the plan finds its scope by these columns: decoded now, with the counted ones
        replaced, counts = _kept_counts(kept, mapped, scope_columns(mapping))
        if kept.rows - replaced + mapped.height == height:
            return MappedSide(mapped, kept, counts)
    return MappedSide(map_side(whole(), mapping, side, refs))


def last_mark(state: SyncState, mapping: FlowMapping) -> Mark | None:
    """The flow's last confirmed mark, if the document's rows are still those it covered."""
    text = state.plan_mark(mapping.name)
    mark = Mark(**json.loads(text)) if text else None
    return mark if mark is not None and mark.digest == mapping_digest(mapping) else None


def scope_columns(mapping: FlowMapping) -> list[str]:
    """The mapped columns an incremental plan finds its records by (:func:`changed_since`,
    :func:`changed_scope`): ids, reads, deletes, unresolved references, the merge keys and
    the reference columns."""
    refs = [c.name for c in mapping.columns if c.reference]
    return ["id", "seq", "deleted", "unresolved", *_key_names(mapping), *refs]


@dataclass(frozen=True)
class Changed:
    """The ids of each side an incremental plan starts from, and the mapped rows of those
    :func:`changed_since` found by scanning the frames (the scope's search starts from
    them instead of looking them up again)."""

    ids: dict[str, pl.Series]
    rows: dict[str, pl.DataFrame]


def changed_since(
    mapping: FlowMapping, a: pl.DataFrame, b: pl.DataFrame, state: SyncState, mark: Mark
) -> Changed | None:
    """The records of each side an incremental plan starts from, or ``None`` when a full
    plan is right (a snapshot older than the mark: it was made anew or replaced) or faster
    (:data:`FULL_PLAN_SHARE`).

    Besides the records read since the mark: the records of links written since, those
    of open dead letters and pending creates (retried), the groups of records the mark
    left ambiguous that any of these touch (:meth:`Mark.touched`),
    records waiting on a reference (their own, or one the other CRM cannot be given: a
    canonical reference with no link in the referenced flow, which the writer defers
    run after run), and records whose reference points at a link the referenced flow made
    or changed since the mark.
    """
    frames = {"a": a, "b": b}
    if any(frames[s].height and last_read(frames[s]) < getattr(mark, s) for s in frames):
        return None
    since = datetime.fromisoformat(mark.at) - CLOCK_MARGIN
    refs = [c for c in mapping.columns if c.reference]
    # what the writer translates through: tombstoned links too (``reference_links``)
    linked = {ref: state.links(ref, {}).get_column("a_id") for ref in mapping.references}
    touched = pl.concat(
        [pl.Series("id", [], pl.String)]
        + [state.links_changed_since(ref, since) for ref in mapping.references]
    )
    extra: dict[str, list[str]] = {side: [] for side in SIDES}
    # the links the last run made, rebased or tombstoned: its writes are checked once more
    # (a record it created and someone deleted before the next read is never read at all)
    extra["a"] += state.links_changed_since(mapping.name, since).to_list()
    letters = state.dead_letters(mapping.name)
    for side, record_id, action in letters.select("side", "record_id", "action").iter_rows():
        record_side, rid = dead_letter_record(side, record_id, action)
        extra[record_side].append(rid)
    pending = state.pending_creates(mapping.name)
    for side, source_id in pending.select("side", "source_id").iter_rows():
        extra[other(side)].append(source_id)
    ids, rows = {}, {}
    for side, frame in frames.items():
        since_mark = pl.col("seq") > getattr(mark, side)
        waiting = pl.col("unresolved") | pl.any_horizontal(
            [
                pl.col(c.name).is_in(touched.implode())
                | (
                    pl.col(c.name).is_not_null()
                    & ~pl.col(c.name).is_in(linked[c.reference].implode())
                )
                for c in refs
            ]
            or [pl.lit(False)]
        )
        rows[side] = rows_where(frame, since_mark | waiting)
        ids[side] = pl.concat(
            [rows[side].get_column("id"), pl.Series("id", extra[side], pl.String)]
        )
    # the ambiguous groups these touch (all of them, while a lost create's twin may join
    # one by its other values: ``pending``)
    groups = replace(mark, groups=None) if pending.height else mark
    touched = groups.touched(ids, len(mapping.merge))
    ids = {side: pl.concat([ids[side], touched[side]]).unique() for side in SIDES}
    records = a.height + b.height
    if (
        records >= FULL_PLAN_MIN_RECORDS
        and ids["a"].len() + ids["b"].len() > FULL_PLAN_SHARE * records
    ):
        return None
    return Changed(ids, rows)


@dataclass(frozen=True)
class Scope:
    """The mapped records and links an incremental reconcile reads."""

    a: pl.DataFrame
    b: pl.DataFrame
    links: pl.DataFrame


def rows_where(frame: pl.DataFrame | pl.LazyFrame, predicate: pl.Expr) -> pl.DataFrame:
    """The rows of a large frame ``predicate`` holds for, through the lazy engine: an eager
    ``filter`` of a frame in many chunks (a kept frame with rows upserted) took 24 ms a
    million rows, the lazy one 5 ms (polars 2.0)."""
    return frame.lazy().filter(predicate).collect()


def upsert_rows(frame: pl.DataFrame | pl.LazyFrame, changed: pl.DataFrame) -> pl.DataFrame:
    """A mapped frame with the changed records' rows replaced (or added); a scanned one
    drops the replaced rows as it is read, not in a copy after; with nothing changed, the
    frame is the answer (filtering a million rows to keep them all cost 10 ms).

    A frame in memory with a few rows replaced is the slices around them
    (:func:`without_rows`)."""
    if not changed.height:
        return frame.collect() if isinstance(frame, pl.LazyFrame) else frame
    replaced = pl.col("id").is_in(changed.get_column("id").implode())
    if isinstance(frame, pl.DataFrame):
        return pl.concat(
            [without_rows(frame, frame.select(replaced.arg_true()).to_series()), changed]
        )
    return pl.concat([rows_where(frame, ~replaced), changed])


def changed_scope(
    mapping: FlowMapping, a: pl.DataFrame, b: pl.DataFrame, state: SyncState, changed: Changed
) -> Scope:
    """The records and links a reconcile of the changed records needs (see the module doc):
    the closure of the changed records under their links and shared merge-key values.

    Each pass over a million-row frame costs milliseconds, so one pass per side takes in
    both what the links read last name and the records sharing a key value with those
    taken in last; only what is new is looked up (ids not sought yet, links of ids not
    asked for yet, key values not searched yet). An id no frame holds (a record the
    last run created, not read yet) is sought once, not in every pass."""
    dtypes = mapping.dtypes
    frames = {"a": a, "b": b}
    keys = _key_names(mapping)
    none = pl.Series("id", [], pl.String)

    def outside(values: pl.Series, known: pl.Series) -> pl.Series:
        return values.filter(~values.is_in(known.implode())).unique()

    wanted = dict(changed.ids)
    rows = {side: changed.rows[side] for side in SIDES}
    sought = {side: rows[side].get_column("id") for side in SIDES}  # ids looked up by id
    asked = {side: none for side in SIDES}  # ids whose links were read
    searched = {key: a.get_column(key).clear() for key in keys}
    links = state.links_for(mapping.name, dtypes, none, none)
    while True:
        ask = {side: outside(wanted[side], asked[side]) for side in SIDES}
        asking = bool(ask["a"].len() or ask["b"].len())
        if asking:
            found = state.links_for(mapping.name, dtypes, ask["a"], ask["b"])
            links = pl.concat([links, found]).unique("a_id", keep="first", maintain_order=True)
            for side in SIDES:  # a record has one link at most: its counterpart's is this
                linked = found.get_column(f"{side}_id")
                asked[side] = pl.concat([asked[side], ask[side], linked])
                wanted[side] = pl.concat([wanted[side], linked])
        fetch = {side: outside(wanted[side], sought[side]) for side in SIDES}
        values = {
            key: outside(
                pl.concat([rows["a"].get_column(key), rows["b"].get_column(key)]).drop_nulls(),
                searched[key],
            )
            for key in keys
        }
        values = {key: new for key, new in values.items() if new.len()}
        if not (asking or values or fetch["a"].len() or fetch["b"].len()):
            return Scope(a=rows["a"], b=rows["b"], links=links)
        for key, new in values.items():
            searched[key] = pl.concat([searched[key], new])
        for side in SIDES:
            if not (values or fetch[side].len()):
                continue
            sought[side] = pl.concat([sought[side], fetch[side]])
            held = rows[side].get_column("id")
            taken = rows_where(
                frames[side],
                pl.any_horizontal(
                    pl.col("id").is_in(fetch[side].implode()),
                    *[pl.col(key).is_in(new.implode()) for key, new in values.items()],
                ),
            ).filter(~pl.col("id").is_in(held.implode()))
            rows[side] = pl.concat([rows[side], taken])
            wanted[side] = pl.concat([wanted[side], taken.get_column("id")])
            sought[side] = pl.concat([sought[side], taken.get_column("id")])
