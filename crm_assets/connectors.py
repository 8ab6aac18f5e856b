"""The registry: which connector stands for a system a dataflow document names.

Adding a CRM is one folder (see ``crm_assets/README.md``) and one line in
``CONNECTORS``. Names compare ignoring case and spacing.
"""

from __future__ import annotations

from crm_assets.connector import Connector, normalize_name
from crm_assets.crm_office.connector import CONNECTOR as CRM_OFFICE
from crm_assets.custom_crm.connector import CONNECTOR as CUSTOM_CRM
from crm_assets.engine.document import DataflowDocument, Endpoint, Flow
from crm_assets.engine.objects import SourceObject
from crm_assets.hubspot.connector import CONNECTOR as HUBSPOT

#: Every CRM the project can sync, one line each.
CONNECTORS: tuple[Connector, ...] = (CUSTOM_CRM, CRM_OFFICE, HUBSPOT)


def available() -> str:
    """The systems there are connectors for, as an error message lists them."""
    return ", ".join(c.system for c in CONNECTORS)


def connector_for(system: str) -> Connector | None:
    """The connector of a system as a document names it, if there is one."""
    wanted = normalize_name(system)
    return next((c for c in CONNECTORS if normalize_name(c.system) == wanted), None)


def connector_by_key(key: str) -> Connector:
    """The connector behind an asset key prefix or resource key (``crm_office``)."""
    found = next((c for c in CONNECTORS if key in (c.key, c.slug)), None)
    if found is None:
        raise KeyError(f"no connector {key!r} (connectors: {', '.join(c.key for c in CONNECTORS)})")
    return found


class UnsupportedFlow(ValueError):
    """A flow names a system or object no connector provides; the message is one line."""


def resolve_endpoint(document: DataflowDocument, flow: Flow, end: Endpoint) -> SourceObject:
    """The object one end of a flow stands for, or UnsupportedFlow naming file, line and why."""
    where = f"{document.source}, line {flow.line}"
    connector = connector_for(end.system)
    if connector is None:
        raise UnsupportedFlow(
            f"{where}: no connector for the system {end.system!r} "
            f"(flow '{flow.title}'; available systems: {available()})"
        )
    obj = connector.object_for(end.entity)
    if obj is None:
        objects = ", ".join(o.entity for o in connector.objects)
        raise UnsupportedFlow(
            f"{where}: {connector.system} has no object {end.entity!r} "
            f"(flow '{flow.title}'; {connector.system} objects: {objects})"
        )
    return obj


def check_document(document: DataflowDocument) -> list[str]:
    """One line per flow that no connector can sync (empty: every flow can run)."""
    errors = []
    for flow in document.flows:
        for end in (flow.source, flow.target):
            try:
                resolve_endpoint(document, flow, end)
            except UnsupportedFlow as exc:
                errors.append(str(exc))
                break
    return errors


def with_fix(kind: str, message: str) -> str:
    """A CRM failure (``credentials`` refused or ``unreachable``) with the settings that fix
    it, found through the connector of the CRM the message starts with."""
    roles = {"credentials": ("account", "secret"), "unreachable": ("base_url",)}[kind]
    for connector in CONNECTORS:
        if message.startswith(f"{connector.system}:") and "(check " not in message:
            names = [s.name for r in roles if (s := connector.setting(r))]
            up = " and that it is up" if kind == "unreachable" else ""
            return f"{message} (check {' and '.join(names)}{up})"
    return message
