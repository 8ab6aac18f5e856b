"""Read-after-write checks of a flow, as whole-frame polars: what disagrees, what is unlinked.

They take freshly mapped frames of both systems (not the plan), so they verify
what the CRMs actually hold.
"""

from __future__ import annotations

import polars as pl

from crm_assets.engine.mapping import FlowMapping


def _live_pairs(a: pl.DataFrame, b: pl.DataFrame, links: pl.DataFrame) -> pl.DataFrame:
    live = links.filter(~pl.col("tombstoned")).select("a_id", "b_id")
    a = a.filter(~pl.col("deleted")).rename({c: f"a.{c}" for c in a.columns if c != "id"})
    b = b.filter(~pl.col("deleted")).rename({c: f"b.{c}" for c in b.columns if c != "id"})
    return live.join(a, left_on="a_id", right_on="id").join(b, left_on="b_id", right_on="id")


def disagreements(
    mapping: FlowMapping, a: pl.DataFrame, b: pl.DataFrame, links: pl.DataFrame
) -> pl.DataFrame:
    """``a_id, b_id, field, a_value, b_value`` for every linked pair and field that differ."""
    pairs = _live_pairs(a, b, links)
    parts = [
        pairs.filter(~pl.col(f"a.{c}").eq_missing(pl.col(f"b.{c}"))).select(
            "a_id",
            "b_id",
            pl.lit(c).alias("field"),
            pl.col(f"a.{c}").cast(pl.String).alias("a_value"),
            pl.col(f"b.{c}").cast(pl.String).alias("b_value"),
        )
        for c in mapping.names
    ]
    empty = pl.DataFrame(
        schema=dict.fromkeys(["a_id", "b_id", "field", "a_value", "b_value"], pl.String)
    )
    return pl.concat([empty, *parts])


def linked_pairs(a: pl.DataFrame, b: pl.DataFrame, links: pl.DataFrame) -> int:
    """How many live links join two live records."""
    return _live_pairs(a, b, links).height


def unlinked(frame: pl.DataFrame, links: pl.DataFrame, side: str) -> pl.DataFrame:
    """Live records of one side without a live link: ``id``."""
    live = links.filter(~pl.col("tombstoned")).select(pl.col(f"{side}_id").alias("id"))
    return frame.filter(~pl.col("deleted")).select("id").join(live, on="id", how="anti")
