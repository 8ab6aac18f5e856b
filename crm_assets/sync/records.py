"""The sync's own records, as an operator reads them: conflicts, dead letters, unlinked records.

Every table names the CRMs (``Custom CRM id``, ``written to: CRMOffice``), never the
engine's side letters. The Dagster assets (:mod:`crm_assets.defs.records`) and the
``crm-assets dead-letters`` / ``crm-assets audit`` commands show the same frames;
nothing here imports Dagster.

A dead letter has an id of its own for the CLI, stable from run to run:
``<CRM written to>:<record>:<action>``, where the record is the id in the CRM
written to for an update or delete, and ``<its CRM>:<id>`` for a create (or a
record that could not be read), whose record lives in the other CRM:
``crm_office:custom_crm:P-17:create`` is the Custom CRM product that could not be
created in CRMOffice.
"""

from __future__ import annotations

import getpass
import socket
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime

import polars as pl

from crm_assets.engine.checks import unlinked
from crm_assets.engine.mapping import FlowMapping, to_side
from crm_assets.engine.reconcile import Plan, other
from crm_assets.engine.snapshot import SnapshotStore
from crm_assets.engine.state import UPDATE_ACTIONS, SyncState, dead_letter_record
from crm_assets.sync.planning import map_flow, read_only_plan, reference_links
from crm_assets.sync.verification import FlowVerification

SIDES = ("a", "b")

#: The reasons an unlinked record gives (``N candidates`` for an ambiguous match).
NO_MATCH = "no match"
WAITING = "waiting on a reference"
FAILED = "not created yet (failed)"


class UnknownDeadLetter(LookupError):
    """Ids that name no open dead letter of the flow (one line)."""

    def __str__(self) -> str:
        return str(self.args[0])


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown user"
    return f"{user}@{socket.gethostname()}"


def _stamp(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def display(frame: pl.DataFrame) -> pl.DataFrame:
    """A table for people: times as ``YYYY-MM-DD HH:MM:SS UTC`` text, the rest as it is."""

    def utc(name: str, dtype: pl.Datetime) -> pl.Expr:
        column = pl.col(name)
        if dtype.time_zone is None:  # a naive time is UTC here
            return column.dt.replace_time_zone("UTC")
        return column.dt.convert_time_zone("UTC")

    return frame.with_columns(
        utc(name, dtype).dt.strftime("%Y-%m-%d %H:%M:%S UTC")
        for name, dtype in frame.schema.items()
        if isinstance(dtype, pl.Datetime)
    )


def field_label(mapping: FlowMapping, name: str | None) -> str | None:
    """A canonical column as its document row reads (``Title -> title``); other names as is."""
    for column in mapping.columns:
        if name in (column.name, column.a_field, column.b_field):
            return f"{column.a_field} -> {column.b_field}"
    return name


# -- conflicts -----------------------------------------------------------------------------------
def conflicts_table(state: SyncState, mapping: FlowMapping, limit: int = 200) -> pl.DataFrame:
    """The flow's last ``limit`` conflicts, newest first: when, the record in each CRM, the
    field, each CRM's value, the winner's CRM and why it won."""
    a, b = mapping.a.system, mapping.b.system
    rows = state.audit_entries(mapping.name, kinds=["conflict"], limit=limit)
    labels = {name: field_label(mapping, name) for name in rows["field"].drop_nulls().unique()}
    # the audit keeps the winning value as new, the losing one as old; side is the winner
    a_won = pl.col("side") == "a"
    return rows.sort("seq", descending=True).select(
        pl.col("at").alias("when"),
        pl.col("a_id").alias(f"{a} id"),
        pl.col("b_id").alias(f"{b} id"),
        pl.col("field").replace_strict(labels, default=pl.col("field")).alias("field"),
        pl.when(a_won).then("new_value").otherwise("old_value").alias(f"{a} value"),
        pl.when(a_won).then("old_value").otherwise("new_value").alias(f"{b} value"),
        pl.col("side").replace_strict({"a": a, "b": b}, default=None).alias("winner"),
        pl.col("note").alias("why"),
    )


# -- dead letters --------------------------------------------------------------------------------
def letter_id(mapping: FlowMapping, side: str, record_id: str, action: str) -> str:
    """A dead letter's id for the CLI: ``<CRM written to>:<record>:<action>``."""
    record_side, rid = dead_letter_record(side, record_id, action)
    record = rid if record_side == side else f"{mapping.side(record_side).system_key}:{rid}"
    return f"{mapping.side(side).system_key}:{record}:{action}"


def _letters(state: SyncState, mapping: FlowMapping) -> pl.DataFrame:
    """The open dead letters with their CLI id and their record's side and id."""
    letters = state.dead_letter_records(mapping.name)
    rows = [
        (letter_id(mapping, s, r, act), *dead_letter_record(s, r, act))
        for s, r, act in letters.select("side", "record_id", "action").iter_rows()
    ]
    ids = pl.DataFrame(
        rows, schema={"id": pl.String, "record_side": pl.String, "rid": pl.String}, orient="row"
    )
    return pl.concat([ids, letters], how="horizontal")


def dead_letters_table(state: SyncState, mapping: FlowMapping) -> pl.DataFrame:
    """The flow's open failures: the id the CLI takes, the record and its CRM, the CRM
    written to, the action, why it failed, first and last seen, attempts."""
    names = {"a": mapping.a.system, "b": mapping.b.system}
    return _letters(state, mapping).select(
        "id",
        pl.col("rid").alias("record"),
        pl.col("record_side").replace_strict(names, default=None).alias("record in"),
        pl.col("side").replace_strict(names, default=None).alias("written to"),
        "action",
        pl.col("message").alias("reason"),
        pl.col("first_at").alias("first seen"),
        pl.col("last_at").alias("last seen"),
        "attempts",
    )


def _chosen(state: SyncState, flow: FlowMapping, ids: Iterable[str] | None) -> pl.DataFrame:
    letters = _letters(state, flow)
    if ids is None:
        return letters
    wanted = list(dict.fromkeys(ids))
    unknown = [i for i in wanted if i not in set(letters.get_column("id").to_list())]
    if unknown:
        raise UnknownDeadLetter(
            f"no open dead letter {', '.join(unknown)} in flow {flow.name} "
            "(see `crm-assets dead-letters list`)"
        )
    return letters.filter(pl.col("id").is_in(wanted))


def _audit_rows(
    flow: FlowMapping, letters: pl.DataFrame, kind: str, what: str
) -> list[dict[str, str | None]]:
    out = []
    for row in letters.iter_rows(named=True):
        written, record_side = flow.side(row["side"]), row["record_side"]
        out.append(
            {
                "kind": kind,
                "side": row["side"],
                f"{record_side}_id": row["rid"],
                "old_value": row["message"],
                "note": f"{what}: {row['action']} in {written.system} of "
                f"{flow.side(record_side).system} record {row['rid']} "
                f"after {row['attempts']} attempt(s); the failure is the old value",
            }
        )
    return out


def retry_dead_letters(
    state: SyncState,
    flow: FlowMapping,
    ids: Iterable[str] | None = None,
    by: str | None = None,
) -> pl.DataFrame:
    """Mark dead letters (their CLI ids; ``None``: all the flow's) to be retried.

    Every plan already retries every open dead letter (an update's base stays behind,
    a failed create's record stays unlinked), so a retry here only starts the count of
    attempts afresh and records who asked in the audit (kind ``retry``): the write
    itself happens on the flow's next run. ``crm-assets dead-letters retry`` runs that
    sync at once. Raises :class:`UnknownDeadLetter` (nothing changed) for an id that
    names no open dead letter. Returns the chosen letters as :func:`dead_letters_table`.
    """
    chosen = _chosen(state, flow, ids)
    who, at = by or _who(), datetime.now(UTC)
    state.reset_dead_letters(
        flow.name,
        chosen.select("side", "record_id", "action").iter_rows(),
        f"retry-{uuid.uuid4().hex[:12]}",
        _audit_rows(flow, chosen, "retry", f"retry asked by {who} at {_stamp(at)}"),
    )
    return dead_letters_table(state, flow).filter(pl.col("id").is_in(chosen["id"].implode()))


def discard_dead_letters(
    state: SyncState,
    flow: FlowMapping,
    ids: Iterable[str] | None = None,
    by: str | None = None,
) -> pl.DataFrame:
    """Remove dead letters (their CLI ids; ``None``: all the flow's), with an audit row of
    kind ``discard`` naming who discarded what, when, and the failure it was.

    This forgets the failure, it does not exempt the record: while the record still
    differs, the next run tries the write again (and dead-letters it again if the CRM
    still refuses). Raises :class:`UnknownDeadLetter` (nothing changed) for an id that
    names no open dead letter. Returns the discarded letters as :func:`dead_letters_table`.
    """
    chosen = _chosen(state, flow, ids)
    shown = dead_letters_table(state, flow).filter(pl.col("id").is_in(chosen["id"].implode()))
    who, at = by or _who(), datetime.now(UTC)
    state.delete_dead_letters(
        flow.name,
        chosen.select("side", "record_id", "action").iter_rows(),
        f"discard-{uuid.uuid4().hex[:12]}",
        _audit_rows(flow, chosen, "discard", f"discarded by {who} at {_stamp(at)}"),
    )
    return shown


# -- unlinked records ----------------------------------------------------------------------------
def display_name(mapping: FlowMapping) -> pl.Expr:
    """A record's name for people, from its mapped values: its merge key (an e-mail, a
    name), else its name fields (first + last name), else the flow's first text columns."""
    merge = set(mapping.merge)
    keys = [c.name for c in mapping.columns if (c.a_field, c.b_field) in merge]
    texts = [
        c
        for c in mapping.columns
        if c.dtype == pl.String() and not c.reference and c.name not in keys
    ]
    named = [c.name for c in texts if "name" in f"{c.a_field} {c.b_field}".lower()]

    def text(expr: pl.Expr) -> pl.Expr:
        value = expr.cast(pl.String).str.strip_chars()
        return pl.when(value == "").then(None).otherwise(value)

    parts = [text(pl.col(k)) for k in keys]
    if named:
        parts.append(
            text(pl.concat_str([pl.col(n) for n in named[:2]], separator=" ", ignore_nulls=True))
        )
    parts += [text(pl.col(c.name)) for c in texts[:2]]
    return pl.coalesce([*parts, pl.lit("(no name)")]) if parts else pl.lit("(no name)")


_REASONS = {"side": pl.String, "id": pl.String, "reason": pl.String, "detail": pl.String}


def _reasons(
    mapping: FlowMapping, state: SyncState, refs: dict[str, pl.DataFrame], plan: Plan
) -> pl.DataFrame:
    """Why records are unlinked, most telling first: ``side, id, reason, detail, rank``."""
    names = {"a": mapping.a.system, "b": mapping.b.system}
    parts: list[pl.DataFrame] = []
    # ambiguous: two or more candidates, or one candidate that matches others too
    for side in SIDES:
        keys = " or ".join(a if side == "a" else b for a, b in mapping.merge) or "merge criteria"
        amb = plan.ambiguous.filter(pl.col("side") == side)
        parts.append(
            amb.select(
                "side",
                pl.col("id").cast(pl.String),
                pl.format("{} candidates", "candidates")
                .replace("1 candidates", "1 candidate")
                .alias("reason"),
                pl.when(pl.col("candidates") > 1)
                .then(
                    pl.format(
                        "{} {} records match its {}",
                        "candidates",
                        pl.lit(names[other(side)]),
                        pl.lit(keys),
                    )
                )
                .otherwise(
                    pl.lit(
                        f"its one match in {names[other(side)]} matches other "
                        f"{names[side]} records too"
                    )
                )
                .alias("detail"),
                pl.lit(0).alias("rank"),
            )
        )
    # failed: a create or a read that went to the dead letters, or a value that cannot convert
    letters = _letters(state, mapping).filter(~pl.col("action").is_in(UPDATE_ACTIONS))
    parts.append(
        letters.select(
            pl.col("record_side").alias("side"),
            pl.col("rid").alias("id"),
            pl.lit(FAILED).alias("reason"),
            pl.format("{}: {}", "action", "message").alias("detail"),
            pl.lit(1).alias("rank"),
        )
    )
    parts.append(
        plan.failed.select(
            "side",
            pl.col("id").cast(pl.String),
            pl.lit(FAILED).alias("reason"),
            pl.col("reason").alias("detail"),
            pl.lit(2).alias("rank"),
        )
    )
    # waiting: a reference to a record not linked yet in the referenced flow
    for side in SIDES:
        obj = mapping.side(side)
        ref_fields = [
            c.a_field if side == "a" else c.b_field for c in mapping.columns if c.reference
        ]
        detail = "; ".join(
            f"{f} refers to a {obj.system} record ({obj.references.get(f, 'another object')}) "
            "not linked yet"
            for f in ref_fields
        )
        waiting = plan.deferred.filter(pl.col("side") == side).get_column("id").cast(pl.String)
        creates = plan.creates[other(side)]  # this side's records to create on the other side
        if ref_fields and creates.height:
            values = to_side(creates, mapping, other(side), refs)
            waiting = pl.concat(
                [waiting, values.filter(pl.col("unresolved"))["source_id"].cast(pl.String)]
            )
        parts.append(
            pl.DataFrame({"id": waiting}).select(
                pl.lit(side).alias("side"),
                "id",
                pl.lit(WAITING).alias("reason"),
                pl.lit(detail or None, dtype=pl.String).alias("detail"),
                pl.lit(3).alias("rank"),
            )
        )
    schema = {**_REASONS, "rank": pl.Int32}
    return pl.concat(
        [pl.DataFrame(schema=schema), *[p.cast(schema) for p in parts]], how="vertical"
    ).sort("rank")


def unlinked_table(mapping: FlowMapping, store: SnapshotStore, state: SyncState) -> pl.DataFrame:
    """The flow's live records without a link, in both CRMs: a display name, the CRM, the
    record's id and why: ``no match`` (the next run creates it), ``N candidates``
    (an ambiguous match), ``waiting on a reference`` or ``not created yet (failed)``,
    with a detail (the failure, what it waits on)."""
    refs = reference_links(state, mapping)
    a, b = map_flow(mapping, store, refs)
    links = state.links(mapping.name, {})
    plan = read_only_plan(mapping, a, b, state, links)
    mapped = {"a": a, "b": b}
    missing = {side: unlinked(mapped[side], links, side) for side in SIDES}
    return unlinked_records(mapping, state, mapped, refs, missing, plan)


def verified_unlinked(
    mapping: FlowMapping, state: SyncState, verification: FlowVerification
) -> pl.DataFrame:
    """:func:`unlinked_table` from what a verification of the flow just read and planned."""
    missing = {"a": verification.unlinked_a, "b": verification.unlinked_b}
    return unlinked_records(
        mapping, state, verification.mapped, verification.references, missing, verification.plan
    )


def unlinked_records(
    mapping: FlowMapping,
    state: SyncState,
    mapped: dict[str, pl.DataFrame],
    refs: dict[str, pl.DataFrame],
    missing: dict[str, pl.DataFrame],
    plan: Plan,
) -> pl.DataFrame:
    """:func:`unlinked_table` from frames, the unlinked ids of each side and a read-only
    full plan already at hand (a verification's: at a million records each costs seconds
    to make again)."""
    reasons = _reasons(mapping, state, refs, plan).unique(
        ["side", "id"], keep="first", maintain_order=True
    )
    name = display_name(mapping)
    out = []
    for side in SIDES:
        records = mapped[side].join(missing[side], on="id", how="semi")
        out.append(
            records.select(
                name.alias("name"),
                pl.lit(mapping.side(side).system).alias("CRM"),
                pl.col("id").alias("record id"),
            )
            .join(
                reasons.filter(pl.col("side") == side).select(
                    pl.col("id").alias("record id"), "reason", "detail"
                ),
                on="record id",
                how="left",
            )
            .with_columns(pl.col("reason").fill_null(NO_MATCH))
        )
    empty = pl.DataFrame(
        schema=dict.fromkeys(["name", "CRM", "record id", "reason", "detail"], pl.String)
    )
    return pl.concat([empty, *out], how="vertical_relaxed")


# -- audit log -----------------------------------------------------------------------------------
def audit_table(
    state: SyncState,
    mappings: Iterable[FlowMapping],
    flow: str | None = None,
    since: datetime | None = None,
    record_id: str | None = None,
    limit: int | None = 50,
    kinds: Iterable[str] = (),
) -> pl.DataFrame:
    """The audit log's last ``limit`` rows (oldest first) as people read it: when, flow,
    kind, the CRM (written to; the winner, for a conflict), the record's id in each CRM
    (a column per CRM), the field as its document row, old and new value, the note."""
    by_name = {m.name: m for m in mappings}
    rows = state.audit_entries(flow, list(kinds), since, record_id, limit)
    parts = []
    for (name,), group in rows.group_by(["flow"], maintain_order=True):
        m = by_name.get(str(name))
        systems = (
            {"a": m.a.system, "b": m.b.system}
            if m
            else {"a": "document source", "b": "document target"}
        )
        labels = {f: field_label(m, f) if m else f for f in group["field"].drop_nulls().unique()}
        crm = pl.col("side").replace_strict(systems, default=None)
        parts.append(
            group.select(
                "seq",
                pl.col("at").alias("when"),
                "flow",
                "kind",
                pl.when(pl.col("kind") == "conflict")
                .then(pl.format("{} (won)", crm))
                .otherwise(crm)
                .alias("CRM"),
                pl.col("a_id").alias(f"{systems['a']} id"),
                pl.col("b_id").alias(f"{systems['b']} id"),
                pl.col("field").replace_strict(labels, default=pl.col("field")).alias("field"),
                pl.col("old_value").alias("old"),
                pl.col("new_value").alias("new"),
                "note",
            )
        )
    if not parts:
        return pl.DataFrame(
            schema={"when": pl.Datetime("us", "UTC")}
            | dict.fromkeys(["flow", "kind", "CRM", "field", "old", "new", "note"], pl.String)
        )
    out = pl.concat(parts, how="diagonal").sort("seq").drop("seq")
    ids = [c for c in out.columns if c.endswith(" id")]
    return out.select("when", "flow", "kind", "CRM", *ids, "field", "old", "new", "note")
