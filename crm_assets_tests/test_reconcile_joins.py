"""The reconcile's fast paths give what the plain operations give.

Links meet records by a join on 64-bit hashes of their ids, checked afterwards; the
records of changed pairs are taken by a mask rather than gathered. Both must give exactly
what a join on the ids and a gather give, in any order, from frames in many chunks, and when
ids collide (forced here: a real collision of two ids is about 2^-64 likely).
"""

from __future__ import annotations

from collections.abc import Callable

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.plain import plan_signature
from benchmarks.synthetic import contact_mapping, generate
from crm_assets.engine import reconcile
from crm_assets.engine.mapping import map_side
from crm_assets.engine.reconcile import left_join_on_ids, reconcile_flow, take_rows


def chunked(values: list[int]) -> pl.DataFrame:
    """A frame of ``values`` in chunks of up to three rows, as upserts leave a kept frame."""
    parts = [
        pl.DataFrame({"n": values[i : i + 3], "s": [f"r{v}" for v in values[i : i + 3]]})
        for i in range(0, len(values), 3)
    ]
    return pl.concat(parts, rechunk=False)


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 40).flatmap(lambda n: st.tuples(st.just(n), st.lists(st.integers(0, n - 1)))))
def test_rows_taken_are_the_rows_gathered_in_their_order(case: tuple[int, list[int]]):
    size, positions = case
    frame = chunked(list(range(size)))
    rows = pl.Series("row", positions, dtype=pl.UInt32)
    assert take_rows(frame, rows).equals(frame.gather(rows))


def colliding(buckets: int) -> Callable[[str], pl.Expr]:
    """A hash of ``buckets`` values only: more ids than that collide."""
    return lambda column: (pl.col(column).hash() % buckets).alias(f"{column}#")


def string_join(left: pl.DataFrame, rights: dict[str, pl.DataFrame]) -> pl.DataFrame:
    joined = left.lazy()
    for name, right in rights.items():
        joined = joined.join(right.lazy(), on=name, how="left")
    return joined.collect()


@pytest.mark.parametrize("hashed", ["64-bit", "colliding"])
def test_links_meet_their_records_as_a_join_on_the_ids_gives(
    hashed: str, monkeypatch: pytest.MonkeyPatch
):
    if hashed == "colliding":
        monkeypatch.setattr(reconcile, "id_hash", colliding(2))
    links = pl.DataFrame(
        {"a_id": ["a1", "a2", "a3", "gone"], "b_id": ["b3", "b1", "b20", "b2"], "n": [1, 2, 3, 4]}
    )
    rights = {
        "a_id": pl.DataFrame({"a_id": ["a3", "a2", "a1", "a4"], "a.x": [30, 20, 10, 40]}),
        "b_id": pl.DataFrame({"b_id": ["b1", "b2", "b3", "b20"], "b.x": [1, 2, 3, 20]}),
    }
    joined = left_join_on_ids(links, rights).sort("n")  # a join keeps no order
    assert joined.equals(string_join(links, rights).sort("n"))
    assert joined.filter(pl.col("a_id") == "gone").get_column("a.x").to_list() == [None]


ids = st.one_of(st.none(), st.sampled_from(["a1", "a2", "a3", "a4", "a5"]))


@settings(max_examples=120, deadline=None)
@given(left=st.lists(ids, max_size=8), right=st.lists(ids, max_size=8), hashed=st.booleans())
def test_any_ids_meet_as_a_join_on_them_gives_in_the_links_order(
    left: list[str | None], right: list[str | None], hashed: bool
):
    """Null ids meet nothing, ids twice on the right give a row each, as a join does."""
    links = pl.DataFrame(
        {"a_id": left, "n": range(len(left))}, schema_overrides={"a_id": pl.String}
    )
    records = pl.DataFrame(
        {"a_id": right, "a.x": range(len(right))}, schema_overrides={"a_id": pl.String}
    )
    with pytest.MonkeyPatch.context() as patch:
        if not hashed:
            patch.setattr(reconcile, "id_hash", colliding(2))
        joined = left_join_on_ids(links, {"a_id": records})
    expected = string_join(links, {"a_id": records})
    assert joined.sort("n", "a.x", nulls_last=True).equals(
        expected.sort("n", "a.x", nulls_last=True)
    )
    if hashed and right == list(dict.fromkeys(right)):  # found by positions, not a join
        assert joined.get_column("n").to_list() == list(range(len(left)))


def test_a_plan_is_the_same_when_every_id_collides(monkeypatch: pytest.MonkeyPatch):
    world = generate(2_000)
    mapping = contact_mapping()
    refs = {"product_to_companies": world.product_links}
    a = map_side(world.a, mapping, "a", refs)
    b = map_side(world.b, mapping, "b", refs)
    expected = plan_signature(reconcile_flow(mapping, a, b, world.links))
    monkeypatch.setattr(reconcile, "id_hash", colliding(500))  # about 4 ids a value
    assert plan_signature(reconcile_flow(mapping, a, b, world.links)) == expected
    assert expected["pairs"], "the world has pairs to write"


def test_ids_of_different_types_are_refused_as_a_join_on_them_refuses():
    links = pl.DataFrame({"a_id": ["1", "2"]})
    records = {"a_id": pl.DataFrame({"a_id": [1, 2], "a.x": [10, 20]})}  # ids read as numbers
    with pytest.raises(pl.exceptions.SchemaError):
        string_join(links, records)
    with pytest.raises(pl.exceptions.SchemaError):
        left_join_on_ids(links, records)
