"""The documents ``CRM_SYNC_SPEC`` selects, synced together as one set of flows.

Several documents may share a CRM object (CRMOffice Contacts in both Custom CRM ↔
CRMOffice and HubSpot ↔ CRMOffice): its snapshot is read once for all their flows,
and each flow keeps its own links, so a record linked in two flows passes an edit on
through both. Two documents syncing the same pair of objects would each create and
link the same records: that is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from crm_assets.engine.document import DataflowDocument, SelectionError, read_documents
from crm_assets.engine.mapping import FlowMapping
from crm_assets.sync.planning import FlowSet, flow_set


@dataclass(frozen=True)
class Selection:
    """The selected documents, in order, and their flows together."""

    documents: tuple[DataflowDocument, ...]
    flows: FlowSet

    @property
    def mappings(self) -> list[FlowMapping]:
        return self.flows.mappings

    @property
    def title(self) -> str:
        return " + ".join(d.title for d in self.documents)


def read_selection(paths: Sequence[Path], skip_unsupported: bool = False) -> Selection:
    """Read the documents and resolve their flows (each document's referenced flows first)."""
    documents = read_documents(paths)
    mappings: list[FlowMapping] = []
    skipped = []
    owners: dict[frozenset[tuple[str, str]], tuple[str, str]] = {}
    for document in documents:
        flows = flow_set(document, skip_unsupported)
        for m in flows.mappings:
            pair = frozenset({(m.a.system_key, m.a.obj), (m.b.system_key, m.b.obj)})
            source, name = owners.setdefault(pair, (document.source, m.name))
            if name != m.name:
                raise SelectionError(
                    f"{source} (flow {name}) and {document.source} (flow {m.name}) both sync "
                    f"{m.a.system} {m.a.obj} with {m.b.system} {m.b.obj}: select one of them"
                )
        mappings += flows.mappings
        skipped += flows.skipped
    return Selection(documents, FlowSet(mappings, skipped))
