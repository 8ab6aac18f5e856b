"""Flow planning: the document's flows resolved to connectors' objects, mapped, and planned.

Each flow's two ends are resolved through the connector registry, so a flow
works in whichever direction the document gives it. A flow whose system or
object no connector provides is an error naming it, unless the caller chose
to skip such flows (then they are listed as skipped, never dropped silently).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import polars as pl

from crm_assets.connectors import UnsupportedFlow, resolve_endpoint
from crm_assets.engine.document import DataflowDocument, Endpoint, Flow
from crm_assets.engine.incremental import (
    MappedSide,
    Mark,
    Scope,
    changed_scope,
    changed_since,
    last_mark,
    mapped_key,
    remap_side,
    scope_columns,
)
from crm_assets.engine.mapping import FlowMapping, build_flow_mapping
from crm_assets.engine.objects import SourceObject
from crm_assets.engine.reconcile import (
    SIDES,
    Plan,
    ReconcileOptions,
    Whole,
    live_count,
    reconcile_flow,
)
from crm_assets.engine.snapshot import SnapshotStore, schema
from crm_assets.engine.state import SyncState

#: A flow's sides, the document's target first: both are written at once, the first
#: settles links, tombstones and the bases that need no write (and reports conflicts).
WRITE_ORDER = ("b", "a")
#: A side's kept mapped frame is written again once this many of its rows were mapped anew.
KEEP_AFTER_ROWS = 1_000


@dataclass(frozen=True)
class SkippedFlow:
    """A flow of the document that cannot run, and why (one line)."""

    name: str
    title: str
    reason: str


@dataclass
class FlowSet:
    """The flows that run (referenced flows first) and those skipped."""

    mappings: list[FlowMapping]
    skipped: list[SkippedFlow] = field(default_factory=list)


def flow_set(document: DataflowDocument, skip_unsupported: bool = False) -> FlowSet:
    """The document's flows resolved through the connectors, referenced flows first.

    Raises :class:`UnsupportedFlow` (one line naming file, line and system) for a
    flow no connector provides, unless ``skip_unsupported``.
    """

    def resolve(flow: Flow, end: Endpoint) -> SourceObject:
        return resolve_endpoint(document, flow, end)

    mappings: dict[str, FlowMapping] = {}
    skipped: list[SkippedFlow] = []
    for flow in document.flows:
        try:
            mappings[flow.name] = build_flow_mapping(document, flow, resolve)
        except UnsupportedFlow as exc:
            if not skip_unsupported:
                raise
            skipped.append(SkippedFlow(flow.name, flow.title, str(exc)))
    ordered: list[FlowMapping] = []

    def visit(m: FlowMapping) -> None:
        if m in ordered:
            return
        for ref in m.references:
            visit(mappings[ref])
        ordered.append(m)

    for m in mappings.values():
        visit(m)
    return FlowSet(ordered, skipped)


def flow_mappings(document: DataflowDocument) -> list[FlowMapping]:
    """The document's flows, referenced flows first (every flow must have connectors)."""
    return flow_set(document).mappings


def snapshot_of(store: SnapshotStore, mapping: FlowMapping, side: str) -> pl.DataFrame:
    """One side's snapshot (empty, with its fields, before the first read)."""
    obj = mapping.side(side)
    frame = store.read(obj.system_key, obj.obj)
    return frame if frame is not None else pl.DataFrame(schema=schema(obj.fields))


def reference_links(state: SyncState, mapping: FlowMapping) -> dict[str, pl.DataFrame]:
    """Per referenced flow, the ``a_id, b_id`` pairs references translate through.

    Tombstoned links count too: a tombstoned link still says which record stood for
    which, so a contact of a deleted product keeps its reference on both sides and
    the rest of it keeps syncing (with live links only it would wait forever).
    """
    return {ref: state.links(ref, {}).select("a_id", "b_id") for ref in mapping.references}


def mapped_sides(
    mapping: FlowMapping,
    store: SnapshotStore,
    refs: dict[str, pl.DataFrame],
) -> tuple[MappedSide, MappedSide]:
    """Both sides of a flow as canonical rows (references translated through ``refs``).

    Each side's mapped frame is kept in the store and only the rows read since are mapped
    again (:func:`remap_side`); a new frame is kept once :data:`KEEP_AFTER_ROWS` rows (or
    the whole side) were mapped anew, as writing a million rows costs more than mapping
    a thousand again."""
    sides = []
    for side in SIDES:
        obj = mapping.side(side)
        key = mapped_key(mapping, side, refs)
        kept = store.kept_mapped(mapping.name, side, key)
        mapped = remap_side(
            kept,
            None if kept is None else store.read_since(obj.system_key, obj.obj, kept.seq),
            functools.partial(snapshot_of, store, mapping, side),
            mapping,
            side,
            refs,
        )
        rows = mapped.fresh.height
        if rows and (mapped.kept is None or rows >= KEEP_AFTER_ROWS):
            frame = mapped.frame()
            counts = MappedSide(frame).counts()
            kept_frame = store.keep_mapped(mapping.name, side, frame, key, counts)
            mapped = MappedSide(frame.clear(), kept_frame, counts)
        sides.append(mapped)
    return sides[0], sides[1]


def map_flow(
    mapping: FlowMapping,
    store: SnapshotStore,
    refs: dict[str, pl.DataFrame],
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Both sides of a flow as whole canonical frames (see :func:`mapped_sides`)."""
    a, b = mapped_sides(mapping, store, refs)
    return a.frame(), b.frame()


def gone_references(state: SyncState, mapping: FlowMapping) -> dict[str, pl.DataFrame]:
    """Per reference column, the canonical values whose record was deleted (tombstoned):
    ``a_id, deleted_side``."""
    return {c.name: state.tombstoned(c.reference) for c in mapping.columns if c.reference}


class StateRefused(RuntimeError):
    """The state looks lost: syncing would create records a second time (one line)."""


def plan_flow(
    mapping: FlowMapping,
    a: pl.DataFrame | MappedSide,
    b: pl.DataFrame | MappedSide,
    state: SyncState,
    options: ReconcileOptions | None = None,
    earlier_runs: str | None = None,
    full: bool = False,
    links: pl.DataFrame | None = None,
) -> Plan:
    """The plan of one flow from its mapped frames and the state database.

    After a confirmed run of the same document rows, only what changed since is
    planned (:mod:`crm_assets.engine.incremental`); ``full`` plans every record. A side
    given as a :class:`MappedSide` is decoded as far as the plan needs: an incremental
    plan reads a kept frame's :func:`scope_columns`, and every column of its scope only.
    ``links``: the flow's links as ``state.links(flow, {})`` gives them, when the caller
    read them already (a full plan reads them otherwise).

    A flow with no link and no completed sync in this state, while ``earlier_runs``
    (what the caller knows: a data directory or Dagster instance that saw syncs of
    the flow) or the CRMs themselves (records to create whose copy is on the other
    side) show it was synced before, is refused: :class:`StateRefused`, or a blocked
    plan for a read-only one.
    """
    options = options or ReconcileOptions()
    started = datetime.now(UTC)
    if options.mode == "limited" and options.enabled_at is None:
        options = replace(options, enabled_at=state.enabled_at(mapping.name))
    offsets = (state.clock_offset(mapping.a.system_key), state.clock_offset(mapping.b.system_key))
    options = replace(options, clock_offsets=offsets)
    mark = None if full or options.rebuild_links else last_mark(state, mapping)
    sides = [side if isinstance(side, MappedSide) else MappedSide(side) for side in (a, b)]
    if mark is not None:
        a, b = (side.narrow(scope_columns(mapping)) for side in sides)
    changed = changed_since(mapping, a, b, state, mark) if mark else None
    whole, earlier, bases = None, None, None
    if mark is None or changed is None:
        a, b = (side.frame() for side in sides)
        # every link with its base's digest; the values only of pairs that changed
        links = state.links(mapping.name, {}) if links is None else links
        bases = functools.partial(state.bases, mapping.name, mapping.dtypes)
        scope = Scope(a, b, links)
    else:
        count = functools.cache(functools.partial(state.link_count, mapping.name))
        whole = Whole(count, {"a": live_count(a), "b": live_count(b)}, mark.links)
        found = changed_scope(mapping, a, b, state, changed)
        scope = Scope(sides[0].whole_rows(found.a), sides[1].whole_rows(found.b), found.links)
        links, earlier = scope.links, (mark, scope)
    pending = state.pending_creates(mapping.name)
    gone = gone_references(state, mapping)
    plan = reconcile_flow(mapping, scope.a, scope.b, links, options, pending, gone, whole, bases)
    if whole is None:
        at_least = links.height
    else:  # counted by the breaker, or as the last mark knew it
        at_least = count() if count.cache_info().currsize else whole.links_at_least
    after = Mark.after(mapping, (a, b), started, plan.ambiguous, at_least, earlier)
    plan.mark = after.to_json()
    if earlier is not None:  # with the groups outside its scope, as the last mark left them
        whole_ambiguous = after.ambiguous_records(len(mapping.merge)).select(plan.ambiguous.columns)
        plan.ambiguous = whole_ambiguous.cast(plan.ambiguous.schema)
        plan.counts["ambiguous"] = plan.ambiguous.height
    if links.height or whole or options.rebuild_links or state.synced(mapping.name):
        return plan
    if plan.blocked and not mapping.merge:  # the breaker says what a first sync lacks
        return plan
    reasons = [earlier_runs] if earlier_runs else []
    if plan.copies.height:
        reasons.append(
            f"{plan.copies.height} record(s) it would create already have a copy with the "
            "same values on the other side"
        )
    if reasons:
        message = (
            f"flow {mapping.name}: the state database has no links for this flow, but "
            f"{' and '.join(reasons)}; a sync now would create them twice. Point "
            "CRM_SYNC_STATE_URL / CRM_SYNC_DATA_DIR at the earlier runs' state, or run "
            "`crm-assets sync --rebuild-links` (it relinks from the CRMs and creates nothing)"
        )
        if not plan.read_only:
            raise StateRefused(message)
        plan.blocked = message
    return plan


def read_only_plan(
    mapping: FlowMapping, a: pl.DataFrame, b: pl.DataFrame, state: SyncState, links: pl.DataFrame
) -> Plan:
    """What a sync would still do now, writing nothing: a full plan over ``links`` (the
    verification's ambiguous matches, the unlinked records' reasons)."""
    read_only = ReconcileOptions(mode="read_only")
    return plan_flow(mapping, a, b, state, read_only, full=True, links=links)


def named_counts(plan: Plan | Mapping[str, Any], mapping: FlowMapping) -> dict[str, int]:
    """A plan's counts (or counts as a plan file keeps them) as an operator reads them: per
    CRM by name, never by side letter (``creates_in_crm_office``, ``updates_in_custom_crm``)."""
    out = {}
    counts = plan.counts if isinstance(plan, Plan) else plan
    for key, value in counts.items():
        head, _, side = key.rpartition("_")
        if side in ("a", "b") and head:
            key = f"{head}_in_{mapping.side(side).system_key}"
        out[key] = int(value)
    return out


def confirm_plan(state: SyncState, plan: Plan, run_id: str) -> bool:
    """After a plan's last writes: the flow's state is real (a lost one is told from a
    new one), and a written plan's mark is where the flow's next plan starts. False
    when the plan changed nothing (blocked, or a dry run)."""
    if plan.blocked or (plan.read_only and not plan.rebuild_links):
        return False
    state.mark_synced(plan.flow, run_id, None if plan.read_only else plan.mark)
    return True
