"""The sync layer, by step: planning, snapshots, writing, verification, the one-shot run.

Where the engine meets the connectors. Nothing here names a CRM: each side of
a flow comes with its connector's objects and client.
"""

from crm_assets.sync.files import FlowFiles
from crm_assets.sync.once import FlowRun, sync_once
from crm_assets.sync.planning import (
    WRITE_ORDER,
    FlowSet,
    SkippedFlow,
    confirm_plan,
    flow_mappings,
    flow_set,
    map_flow,
    mapped_sides,
    named_counts,
    plan_flow,
    reference_links,
)
from crm_assets.sync.snapshots import SnapshotRun, take_snapshot
from crm_assets.sync.verification import FlowVerification, verify_flow
from crm_assets.sync.writing import WriteResult, new_run_id, write_flow

__all__ = [
    "WRITE_ORDER",
    "FlowFiles",
    "FlowRun",
    "FlowSet",
    "FlowVerification",
    "SkippedFlow",
    "SnapshotRun",
    "WriteResult",
    "confirm_plan",
    "flow_mappings",
    "flow_set",
    "map_flow",
    "mapped_sides",
    "named_counts",
    "new_run_id",
    "plan_flow",
    "reference_links",
    "sync_once",
    "take_snapshot",
    "verify_flow",
    "write_flow",
]
