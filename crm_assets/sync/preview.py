"""A plan as an operator reads it before anything is written: which records would be
created or changed, with the fields and both values, by CRM name."""

from __future__ import annotations

import polars as pl

from crm_assets.engine.mapping import FlowMapping
from crm_assets.engine.reconcile import Plan, other


def _field(mapping: FlowMapping, side: str, column: str) -> str:
    c = next(c for c in mapping.columns if c.name == column)
    return c.a_field if side == "a" else c.b_field


def preview(plan: Plan, mapping: FlowMapping, limit: int = 20) -> list[str]:
    """Up to ``limit`` lines: creates (the values they would get) and updates (each
    changed field, from the value the CRM holds to the planned one)."""
    lines: list[str] = []
    for side in ("b", "a"):
        target, source = mapping.side(side), mapping.side(other(side))
        for row in plan.creates[side].head(limit).iter_rows(named=True):
            values = ", ".join(
                f"{_field(mapping, side, c)}={row[c]!r}" for c in plan.columns if row[c] is not None
            )
            lines.append(
                f"create in {target.system} from {source.system} {row['source_id']}: {values}"
            )
        for row in plan.pairs.filter(pl.col(f"write_{side}")).head(limit).iter_rows(named=True):
            changes = ", ".join(
                f"{_field(mapping, side, c)}: {row[f'{side}.{c}']!r} -> {row[f'final.{c}']!r}"
                for c in plan.columns
                if row[f"{side}.{c}"] != row[f"final.{c}"]
            )
            lines.append(
                f"update in {target.system} {row[f'{side}_id']} "
                f"({source.system} {row[f'{other(side)}_id']}): {changes}"
            )
    return lines[:limit]
