"""Snapshot assets: one per source object a flow of the document reads."""

import dagster as dg

from crm_assets.engine.document import DataflowDocument
from crm_assets.sources import SourceObject, source_for, take_snapshot


class SnapshotConfig(dg.Config):
    """``full_rescan`` re-reads everything, which is how hard deletes are found."""

    full_rescan: bool = False


def build_snapshot_asset(source: SourceObject) -> dg.AssetsDefinition:
    """The snapshot asset of one source object, e.g. ``custom_crm/contacts``."""

    @dg.asset(
        key=dg.AssetKey(source.asset_path),
        group_name=source.system_key,
        kinds={"parquet", "polars"},
        description=f"Every {source.system} {source.obj} record, kept up to date incrementally.",
        required_resource_keys={source.system_key, "storage"},
        metadata={"system": source.system, "object": source.obj},
    )
    def snapshot(context: dg.AssetExecutionContext, config: SnapshotConfig) -> dg.MaterializeResult:
        store = context.resources.storage.snapshots()
        with getattr(context.resources, source.system_key).client() as client:
            run = take_snapshot(client, source, store, full_rescan=config.full_rescan)
        change = run.change
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": change.frame.height,
                "live_records": change.live,
                "fetched": change.fetched,
                "new": change.new,
                "changed": change.changed,
                "deleted": change.deleted,
                "pages": run.pages,
                "mode": "full rescan" if config.full_rescan else "incremental",
                "read_since": run.since.isoformat() if run.since else "beginning",
                "cursor": run.cursor.isoformat() if run.cursor else "none",
                "path": dg.MetadataValue.path(store.path(source.system_key, source.obj)),
            }
        )

    return snapshot


def sources_of(document: DataflowDocument) -> list[SourceObject]:
    """The supported source objects the document's flows read, in document order."""
    found: list[SourceObject] = []
    for flow in document.flows:
        for end in (flow.source, flow.target):
            source = source_for(end.system, end.entity)
            if source is not None and source not in found:
                found.append(source)
    return found


def build_snapshot_assets(document: DataflowDocument) -> list[dg.AssetsDefinition]:
    return [build_snapshot_asset(source) for source in sources_of(document)]
