"""Incremental reconcile: the part of the state a set of changed records can affect.

Reconciling that part gives the same decisions for those records as a full
reconcile, at a cost that follows the number of changes rather than the size of
the state: the changed records, the records linked to them, and every record
sharing a merge key with any of these (repeated until nothing new joins, since
an ambiguous match is decided by all records holding the key). Dead letters and
deferred records belong in the changed set too, so they are retried.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import polars as pl

from crm_assets.engine.mapping import FlowMapping
from crm_assets.engine.state import SyncState


@dataclass(frozen=True)
class Scope:
    """The mapped records and links an incremental reconcile reads."""

    a: pl.DataFrame
    b: pl.DataFrame
    links: pl.DataFrame


def upsert_rows(frame: pl.DataFrame, changed: pl.DataFrame) -> pl.DataFrame:
    """A mapped frame with the changed records' rows replaced (or added)."""
    return pl.concat([frame.join(changed.select("id"), on="id", how="anti"), changed])


def changed_scope(
    mapping: FlowMapping,
    a: pl.DataFrame,
    b: pl.DataFrame,
    state: SyncState,
    changed_a: Iterable[str] | pl.Series | None,
    changed_b: Iterable[str] | pl.Series | None,
    max_rounds: int = 10,
) -> Scope:
    """The records and links a reconcile of the changed records needs (see the module doc)."""
    dtypes = {c.name: c.dtype for c in mapping.columns}
    ids = {
        "a": pl.Series("id", list(changed_a if changed_a is not None else []), dtype=pl.String),
        "b": pl.Series("id", list(changed_b if changed_b is not None else []), dtype=pl.String),
    }
    frames = {"a": a, "b": b}
    keys = [f"key{i}" for i in range(len(mapping.merge))]
    links = state.links_for(mapping.name, dtypes, ids["a"], ids["b"])
    for _ in range(max_rounds):
        grown = {
            "a": pl.concat([ids["a"], links.get_column("a_id")]).unique(),
            "b": pl.concat([ids["b"], links.get_column("b_id")]).unique(),
        }
        rows = {
            side: frames[side].filter(pl.col("id").is_in(grown[side].implode())) for side in grown
        }
        for key in keys:
            values = pl.concat([rows["a"].get_column(key), rows["b"].get_column(key)]).drop_nulls()
            for side in ("a", "b"):
                sharing = frames[side].filter(pl.col(key).is_in(values.implode())).get_column("id")
                grown[side] = pl.concat([grown[side], sharing]).unique()
        if all(grown[s].len() == ids[s].len() for s in ("a", "b")):
            break
        new_a = grown["a"].filter(~grown["a"].is_in(ids["a"].implode()))
        new_b = grown["b"].filter(~grown["b"].is_in(ids["b"].implode()))
        ids = grown
        links = pl.concat([links, state.links_for(mapping.name, dtypes, new_a, new_b)]).unique(
            "a_id", keep="first", maintain_order=True
        )
    return Scope(
        a=a.filter(pl.col("id").is_in(ids["a"].implode())),
        b=b.filter(pl.col("id").is_in(ids["b"].implode())),
        links=links,
    )
