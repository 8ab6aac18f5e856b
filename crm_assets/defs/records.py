"""The sync's own records in Dagster: per flow, its ``conflicts``, ``dead_letters`` and
``unlinked`` records, after the flow is verified.

Thin wiring over :mod:`crm_assets.sync.records`: each asset writes its table as
Parquet to ``<data dir>/flows/<flow>/records/`` and shows its first rows as
Markdown, with CRM names throughout. The CLI (``crm-assets dead-letters``,
``crm-assets audit``) reads and acts on the same state.
"""

from collections.abc import Callable

import dagster as dg
import polars as pl

from crm_assets.defs.resources import SyncStorage
from crm_assets.defs.sync_assets import flow_key, markdown_table
from crm_assets.engine.mapping import FlowMapping
from crm_assets.engine.snapshot import SnapshotStore
from crm_assets.sync.records import conflicts_table, dead_letters_table, display, unlinked_table

#: Rows of each table shown in the UI (the Parquet file has them all).
SHOWN_ROWS = 20


def after_writes_store(storage: SyncStorage, mapping: FlowMapping) -> SnapshotStore:
    """The snapshots read after the writes (by ``<flow>/verified``), else the sync's own."""
    verification = storage.verification()
    if all(verification.exists(o.system_key, o.obj) for o in (mapping.a, mapping.b)):
        return verification
    return storage.snapshots()


def unlinked_of_run(storage: SyncStorage, mapping: FlowMapping, run_id: str) -> pl.DataFrame:
    """What the run's verification found unlinked (it made the same plan over the same
    snapshots, seconds at a million records); made here when this asset runs alone."""
    found = storage.flow_files(mapping.name, run_id).load_unlinked()
    if found is not None:
        return found
    return unlinked_table(mapping, after_writes_store(storage, mapping), storage.state())


def _materialize(storage: SyncStorage, flow: str, name: str, frame: pl.DataFrame) -> dict:
    records = storage.flow_dir(flow).child("records")
    records.write_parquet(frame, f"{name}.parquet")
    return {
        "dagster/row_count": frame.height,
        "path": dg.MetadataValue.path(records.uri(f"{name}.parquet")),
        "table": dg.MetadataValue.md(markdown_table(display(frame), limit=SHOWN_ROWS)),
    }


def _record_asset(
    mapping: FlowMapping,
    name: str,
    description: str,
    table: Callable[[SyncStorage, str], pl.DataFrame],
) -> dg.AssetsDefinition:
    @dg.asset(
        key=flow_key(mapping, name),
        group_name=mapping.name,
        deps=[flow_key(mapping, "verified")],
        kinds={"polars", "parquet"},
        required_resource_keys={"storage"},
        description=description,
    )
    def records(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        storage = context.resources.storage
        frame = table(storage, context.run.run_id)
        return dg.MaterializeResult(metadata=_materialize(storage, mapping.name, name, frame))

    return records


def build_record_assets(mapping: FlowMapping) -> list[dg.AssetsDefinition]:
    """``<flow>/conflicts``, ``<flow>/dead_letters`` and ``<flow>/unlinked``."""
    a, b = mapping.a.system, mapping.b.system
    return [
        _record_asset(
            mapping,
            "conflicts",
            f"Recent conflicts of '{mapping.title}': both values, the winner ({a} or {b}) "
            "and why it won.",
            lambda storage, _run: conflicts_table(storage.state(), mapping),
        ),
        _record_asset(
            mapping,
            "dead_letters",
            f"Open failures of '{mapping.title}': records {a} or {b} refused, retried on "
            "every run (`crm-assets dead-letters list|retry|discard`).",
            lambda storage, _run: dead_letters_table(storage.state(), mapping),
        ),
        _record_asset(
            mapping,
            "unlinked",
            f"Records of '{mapping.title}' without a link in {a} or {b}, named, with why: "
            "no match, ambiguous candidates, waiting on a reference, or failed.",
            lambda storage, run_id: unlinked_of_run(storage, mapping, run_id),
        ),
    ]
