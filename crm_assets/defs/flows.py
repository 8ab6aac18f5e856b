"""Per-flow assets generated from the dataflow document.

Each flow of the document becomes an asset group named after the flow. The
``dataflow`` asset records the flow definition in force (its code version is a
digest of the flow's rows, so editing the document marks everything built on
the flow stale) and shows the flow's rows in the UI.
"""

import hashlib
import json
from typing import Any

import dagster as dg

from crm_assets.engine.document import DataflowDocument, Flow


def flow_digest(flow: Flow) -> str:
    """A short stable digest of a flow's definition."""
    text = json.dumps(flow.to_json(), sort_keys=True).encode()
    return hashlib.sha256(text).hexdigest()[:12]


def flow_metadata(flow: Flow) -> dict[str, Any]:
    """The flow's title, systems and rows, as the UI shows them."""
    rows = [
        dg.TableRecord(
            {
                "source": p.source,
                "target": p.target,
                "type": p.type or "N/A",
                "condition": f"{p.condition.value} in {p.condition.path}" if p.condition else "",
            }
        )
        for p in flow.properties
    ]
    schema = dg.TableSchema(
        columns=[
            dg.TableColumn("source", "string", description=f"{flow.source.system} property"),
            dg.TableColumn("target", "string", description=f"{flow.target.system} property"),
            dg.TableColumn("type", "string", description="target data type"),
            dg.TableColumn("condition", "string"),
        ]
    )
    return {
        "flow": flow.title,
        "flow_name": flow.name,
        "source": f"{flow.source.system} {flow.source.entity}",
        "target": f"{flow.target.system} {flow.target.entity}",
        "merge_on": " | ".join(f"{m.source} = {m.target}" for m in flow.merge) or "none",
        "properties": dg.MetadataValue.table(rows, schema=schema),
        "property_count": len(flow.properties),
    }


def build_dataflow_asset(flow: Flow) -> dg.AssetsDefinition:
    """The asset recording one flow's definition, in the flow's own group."""
    metadata = flow_metadata(flow)

    @dg.asset(
        key=dg.AssetKey([flow.name, "dataflow"]),
        group_name=flow.name,
        code_version=flow_digest(flow),
        description=f"Definition in force of the flow '{flow.title}'.",
        metadata=metadata,
        kinds={"rst"},
        required_resource_keys={"storage"},
    )
    def dataflow(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        flows = context.resources.storage.data().child("flows")
        flows.write_text(
            json.dumps(flow.to_json(), indent=2, ensure_ascii=False), f"{flow.name}.json"
        )
        out = flows.uri(f"{flow.name}.json")
        return dg.MaterializeResult(metadata={**metadata, "path": dg.MetadataValue.path(out)})

    return dataflow


def build_flow_assets(document: DataflowDocument) -> list[dg.AssetsDefinition]:
    """One asset group per flow of the document."""
    return [build_dataflow_asset(flow) for flow in document.flows]
