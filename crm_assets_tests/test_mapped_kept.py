"""A flow's kept mapped frames (``map_flow``) equal mapping the whole snapshots anew.

A run maps only the snapshot rows read since the frame it kept; whatever a history of
reads does to the snapshots (edits, reads that change nothing, edits within the CRM's clock resolution that keep
the modification time, soft and hard deletes, new records, a snapshot deleted and read
anew, smaller) and to the links references translate through, the frame a run gets
must be the one a whole map gives. Snapshots are written as the snapshot step writes
them (``merge_snapshot``, then the store).
"""

from __future__ import annotations

import tempfile
from datetime import timedelta
from pathlib import Path

import polars as pl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.synthetic import contact_mapping, generate
from crm_assets.engine.mapping import map_side
from crm_assets.engine.snapshot import SEQ, SnapshotStore, merge_snapshot
from crm_assets.sync import map_flow

MAPPING = contact_mapping()
WORLD = generate(40)
SEED = {"a": WORLD.a, "b": WORLD.b}
#: per side: (id, modification time, the edited field, the reference field)
FIELDS = {
    "a": ("Id", "Modified", "Title", "ProductId"),
    "b": ("id", "updatedAt", "title", "company.id"),
}
PRODUCTS = WORLD.product_links

read = st.tuples(
    st.just("read"),
    st.sampled_from("ab"),
    st.lists(
        st.tuples(
            st.integers(0, 59),  # an id beyond the seed's is a new record
            st.sampled_from(["edit", "same time", "delete", "reference", "read again"]),
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
        if change != "same time":
            record[modified] = record[modified] + timedelta(seconds=step + 1)
        if change in ("edit", "same time"):
            record[field] = f"title {step} {index}"
        elif change == "delete":
            record["_deleted"] = True
        else:
            record[reference] = PRODUCTS.item(
                step % PRODUCTS.height, "a_id" if side == "a" else "b_id"
            )
        rows.append(record)
    return pl.DataFrame(rows, schema=seed.schema)


def _same(got: pl.DataFrame, expected: pl.DataFrame, where: str) -> None:
    assert got.schema == expected.schema, where
    assert got.sort("id").to_dicts() == expected.sort("id").to_dicts(), where


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=histories)
def test_kept_mapped_frames_equal_a_whole_map(history: list[tuple]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        store = SnapshotStore(Path(folder))
        refs = {"product_to_companies": PRODUCTS}
        for side in "ab":  # the first sync's reads
            obj = MAPPING.side(side)
            store.write(
                obj.system_key,
                obj.obj,
                merge_snapshot(None, SEED[side], *FIELDS[side][:2], False).frame,
                0.0,
            )
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
                change = merge_snapshot(previous, fetched, id_field, modified, full)
                store.write(obj.system_key, obj.obj, change.to_store, float(step))
            a, b = map_flow(MAPPING, store, refs)
            for side, got in (("a", a), ("b", b)):
                obj = MAPPING.side(side)
                whole = map_side(store.read(obj.system_key, obj.obj), MAPPING, side, refs)
                _same(got, whole, f"side {side} after step {step}: {kind} {args}")
