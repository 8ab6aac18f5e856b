"""A flow's kept mapped frames (``mapped_sides``) equal mapping the whole snapshots anew.

A run maps only the snapshot rows read since the frame it kept; whatever a history of
reads does to the snapshots (edits, reads that change nothing, edits within the CRM's clock resolution that keep
the modification time, soft and hard deletes, new records, a snapshot deleted and read
anew, smaller) and to the links references translate through, the frame a run gets
must be the one a whole map gives. Snapshots are written as the snapshot step writes
them (``SnapshotStore.merge``: a base and a delta), and must hold what merging each
read into the whole snapshot gives.
"""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.synthetic import contact_mapping, generate
from crm_assets.engine import snapshot as snapshot_module
from crm_assets.engine.incremental import scope_columns, upsert_rows
from crm_assets.engine.mapping import map_side
from crm_assets.engine.snapshot import (
    SEQ,
    SnapshotStore,
    forget_decoded,
    merge_snapshot,
    newest,
)
from crm_assets.engine.storage import Storage
from crm_assets.sync import map_flow, mapped_sides
from crm_assets.sync.files import FlowFiles

MAPPING = contact_mapping()
WORLD = generate(40)
SEED = {"a": WORLD.a, "b": WORLD.b}
#: per side: (id, modification time, the edited field, the reference field)
FIELDS = {
    "a": ("Id", "Modified", "Title", "ProductId"),
    "b": ("id", "updatedAt", "title", "company.id"),
}
PRODUCTS = WORLD.product_links
COLUMNS = scope_columns(MAPPING)
#: a CRM's now after every modification time of the histories
LATER = datetime(2100, 1, 1, tzinfo=UTC)

read = st.tuples(
    st.just("read"),
    st.sampled_from("ab"),
    st.lists(
        st.tuples(
            st.integers(0, 59),  # an id beyond the seed's is a new record
            st.sampled_from(
                ["edit", "same time", "clock back", "delete", "reference", "read again"]
            ),
        ),
        min_size=1,
        max_size=6,
    ),
)
rescan = st.tuples(st.just("full rescan"), st.sampled_from("ab"), st.integers(0, 5))
remake = st.tuples(st.just("read anew"), st.sampled_from("ab"), st.integers(10, 40))
relink = st.tuples(st.just("relink"), st.integers(0, 9), st.booleans())
histories = st.lists(st.one_of(read, rescan, remake, relink), min_size=1, max_size=12)


def _records(
    side: str, snapshot: pl.DataFrame, picks: list[tuple[int, str]], step: int
) -> pl.DataFrame:
    """The records a read returns: seed rows (or the snapshot's, when it holds them)
    changed as each pick says."""
    id_field, modified, field, reference = FIELDS[side]
    seed = SEED[side]
    rows = []
    for index, change in picks:
        template = seed.row(index % seed.height, named=True)
        record_id = template[id_field] if index < seed.height else f"N{side}{index}"
        held = snapshot.filter(pl.col(id_field) == record_id)
        record = (
            held.drop(SEQ).row(0, named=True) if held.height else {**template, id_field: record_id}
        )
        if change == "read again":  # the overlap window: as stored (or new)
            rows.append(record)
            continue
        if change == "clock back":  # edited while the CRM's clock was set back
            record[modified] = record[modified] - timedelta(days=1)
        elif change != "same time":
            record[modified] = record[modified] + timedelta(seconds=step + 1)
        if change in ("edit", "same time", "clock back"):
            record[field] = f"title {step} {index}"
        elif change == "delete":
            record["_deleted"] = True
        else:
            record[reference] = PRODUCTS.item(
                step % PRODUCTS.height, "a_id" if side == "a" else "b_id"
            )
        rows.append(record)
    return pl.DataFrame(rows, schema=seed.schema)


def _same(got: pl.DataFrame, expected: pl.DataFrame, where: str, key: str = "id") -> None:
    assert got.schema == expected.schema, where
    assert got.sort(key).to_dicts() == expected.sort(key).to_dicts(), where


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=histories, compact=st.integers(0, 12))
def test_kept_mapped_frames_equal_a_whole_map(history: list[tuple], compact: int) -> None:
    """Also: the stored snapshot (a base and a delta folded in past ``compact`` rows)
    holds what merging every read into the whole snapshot gives, with the same counts, and
    the merge's summary (the times and deletes the cursor and counts come from) is its."""
    with tempfile.TemporaryDirectory() as folder:
        store = SnapshotStore(Path(folder), compact_min_rows=compact)
        refs = {"product_to_companies": PRODUCTS}
        whole_read = {}
        for side in "ab":  # the first sync's reads
            obj = MAPPING.side(side)
            whole_read[side] = merge_snapshot(None, SEED[side], *FIELDS[side][:2], False).frame
            store.write(obj.system_key, obj.obj, whole_read[side], 0.0)
        map_flow(MAPPING, store, refs)
        for step, (kind, *args) in enumerate(history):
            if kind == "relink":  # a product linked anew, or its link gone
                index, drop = args
                products = refs["product_to_companies"]
                refs = {
                    "product_to_companies": products.filter(pl.int_range(pl.len()) != index)
                    if drop
                    else pl.concat(
                        [
                            products,
                            pl.DataFrame({"a_id": [f"PN{step}"], "b_id": [f"{900 + index}"]}),
                        ]
                    )
                }
            else:
                side = args[0]
                obj = MAPPING.side(side)
                snapshot = store.read(obj.system_key, obj.obj)
                id_field, modified = FIELDS[side][:2]
                if kind == "read":
                    fetched, previous, full = (
                        _records(side, snapshot, args[1], step),
                        snapshot,
                        False,
                    )
                elif kind == "full rescan":  # every live record but a few listed again
                    live = snapshot.filter(~pl.col("_deleted")).drop(SEQ)
                    fetched, previous, full = live.slice(args[1]), snapshot, True
                else:  # the snapshot deleted and read anew: fewer records than before
                    fetched, previous, full = SEED[side].head(args[1]), None, False
                summary = None
                if previous is None:
                    change = merge_snapshot(None, fetched, id_field, modified, full)
                    store.write(obj.system_key, obj.obj, change.to_store, float(step))
                else:
                    change, summary = store.merge(
                        obj.system_key,
                        obj.obj,
                        store.open(obj.system_key, obj.obj),
                        fetched,
                        id_field,
                        modified,
                        full,
                        float(step),
                    )
                before = None if previous is None else whole_read[side]
                expected = merge_snapshot(before, fetched, id_field, modified, full)
                whole_read[side] = expected.frame
                counts = ("new", "changed", "deleted", "fetched")
                assert [getattr(change, c) for c in counts] == [
                    getattr(expected, c) for c in counts
                ], f"counts of side {side} at step {step}"
                _same(
                    store.read(obj.system_key, obj.obj).drop(SEQ),
                    expected.frame.drop(SEQ),
                    f"the stored snapshot of side {side} after step {step}: {kind} {args}",
                    id_field,
                )
                _, height = store.read_since(obj.system_key, obj.obj, 0) or (None, None)
                assert height == expected.frame.height, f"rows of side {side} after step {step}"
                stored = store.open(obj.system_key, obj.obj)
                latest = expected.frame.get_column(modified).max()
                assert stored is not None and stored.cursor(modified, LATER) == latest, (
                    f"the cursor of side {side} after step {step}: {kind} {args}"
                )
                # a CRM whose now is before some records' times (dated in the future)
                times = expected.frame.get_column(modified).sort()
                now = times[times.len() // 2]
                assert stored.cursor(modified, now) == newest(expected.frame, modified, now), (
                    f"the cursor before some records' times, side {side} after step {step}"
                )
                if summary is not None:  # the merge's times and deletes: the cursor, the counts
                    times = expected.frame.select(modified, "_deleted")
                    assert summary.sort(pl.all()).equals(times.sort(pl.all())), (
                        f"the summary of side {side} after step {step}: {kind} {args}"
                    )
            # as the mapped step passes them on: the rows mapped now, naming the kept frame
            files = FlowFiles.of_run(store.root, MAPPING.name, f"run{step}")
            sides = mapped_sides(MAPPING, store, refs)
            files.save_mapped(*sides)
            for side, saved, mapped in zip("ab", files.mapped_sides(), sides, strict=True):
                obj = MAPPING.side(side)
                whole = map_side(store.read(obj.system_key, obj.obj), MAPPING, side, refs)
                where = f"side {side} after step {step}: {kind} {args}"
                _same(saved.frame(), whole, where)
                # as an incremental plan reads them: its columns, then whole rows of a few
                narrow = saved.narrow(COLUMNS).select(COLUMNS)
                _same(narrow, whole.select(COLUMNS), f"the scope columns of {where}")
                some = narrow.filter(pl.col("id").hash(step) % 3 == 0)
                _same(saved.whole_rows(some), whole.join(some.select("id"), on="id"), where)
                assert mapped.counts() == {
                    "records": whole.filter(~pl.col("deleted")).height,
                    "conversion_errors": whole.filter(pl.col("error").is_not_null()).height,
                    "unresolved_references": whole.filter(pl.col("unresolved")).height,
                }


@pytest.mark.parametrize("listed", [True, False], ids=["errors listed", "errors counted"])
def test_a_run_counts_the_records_that_failed_to_read_as_a_whole_map_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, listed: bool
) -> None:
    """A kept frame carries its counts and the ids of its records with an error; a run
    that reads some of them again (one fixed, one failing now, one edited) reports the
    counts a whole map gives, as does one whose frame had too many errors to list (its
    error column is then counted). Its reconciled step, in the same process, reads the
    scope columns the mapped step decoded."""
    monkeypatch.setattr(snapshot_module, "KEPT_ERROR_IDS", 1_000 if listed else 0)
    store = SnapshotStore(tmp_path)
    refs = {"product_to_companies": PRODUCTS}
    unreadable = pl.when(pl.int_range(pl.len()) < 5).then(pl.lit("unreadable: Phone"))
    seeds = {"a": SEED["a"].with_columns(unreadable.alias("_error")), "b": SEED["b"]}
    for side in "ab":
        obj = MAPPING.side(side)
        id_field, modified = FIELDS[side][:2]
        frame = merge_snapshot(None, seeds[side], id_field, modified, False).frame
        store.write(obj.system_key, obj.obj, frame, 0.0)
    map_flow(MAPPING, store, refs)
    id_field, modified, title = FIELDS["a"][:3]
    later = pl.col(modified) + timedelta(minutes=1)
    read = pl.concat(
        [
            seeds["a"].slice(0, 1).with_columns(later, pl.lit(None, pl.String).alias("_error")),
            seeds["a"]
            .slice(10, 1)
            .with_columns(later, pl.lit("unreadable: Email").alias("_error")),
            seeds["a"].slice(11, 1).with_columns(later, pl.lit("edited").alias(title)),
        ]
    )
    obj = MAPPING.a
    stored = store.open(obj.system_key, obj.obj)
    store.merge(obj.system_key, obj.obj, stored, read, id_field, modified, False, 1.0)
    forget_decoded()
    a, _ = mapped_sides(MAPPING, store, refs)
    whole = map_side(store.read(obj.system_key, obj.obj), MAPPING, "a", refs)
    assert a.kept is not None and a.fresh.height == 3
    assert a.counts() == {
        "records": whole.filter(~pl.col("deleted")).height,
        "conversion_errors": whole.filter(pl.col("error").is_not_null()).height,
        "unresolved_references": whole.filter(pl.col("unresolved")).height,
    }
    assert whole.filter(pl.col("error").is_not_null()).height == 5  # 5 - 1 fixed + 1 failing
    _same(a.narrow(COLUMNS).select(COLUMNS), whole.select(COLUMNS), "the scope columns")


def test_a_delta_written_before_another_run_folded_it_in_never_undoes_a_newer_read(
    tmp_path: Path,
) -> None:
    """Two runs read the same object at once: one folds a newer edit into the base, the
    other then stores its delta, read before that edit. The newer edit stays."""
    store = SnapshotStore(tmp_path, compact_min_rows=1_000)
    system, obj = MAPPING.a.system_key, MAPPING.a.obj
    id_field, modified, title = FIELDS["a"][:3]
    store.write(system, obj, merge_snapshot(None, SEED["a"], id_field, modified, False).frame, 0)
    first = SEED["a"].head(1)
    older = first.with_columns(
        pl.col(modified) + timedelta(seconds=1), pl.lit("older").alias(title)
    )
    store.merge(system, obj, store.open(system, obj), older, id_field, modified, False, 1.0)
    stale = (tmp_path / system / f"{obj}.delta.parquet").read_bytes()
    newer = (  # dated after every record: the cursor kept with the stale delta is earlier
        SEED["a"]
        .head(5)
        .with_columns(pl.col(modified) + timedelta(days=1), pl.lit("newer").alias(title))
    )
    newer = pl.concat([newer, newer.tail(1).with_columns(pl.lit("N-new").alias(id_field))])
    store.compact_min_rows = 0  # the other run's read (5 of 40 rows, and a new one) folds it in
    store.merge(system, obj, store.open(system, obj), newer, id_field, modified, False, 2.0)
    assert not (tmp_path / system / f"{obj}.delta.parquet").exists()
    (tmp_path / system / f"{obj}.delta.parquet").write_bytes(stale)  # the first run's delta
    record = store.read(system, obj).filter(pl.col(id_field) == first.item(0, id_field))
    assert record.item(0, title) == "newer"
    now = datetime.now(UTC)
    assert store.open(system, obj).cursor(modified, now) == store.read(system, obj)[modified].max()
    times = store.open(system, obj).frame([id_field, modified])  # as the cursor reads them
    assert times.height == SEED["a"].height + 1
    assert times.filter(pl.col(id_field) == first.item(0, id_field)).item(0, modified) == (
        newer.item(0, modified)
    )
    fresh, height = store.read_since(system, obj, 0)
    assert height == SEED["a"].height + 1  # not the count the stale delta was written with
    assert fresh.filter(pl.col(id_field) == first.item(0, id_field)).item(0, title) == "newer"
    # a later read, merged over the stale delta, keeps the newer edit (the base's row)
    later = SEED["a"].slice(10, 1).with_columns(pl.col(modified) + timedelta(seconds=3))
    store.merge(system, obj, store.open(system, obj), later, id_field, modified, False, 3.0)
    record = store.read(system, obj).filter(pl.col(id_field) == first.item(0, id_field))
    assert record.item(0, title) == "newer"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    again=st.integers(0, 20),
    same_time=st.integers(0, 8),
    dated=st.integers(0, 8),
    delta_first=st.booleans(),
)
def test_a_merge_compares_whole_rows_however_many_a_read_gives_again(
    again: int, same_time: int, dated: int, delta_first: bool
) -> None:
    """A read of records as stored (the overlap window), edited within the CRM's clock
    resolution, or edited later, with or without a delta before it: the stored snapshot
    and the counts are those of merging it into the whole snapshot, whether the few rows
    it compares are read one by one or through one filtered read (past ``SLICED_ROWS``)."""
    world = WORLD.a
    id_field, modified, title = FIELDS["a"][:3]
    whole = merge_snapshot(None, world, id_field, modified, False).frame
    with tempfile.TemporaryDirectory() as folder:
        store = SnapshotStore(Path(folder), compact_min_rows=1_000)
        system, obj = MAPPING.a.system_key, MAPPING.a.obj
        store.write(system, obj, whole, 0.0)
        if delta_first:
            edit = world.slice(30, 5).with_columns(pl.col(modified) + timedelta(seconds=1))
            store.merge(system, obj, store.open(system, obj), edit, id_field, modified, False, 1.0)
            whole = merge_snapshot(whole, edit, id_field, modified, False).frame
        stored = whole.drop(SEQ).reverse()  # the delta's rows (last) are read first
        fetched = pl.concat(
            [
                stored.slice(0, again),
                stored.slice(again, same_time).with_columns(pl.lit("same time").alias(title)),
                stored.slice(again + same_time, dated).with_columns(
                    pl.col(modified) + timedelta(seconds=5), pl.lit("dated").alias(title)
                ),
            ]
        )
        change, _ = store.merge(
            system, obj, store.open(system, obj), fetched, id_field, modified, False, 2.0
        )
        expected = merge_snapshot(whole, fetched, id_field, modified, False)
        counts = ("new", "changed", "deleted", "fetched", "touched")
        assert [getattr(change, c) for c in counts] == [getattr(expected, c) for c in counts]
        _same(store.read(system, obj).drop(SEQ), expected.frame.drop(SEQ), "merged", id_field)


def test_a_read_while_another_run_folds_the_delta_into_the_base_loses_no_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs at once: one reads the snapshot (base, then delta: two objects) while the
    other folds the delta into a new base and removes it. The read holds every row: a
    record missing from it would read as deleted, and its link would be tombstoned."""
    store = SnapshotStore(tmp_path, compact_min_rows=1_000)
    system, obj = MAPPING.a.system_key, MAPPING.a.obj
    id_field, modified = FIELDS["a"][:2]
    store.write(system, obj, merge_snapshot(None, SEED["a"], id_field, modified, False).frame, 0)
    new = (
        SEED["a"]
        .head(1)
        .with_columns(pl.lit("N-new").alias(id_field), pl.col(modified) + timedelta(seconds=1))
    )
    store.merge(system, obj, store.open(system, obj), new, id_field, modified, False, 1.0)
    assert (tmp_path / system / f"{obj}.delta.parquet").exists()  # the new record: a delta
    folded = store.read(system, obj)
    reads = Storage.read_bytes
    armed = [True]

    def read_bytes(self: Storage, *parts: str) -> bytes | None:
        data = reads(self, *parts)
        if armed and parts[0] == system:  # after the first of the snapshot's two objects
            armed.clear()
            store.write(system, obj, folded, 2.0)  # the other run: new base, delta removed
        return data

    monkeypatch.setattr(Storage, "read_bytes", read_bytes)
    stored = store.open(system, obj)
    monkeypatch.undo()
    assert not armed, "the other run's write did not happen during the read"
    assert not (tmp_path / system / f"{obj}.delta.parquet").exists()
    assert stored is not None
    assert "N-new" in stored.frame().get_column(id_field).to_list()
    assert stored.frame().height == SEED["a"].height + 1


@settings(max_examples=300, deadline=None)
@given(
    rows=st.integers(0, 120),
    replaced=st.sets(st.integers(0, 119), max_size=90),
    added=st.integers(0, 5),
)
def test_a_few_rows_upserted_by_slices_equal_the_frame_filtered(
    rows: int, replaced: set[int], added: int
) -> None:
    """An upsert of a few rows (slices around them) and of many (a filtered copy) give the
    frame with those rows replaced and the new ones added, in the same order."""
    schema = {"id": pl.String, "value": pl.Int64}
    frame = pl.DataFrame({"id": [f"r{i}" for i in range(rows)], "value": range(rows)}, schema)
    ids = [f"r{i}" for i in sorted(replaced) if i < rows] + [f"new{i}" for i in range(added)]
    changed = pl.DataFrame({"id": ids, "value": [-1] * len(ids)}, schema)
    expected = pl.concat([frame.filter(~pl.col("id").is_in(ids)), changed])
    assert upsert_rows(frame, changed).equals(expected)
    assert upsert_rows(frame.lazy(), changed).equals(expected)
