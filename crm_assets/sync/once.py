"""One whole sync run without Dagster: the same steps as the asset graph, in one call."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from crm_assets.connector import CrmClient
from crm_assets.engine.lease import release_held
from crm_assets.engine.mapping import FlowMapping
from crm_assets.engine.reconcile import Plan, ReconcileOptions
from crm_assets.engine.snapshot import SnapshotStore
from crm_assets.engine.state import SyncState
from crm_assets.sync.guard import refresh_if_stale, take_flow
from crm_assets.sync.planning import (
    confirm_plan,
    mapped_sides,
    plan_flow,
    reference_links,
)
from crm_assets.sync.snapshots import read_snapshot
from crm_assets.sync.writing import WriteResult, new_run_id, write_flow


@dataclass
class FlowRun:
    """One flow's part of a :func:`sync_once` run."""

    plan: Plan
    results: dict[str, WriteResult]


def sync_once(
    mappings: Sequence[FlowMapping],
    clients: Mapping[str, CrmClient],
    store: SnapshotStore,
    state: SyncState,
    options: ReconcileOptions | None = None,
    full_rescan: bool = False,
) -> dict[str, FlowRun]:
    """Everything one sync run does: snapshot, map, plan and write every flow.

    ``clients`` by connector key (``custom_crm``, ``crm_office``); flows run in the
    order given (referenced flows first, as :func:`flow_mappings` orders them).
    """
    run_id = new_run_id()
    runs: dict[str, FlowRun] = {}
    snapshotted: set[tuple[str, str]] = set()
    for mapping in mappings:
        for obj in (mapping.a, mapping.b):
            if (obj.system_key, obj.obj) not in snapshotted:
                read_snapshot(clients[obj.system_key], obj, store, state, full_rescan)
                snapshotted.add((obj.system_key, obj.obj))
        lease = take_flow(state, mapping, run_id, "sync_once")
        try:
            refresh_if_stale(
                lease,
                mapping,
                store,
                lambda obj: read_snapshot(clients[obj.system_key], obj, store, state),
            )
            refs = reference_links(state, mapping)
            a, b = mapped_sides(mapping, store, refs)
            plan = plan_flow(mapping, a, b, state, options, full=full_rescan)
            results = write_flow(mapping, plan, state, store, clients, run_id, refs)
            confirm_plan(state, plan, run_id)
        finally:
            release_held(run_id, mapping.name)
        runs[mapping.name] = FlowRun(plan, results)
    return runs
