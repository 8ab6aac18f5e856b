"""Synthetic state for the reconcile benchmark: N contacts per side, as the DESIGN describes.

90 % of records are linked (with base values), 5 % of the linked ones changed on
each side, 1 % changed on both sides differently (conflicts), 1 % deleted on
Custom CRM, and the unlinked 10 % split between merge matches, a few ambiguous
duplicates and records to create. Everything is generated with polars
expressions, deterministic for a size.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import polars as pl
import sqlalchemy as sa

from crm_assets.engine.document import read_document
from crm_assets.engine.mapping import FlowMapping
from crm_assets.engine.snapshot import DELETED
from crm_assets.engine.state import SyncState, links
from crm_assets.settings import packaged_spec_path
from crm_assets.sync import flow_mappings

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def contact_mapping() -> FlowMapping:
    return next(
        m
        for m in flow_mappings(read_document(packaged_spec_path()))
        if m.name == "contact_to_contacts"
    )


@dataclass
class State:
    """Snapshots of both sides, the contact flow's links and the product flow's links."""

    a: pl.DataFrame
    b: pl.DataFrame
    links: pl.DataFrame
    product_links: pl.DataFrame


def _ts(seconds: pl.Expr) -> pl.Expr:
    return pl.lit(T0) + pl.duration(seconds=seconds)


def generate(n: int) -> State:
    """The benchmark state for ``n`` records per side."""
    linked = n * 9 // 10
    products = max(n // 100, 10)
    i = pl.int_range(0, n, dtype=pl.Int64).alias("i")
    base = (
        pl.DataFrame()
        .select(i)
        .with_columns(
            email=pl.format("user{}@example.com", pl.col("i")),
            given=pl.format("Given{}", pl.col("i")),
            family=pl.format("Family{}", pl.col("i") % 997),
            phone=pl.format("+47 2{}", pl.col("i") % 9_999_999),
            mobile=pl.format("+47 9{}", pl.col("i") % 9_999_999),
            title=pl.format("Title{}", pl.col("i") % 50),
            product=pl.col("i") % products,
            is_linked=pl.col("i") < linked,
            unlinked_kind=pl.when(pl.col("i") < linked)
            .then(pl.lit("linked"))
            .when(pl.col("i") % 10 < 5)
            .then(pl.lit("match"))
            .when(pl.col("i") % 100 == 7)
            .then(pl.lit("ambiguous"))
            .otherwise(pl.lit("create")),
        )
    )
    i_ = pl.col("i")
    a_changed = pl.col("is_linked") & (i_ % 20 == 1)
    b_changed = pl.col("is_linked") & (i_ % 20 == 2)
    conflict = pl.col("is_linked") & (i_ % 100 == 3)
    a_deleted = pl.col("is_linked") & (i_ % 100 == 5)
    kind = pl.col("unlinked_kind")

    a = base.filter(kind != "ambiguous").select(
        Id=pl.format("A{}", i_),
        FirstName=pl.col("given"),
        LastName=pl.col("family"),
        Email=pl.when(kind == "create")
        .then(pl.format("only-a{}@example.com", i_))
        .otherwise(pl.col("email")),
        Phone=pl.col("phone"),
        MobilePhone=pl.col("mobile"),
        Title=pl.when(a_changed)
        .then(pl.format("NewA{}", i_))
        .when(conflict)
        .then(pl.format("ConflictA{}", i_))
        .otherwise(pl.col("title")),
        ProductId=pl.format("P{}", pl.col("product")),
        Created=_ts(pl.lit(0)),
        Modified=pl.when(a_changed | conflict | a_deleted)
        .then(_ts(1000 + (i_ % 200)))
        .otherwise(_ts(pl.lit(0))),
        Version=pl.lit(1, dtype=pl.Int64),
        Deleted=a_deleted,
    )
    b_ids = pl.when(pl.col("is_linked") | (kind == "match")).then(pl.format("B{}", i_))
    b_main = base.select(
        id=pl.when(kind == "ambiguous").then(pl.format("B{}", i_)).otherwise(b_ids),
        givenName=pl.when(b_changed).then(pl.format("NewB{}", i_)).otherwise(pl.col("given")),
        familyName=pl.col("family"),
        email=pl.when(kind == "create")
        .then(pl.format("only-b{}@example.com", i_))
        .otherwise(pl.col("email")),
        directPhone=pl.col("phone"),
        mobilePhone=pl.col("mobile"),
        title=pl.when(conflict).then(pl.format("ConflictB{}", i_)).otherwise(pl.col("title")),
        **{"company.id": pl.format("{}", 100_000 + pl.col("product"))},
        createdAt=_ts(pl.lit(0)),
        updatedAt=pl.when(b_changed | conflict)
        .then(_ts(1000 + ((i_ + 100) % 200)))
        .otherwise(_ts(pl.lit(0))),
        rowVersion=pl.lit("1"),
    ).with_columns(pl.col("id").fill_null(pl.format("B{}", pl.int_range(0, pl.len()))))
    # an ambiguous unlinked record: two on side b share its e-mail
    twins = base.filter(kind == "ambiguous").select(
        id=pl.format("BT{}", i_),
        givenName=pl.col("given"),
        familyName=pl.col("family"),
        email=pl.col("email"),
        directPhone=pl.col("phone"),
        mobilePhone=pl.col("mobile"),
        title=pl.col("title"),
        **{"company.id": pl.format("{}", 100_000 + pl.col("product"))},
        createdAt=_ts(pl.lit(0)),
        updatedAt=_ts(pl.lit(0)),
        rowVersion=pl.lit("1"),
    )
    amb_a = base.filter(kind == "ambiguous").select(
        Id=pl.format("A{}", i_),
        FirstName=pl.col("given"),
        LastName=pl.col("family"),
        Email=pl.col("email"),
        Phone=pl.col("phone"),
        MobilePhone=pl.col("mobile"),
        Title=pl.col("title"),
        ProductId=pl.format("P{}", pl.col("product")),
        Created=_ts(pl.lit(0)),
        Modified=_ts(pl.lit(0)),
        Version=pl.lit(1, dtype=pl.Int64),
        Deleted=pl.lit(False),
    )
    a = pl.concat([a, amb_a]).with_columns(pl.col("Deleted").alias(DELETED))
    b = pl.concat([b_main, twins]).with_columns(pl.lit(False).alias(DELETED))
    links = base.filter(pl.col("is_linked")).select(
        a_id=pl.format("A{}", i_),
        b_id=pl.format("B{}", i_),
        tombstoned=pl.lit(False),
        has_base=pl.lit(True),
        **{
            "base.email": pl.col("email"),
            "base.givenName": pl.col("given"),
            "base.familyName": pl.col("family"),
            "base.directPhone": pl.col("phone"),
            "base.mobilePhone": pl.col("mobile"),
            "base.title": pl.col("title"),
            "base.company.id": pl.format("P{}", pl.col("product")),
        },
    )
    product_links = pl.DataFrame().select(
        a_id=pl.format("P{}", pl.int_range(0, products)),
        b_id=pl.format("{}", 100_000 + pl.int_range(0, products)),
    )
    return State(a=a, b=b, links=links, product_links=product_links)


def save_state(state: State, mapping: FlowMapping, db: SyncState) -> None:
    """Write the links and their base values (and the referenced flow's links) into a state
    database (setup, not timed), as a sync a day ago left them (an incremental plan looks again at links written lately)."""
    names = mapping.names
    base = state.links.select("a_id", "b_id", *[pl.col(f"base.{c}").alias(c) for c in names])
    rows = ((r.pop("a_id"), r.pop("b_id"), r) for r in base.iter_rows(named=True))
    db.save_links(mapping.name, rows, run_id="benchmark-setup", columns=mapping.dtypes)
    for flow in mapping.references:  # the products' links the contacts' references go through
        products = state.product_links.iter_rows()
        db.save_links(flow, ((a, b, None) for a, b in products), "benchmark-setup", columns={})
    with db.engine.begin() as conn:
        conn.execute(sa.update(links).values(updated_at=datetime.now(UTC) - timedelta(days=1)))
    if db.engine.dialect.name == "postgresql":
        # that rewrote every row: PostgreSQL's autovacuum clears the old versions within a
        # minute; until it does, an index scan of the links changed lately walks 900k dead
        # entries (0.15 s a query instead of a few ms). The measurements start seconds later.
        with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text(f"VACUUM ANALYZE {links.name}"))
