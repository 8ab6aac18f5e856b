"""Read-after-write checks of a flow, as whole-frame polars: what disagrees, what is unlinked.

They take freshly mapped frames of both systems (not the plan), so they verify
what the CRMs actually hold.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import polars as pl

from crm_assets.engine.document import slug
from crm_assets.engine.mapping import Column, FlowMapping, convert
from crm_assets.engine.reconcile import left_join_on_ids, same_value, take_rows
from crm_assets.engine.snapshot import DELETED, FIELD_DTYPES
from crm_assets.engine.state import columns_digest


@dataclass(frozen=True)
class Agreement:
    """What the flow's live links hold after the writes."""

    #: live links that join two live records
    linked: int
    #: ``a_id, b_id, field, a_value, b_value, waiting``: every linked pair and field that differ
    disagreements: pl.DataFrame
    #: per side, ``id`` of its live records without a live link
    unlinked: dict[str, pl.DataFrame]


def agreement(
    mapping: FlowMapping,
    mapped: Mapping[str, pl.DataFrame],
    links: pl.DataFrame,
    reference_links: Mapping[str, pl.DataFrame] | None = None,
    gone_references: Mapping[str, pl.DataFrame] | None = None,
) -> Agreement:
    """The linked pairs, their disagreements and the unlinked records, once for the checks
    and the step's metadata.

    The links join each side on its id, row number and one hash of its mapped values; a
    pair whose two records hash alike holds the same values (a collision would hide a
    difference with odds of about 2^-64, as in the reconcile) and is never gathered, so a
    million links cost two narrow joins, not two joins of every column.

    ``waiting`` marks a reference that cannot agree yet: it points at a record not
    linked in the referenced flow (an ambiguous or failed one), so the sync defers it.
    Merge keys compare in canonical form; a reference one side lost because its record
    was deleted there (``gone_references``) is kept on purpose, not a disagreement.
    """
    cols = mapping.names
    live = links.filter(~pl.col("tombstoned")).select("a_id", "b_id")

    def slim(frame: pl.DataFrame, side: str) -> pl.DataFrame:
        return (
            frame.select(pl.col("id").alias(f"{side}_id"), pl.col("deleted").alias(f"{side}.gone"))
            .with_columns(columns_digest(frame, cols).alias(f"{side}.h"))
            .with_row_index(f"{side}.row")
        )

    a, b = mapped["a"], mapped["b"]
    joined = left_join_on_ids(live, {"a_id": slim(a, "a"), "b_id": slim(b, "b")})
    pairs = joined.filter(~pl.col("a.gone") & ~pl.col("b.gone"))  # a record missing: null
    differing = pairs.filter(pl.col("a.h") != pl.col("b.h"))
    values = pl.concat(
        [
            differing.select("a_id", "b_id"),
            *[
                take_rows(frame.drop("id"), differing.get_column(f"{side}.row")).rename(
                    lambda c, side=side: f"{side}.{c}"
                )
                for side, frame in (("a", a), ("b", b))
            ],
        ],
        how="horizontal",
    )
    parts = []
    keys = mapping.key_columns
    for column in mapping.columns:
        c = column.name
        differ = ~same_value(c, keys)(pl.col(f"a.{c}"), pl.col(f"b.{c}"))
        gone = (gone_references or {}).get(c)
        if gone is not None and gone.height:
            ids = gone.get_column("a_id").implode()
            kept = (pl.col(f"a.{c}").is_null() & pl.col(f"b.{c}").is_in(ids)) | (
                pl.col(f"b.{c}").is_null() & pl.col(f"a.{c}").is_in(ids)
            )
            differ = differ & ~kept
        waiting = pl.lit(False)
        if column.reference is not None and reference_links is not None:
            linked = reference_links[column.reference].get_column("a_id").implode()
            a_value = pl.col(f"a.{c}")
            waiting = pl.col("b.unresolved") | (a_value.is_not_null() & ~a_value.is_in(linked))
        parts.append(
            values.filter(differ).select(
                "a_id",
                "b_id",
                pl.lit(c).alias("field"),
                pl.col(f"a.{c}").cast(pl.String).alias("a_value"),
                pl.col(f"b.{c}").cast(pl.String).alias("b_value"),
                waiting.alias("waiting"),
            )
        )
    empty = pl.DataFrame(
        schema={
            **dict.fromkeys(["a_id", "b_id", "field", "a_value", "b_value"], pl.String),
            "waiting": pl.Boolean,
        }
    )
    return Agreement(
        linked=pairs.height,
        disagreements=pl.concat([empty, *parts]),
        unlinked={
            side: not_reached(mapped[side], joined.get_column(f"{side}.row")) for side in "ab"
        },
    )


def unlinked(frame: pl.DataFrame, links: pl.DataFrame, side: str) -> pl.DataFrame:
    """Live records of one side without a live link: ``id``."""
    live = links.filter(~pl.col("tombstoned")).select(f"{side}_id")
    rows = frame.select(pl.col("id").alias(f"{side}_id")).with_row_index("row")
    return not_reached(frame, left_join_on_ids(live, {f"{side}_id": rows}).get_column("row"))


def not_reached(frame: pl.DataFrame, rows: pl.Series) -> pl.DataFrame:
    """Live records of a mapped frame at none of ``rows`` (its row numbers, nulls aside,
    that live links reached): ``id``."""
    reached = pl.zeros(frame.height, pl.Boolean, eager=True).scatter(rows.drop_nulls(), True)
    return frame.filter(~pl.col("deleted") & ~reached).select("id")


@dataclass(frozen=True)
class CheckOutcome:
    """One QA checklist item's result: what was checked, whether it holds, the evidence."""

    name: str
    description: str
    passed: bool
    severity: str  # "error" | "warn"
    counts: dict[str, int] = field(default_factory=dict)
    sample: pl.DataFrame | None = None
    column: Column | None = None  # the property row a property check belongs to


#: The warning a flow with an empty property table gets instead of property checks.
NO_PROPERTIES = "properties_to_sync"
#: The warning counting references a delete cleared on one side and the other side kept.
SIDE_EFFECTS = "no_delete_side_effects"


def check_name(path: str, what: str) -> str:
    """A check name from a property path: ``visitAddress.postCode`` → ``visitaddress_postcode_agrees``."""
    return f"{slug(path)}_{what}"


def linked_check_name(system: str) -> str:
    return f"every_{slug(system)}_record_linked"


def check_catalog(mapping: FlowMapping) -> dict[str, str]:
    """Every check of a flow's QA checklist, name → description, in checklist order."""
    out: dict[str, str] = {}
    if not mapping.columns:
        out[NO_PROPERTIES] = "the flow has properties to sync (its property table is not empty)"
    for c in mapping.columns:
        out[check_name(c.name, "agrees")] = f"{c.a_field} and {c.b_field} agree for every link"
        out[check_name(c.name, "type")] = (
            f"{c.a_field} and {c.b_field} hold values of type {c.type or 'N/A'}"
        )
    for obj, other in ((mapping.a, mapping.b), (mapping.b, mapping.a)):
        out[linked_check_name(obj.system)] = (
            f"every {obj.system} {obj.obj} record is linked to one in {other.system}"
        )
    out["links_one_to_one"] = "no record is linked twice"
    out["no_failed_writes"] = "the dead-letter table holds no record of this flow"
    out["no_ambiguous_matches"] = "no record matches two or more records on the other side"
    if any(c.reference for c in mapping.columns):
        out[SIDE_EFFECTS] = (
            "no reference was cleared on one side only because its record was deleted there, "
            "or left out of a record created there (neither is propagated: the other side "
            "keeps its reference)"
        )
    return out


def type_violations(
    mapping: FlowMapping, snapshot: pl.DataFrame, side: str
) -> dict[str, pl.DataFrame]:
    """Per canonical column: live records whose value does not have the declared type."""
    obj = mapping.side(side)
    found = {}
    for column in mapping.columns:
        field_name = column.a_field if side == "a" else column.b_field
        raw = pl.col(field_name)
        if column.reference:  # a reference is an id: any value will do
            wrong = pl.lit(False)
        else:
            converted = convert(raw, FIELD_DTYPES[obj.fields[field_name]], column.dtype)
            wrong = ~pl.col(DELETED) & raw.is_not_null() & converted.is_null()
        # one pass over the snapshot per column, none copying it (all run at once below)
        found[column.name] = (
            snapshot.lazy()
            .filter(wrong)
            .select(
                pl.col(obj.id_field).cast(pl.String).alias("id"),
                raw.cast(pl.String).alias("value"),
            )
        )
    return dict(zip(found, pl.collect_all(found.values()), strict=True))


def flow_checks(
    mapping: FlowMapping,
    mapped: dict[str, pl.DataFrame],
    snapshots: dict[str, pl.DataFrame],
    links: pl.DataFrame,
    ambiguous: pl.DataFrame,
    dead_letters: pl.DataFrame,
    agreed: Agreement,
    sample_size: int = 5,
    side_effects: pl.DataFrame | None = None,
) -> list[CheckOutcome]:
    """The QA checklist of one flow, from what both systems hold after the writes."""
    names = {"a": mapping.a.system, "b": mapping.b.system}
    catalog = check_catalog(mapping)
    differ, linked = agreed.disagreements, agreed.linked
    bad_types = {side: type_violations(mapping, snapshots[side], side) for side in ("a", "b")}
    out: list[CheckOutcome] = []
    if not mapping.columns:
        out.append(
            CheckOutcome(
                name=NO_PROPERTIES,
                description="no properties to sync: the flow links records but writes no field",
                passed=False,
                severity="warn",
                counts={"property_rows": 0},
            )
        )
    for column in mapping.columns:
        field_rows = differ.filter(pl.col("field") == column.name)
        mine = field_rows.filter(~pl.col("waiting")).drop("waiting")
        out.append(
            CheckOutcome(
                name=check_name(column.name, "agrees"),
                description=catalog[check_name(column.name, "agrees")],
                passed=mine.height == 0,
                severity="error",
                counts={
                    "linked_pairs": linked,
                    "disagreeing": mine.height,
                    "waiting_on_references": field_rows.height - mine.height,
                },
                sample=mine.head(sample_size),
                column=column,
            )
        )
        wrong = pl.concat(
            [
                bad_types[s][column.name].with_columns(pl.lit(names[s]).alias("system"))
                for s in ("a", "b")
            ]
        )
        out.append(
            CheckOutcome(
                name=check_name(column.name, "type"),
                description=catalog[check_name(column.name, "type")],
                passed=wrong.height == 0,
                severity="warn",
                counts={"wrong_type": wrong.height},
                sample=wrong.head(sample_size),
                column=column,
            )
        )
    for side in ("a", "b"):
        missing = agreed.unlinked[side]
        out.append(
            CheckOutcome(
                name=linked_check_name(names[side]),
                description=catalog[linked_check_name(names[side])],
                passed=missing.height == 0,
                severity="warn",
                counts={
                    "records": mapped[side].select((~pl.col("deleted")).sum()).item(),
                    "unlinked": missing.height,
                },
                sample=missing.head(sample_size),
            )
        )
    live = links.lazy().filter(~pl.col("tombstoned"))
    # an id linked twice hashes alike twice: only ids whose hash repeats are counted
    dup = pl.concat(
        [
            live.filter(pl.col(key).hash().is_duplicated())
            .group_by(key)
            .len()
            .filter(pl.col("len") > 1)
            .select(pl.col(key).alias("id"), pl.lit(key).alias("side"))
            for key in ("a_id", "b_id")
        ]
    ).collect()
    out.append(
        CheckOutcome(
            name="links_one_to_one",
            description=catalog["links_one_to_one"],
            passed=dup.height == 0,
            severity="error",
            counts={"links": live.select(pl.len()).collect().item(), "linked_twice": dup.height},
            sample=dup.head(sample_size),
        )
    )
    out.append(
        CheckOutcome(
            name="no_failed_writes",
            description=catalog["no_failed_writes"],
            passed=dead_letters.height == 0,
            severity="error",
            counts={"dead_letters": dead_letters.height},
            sample=dead_letters.select("side", "record_id", "action", "attempts", "message").head(
                sample_size
            )
            if dead_letters.height
            else None,
        )
    )
    out.append(
        CheckOutcome(
            name="no_ambiguous_matches",
            description=catalog["no_ambiguous_matches"],
            passed=ambiguous.height == 0,
            severity="warn",
            counts={"ambiguous": ambiguous.height},
            sample=ambiguous.head(sample_size),
        )
    )
    if SIDE_EFFECTS in catalog:
        kept = side_effects if side_effects is not None else pl.DataFrame()
        out.append(
            CheckOutcome(
                name=SIDE_EFFECTS,
                description=catalog[SIDE_EFFECTS],
                passed=kept.height == 0,
                severity="warn",
                counts={"references_kept": kept.height},
                sample=kept.head(sample_size) if kept.height else None,
            )
        )
    return out
