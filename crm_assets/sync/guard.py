"""One writer per flow, for every path that writes: when to take the lease, and what a
writer that waited for another must read again.

A writer takes the flow's lease before it maps what it will plan from. When it
had to wait for another writer, the snapshots it read may predate that
writer's writes: they are read again (incrementally) under the lease, so the
plan sees the records and links the other writer made and creates nothing twice.
A write step that takes the lease only then (a re-executed step) checks that
its plan is not older than the last release, and stops otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from crm_assets.engine.lease import (
    DEFAULT_TTL,
    DEFAULT_WAIT,
    FlowLease,
    LeaseHeld,
    hold,
    holder_name,
)
from crm_assets.engine.mapping import FlowMapping
from crm_assets.engine.objects import SourceObject
from crm_assets.engine.snapshot import SnapshotStore
from crm_assets.engine.state import SyncState


class StalePlan(LeaseHeld):
    """The flow was written by another run after this run's plan was made."""


def lease_timing() -> tuple[float, float]:
    """``(ttl, wait)`` seconds from ``CRM_SYNC_LEASE_TTL`` and ``CRM_SYNC_LEASE_WAIT``."""
    ttl = float(os.environ.get("CRM_SYNC_LEASE_TTL") or DEFAULT_TTL)
    wait = float(os.environ.get("CRM_SYNC_LEASE_WAIT") or DEFAULT_WAIT)
    return ttl, wait


def take_flow(state: SyncState, mapping: FlowMapping, run_id: str, via: str) -> FlowLease:
    """Hold the flow's lease for this run (waiting a bounded time for another writer)."""
    ttl, wait = lease_timing()
    lease = FlowLease(state, mapping.name, run_id, holder_name(run_id, via), ttl)
    return hold(lease, wait)


def refresh_if_stale(
    lease: FlowLease,
    mapping: FlowMapping,
    store: SnapshotStore,
    read: Callable[[SourceObject], object],
) -> bool:
    """Read both objects again (``read`` takes one object's snapshot) when another writer
    released the flow after they were last read. Returns whether it read again."""
    released = lease.previous_release
    if released is None:
        return False
    read_at = [store.read_at(o.system_key, o.obj) or 0.0 for o in (mapping.a, mapping.b)]
    if min(read_at) > released:
        return False
    for obj in (mapping.a, mapping.b):
        read(obj)
    return True


def check_plan_current(lease: FlowLease, plan_made_at: float | None) -> None:
    """Stop a write whose plan predates another writer's release of the flow."""
    if lease.previous_release is not None and (plan_made_at or 0) < lease.previous_release:
        lease.release()
        raise StalePlan(
            f"flow {lease.flow} was synced by another run after this run's plan was made; "
            "wrote nothing (run the flow again to plan from what the CRMs hold now)"
        )
