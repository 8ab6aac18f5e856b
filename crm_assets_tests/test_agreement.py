"""The QA checklist's agreement checks find every linked pair that differs, and only those.

``agreement`` compares only the pairs whose two records hash differently; whatever the
edits (a value changed on one side, a merge key changed only in case or spacing, a value
emptied, a record deleted, a link tombstoned), it must report exactly what comparing every
linked pair field by field reports.
"""

from __future__ import annotations

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.synthetic import contact_mapping, generate
from crm_assets.engine.checks import agreement, flow_checks, unlinked
from crm_assets.engine.mapping import map_side
from crm_assets.engine.reconcile import same_value
from crm_assets.engine.snapshot import DELETED

MAPPING = contact_mapping()
WORLD = generate(60)
LINKED = WORLD.links.height
REFS = {"product_to_companies": WORLD.product_links}
#: per side: its id field and the fields an edit changes
FIELDS = {"a": ("Id", "Title", "Email"), "b": ("id", "title", "email")}

edits = st.lists(
    st.tuples(
        st.sampled_from("ab"),
        st.integers(0, LINKED - 1),
        st.sampled_from(["title", "key case", "key spaces", "emptied", "deleted", "tombstoned"]),
    ),
    max_size=12,
)


def every_pair_compared(mapped: dict[str, pl.DataFrame], links: pl.DataFrame) -> set[tuple]:
    """The oracle: every live link joined with both records whole, each field compared."""
    live = links.filter(~pl.col("tombstoned")).select("a_id", "b_id")
    sides = {
        side: frame.filter(~pl.col("deleted")).rename(
            {c: f"{side}.{c}" for c in frame.columns if c != "id"}
        )
        for side, frame in mapped.items()
    }
    pairs = live.join(sides["a"], left_on="a_id", right_on="id").join(
        sides["b"], left_on="b_id", right_on="id"
    )
    found = set()
    for c in MAPPING.names:
        differ = ~same_value(c, MAPPING.key_columns)(pl.col(f"a.{c}"), pl.col(f"b.{c}"))
        found |= {(a, b, c) for a, b in pairs.filter(differ).select("a_id", "b_id").iter_rows()}
    return found | {("linked", pairs.height, "")}


@settings(max_examples=60, deadline=None)
@given(edits)
def test_agreement_reports_exactly_the_pairs_that_differ(changes: list[tuple[str, int, str]]):
    snapshots = {"a": WORLD.a, "b": WORLD.b}
    links = WORLD.links
    for side, index, change in changes:
        id_field, title, email = FIELDS[side]
        record_id = f"{side.upper()}{index}"
        which = pl.col(id_field) == record_id
        if change == "tombstoned":
            links = links.with_columns(
                tombstoned=pl.col("tombstoned") | (pl.col(f"{side}_id") == record_id)
            )
            continue
        edit = {
            "title": pl.lit(f"edited {index}"),
            "key case": pl.col(email).str.to_uppercase(),
            "key spaces": pl.format(" {} ", pl.col(email)),
            "emptied": pl.lit(None, pl.String),
        }.get(change)
        target = DELETED if change == "deleted" else email if "key" in change else title
        value = pl.lit(True) if change == "deleted" else edit
        snapshots[side] = snapshots[side].with_columns(
            pl.when(which).then(value).otherwise(pl.col(target)).alias(target)
        )
    mapped = {side: map_side(snapshots[side], MAPPING, side, REFS) for side in "ab"}
    found = agreement(MAPPING, mapped, links)
    reported = {
        (a, b, field)
        for a, b, field in found.disagreements.select("a_id", "b_id", "field").iter_rows()
    } | {("linked", found.linked, "")}
    assert reported == every_pair_compared(mapped, links)
    for side in "ab":  # live records no live link reaches, as sets of ids say it
        live_links = set(links.filter(~pl.col("tombstoned")).get_column(f"{side}_id"))
        live = mapped[side].filter(~pl.col("deleted")).get_column("id")
        expected = set(live) - live_links
        assert set(found.unlinked[side].get_column("id")) == expected
        assert set(unlinked(mapped[side], links, side).get_column("id")) == expected
    assert not any(change.startswith("key") for _, _, change in changes) or all(
        field != "email" for _, _, field in reported
    )


def test_an_id_linked_twice_fails_the_one_to_one_check_and_a_tombstoned_twin_does_not():
    mapped = {
        side: map_side(frame, MAPPING, side, REFS)
        for side, frame in (("a", WORLD.a), ("b", WORLD.b))
    }
    twin = WORLD.links.slice(0, 1).with_columns(pl.lit("B-twin").alias("b_id"))
    buried = WORLD.links.slice(1, 1).with_columns(
        pl.lit("A-buried").alias("a_id"), pl.lit(True).alias("tombstoned")
    )
    links = pl.concat([WORLD.links, twin, buried])
    checks = flow_checks(
        MAPPING,
        mapped,
        {"a": WORLD.a, "b": WORLD.b},
        links,
        pl.DataFrame(schema={"side": pl.String, "id": pl.String, "candidates": pl.Int64}),
        pl.DataFrame(
            schema=dict.fromkeys(["side", "record_id", "action", "message"], pl.String)
            | {"attempts": pl.Int64}
        ),
        agreement(MAPPING, mapped, links),
    )
    one_to_one = next(c for c in checks if c.name == "links_one_to_one")
    assert not one_to_one.passed
    assert one_to_one.counts == {"links": LINKED + 1, "linked_twice": 1}
    assert one_to_one.sample is not None
    assert one_to_one.sample.rows() == [(twin.item(0, "a_id"), "a_id")]
