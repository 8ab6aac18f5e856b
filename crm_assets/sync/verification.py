"""Verification: the flow's QA checklist, from both CRMs as read after the writes."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from crm_assets.engine.checks import CheckOutcome, agreement, flow_checks
from crm_assets.engine.mapping import FlowMapping
from crm_assets.engine.reconcile import Plan
from crm_assets.engine.snapshot import SnapshotStore
from crm_assets.engine.state import SyncState
from crm_assets.sync.planning import (
    gone_references,
    map_flow,
    read_only_plan,
    reference_links,
    snapshot_of,
)


@dataclass
class FlowVerification:
    """What the two CRMs hold for one flow, checked after the writes."""

    flow: str
    linked: int
    disagreements: pl.DataFrame
    unlinked_a: pl.DataFrame
    unlinked_b: pl.DataFrame
    checks: list[CheckOutcome]
    #: what the checks were made from, for tables that explain them (``unlinked_records``)
    mapped: dict[str, pl.DataFrame]
    references: dict[str, pl.DataFrame]
    #: the read-only full plan: what a sync would still do now (its ambiguous matches)
    plan: Plan


def verify_flow(mapping: FlowMapping, store: SnapshotStore, state: SyncState) -> FlowVerification:
    """The flow's QA checklist from snapshots taken after the writes.

    Ambiguous matches come from a read-only plan over the same data: what a
    sync would still find ambiguous now.
    """
    refs = reference_links(state, mapping)
    gone = gone_references(state, mapping)
    snaps = {side: snapshot_of(store, mapping, side) for side in ("a", "b")}
    a, b = map_flow(mapping, store, refs)
    mapped = {"a": a, "b": b}
    links = state.links(mapping.name, {})  # the checks read pairs, not base values
    plan = read_only_plan(mapping, a, b, state, links)
    agreed = agreement(mapping, mapped, links, refs, gone)
    checks = flow_checks(
        mapping,
        mapped,
        snaps,
        links,
        plan.ambiguous,
        state.dead_letters(mapping.name),
        agreed,
        side_effects=plan.side_effects,
    )
    return FlowVerification(
        flow=mapping.name,
        linked=agreed.linked,
        disagreements=agreed.disagreements.filter(~pl.col("waiting")),
        unlinked_a=agreed.unlinked["a"],
        unlinked_b=agreed.unlinked["b"],
        checks=checks,
        mapped=mapped,
        references=refs,
        plan=plan,
    )
